"""Horovod benchmark process (launch with horovodrun/mpirun, one rank per
process): ShardedAdam with its Horovod backend vs the Horovod baseline,
``hvd.grouped_allreduce`` (average) of the gradients followed by
``keras.optimizers.Adam``, on the same models and data. Rank 0 writes JSON.

usage: horovodrun -np 2 -H localhost:2 --gloo python benchmarks/horovod_worker.py --out result.json

The baseline is built from Horovod's tensor ops because Horovod 0.28's
``horovod.tensorflow.keras.DistributedOptimizer`` wraps a Keras 3 optimizer
without averaging anything (see distadam/horovod_keras.py): timing it would
time a broken optimizer.
"""

from __future__ import annotations

import argparse
import json
import time

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tasks", default="memory,collectives,bytes,timing")
parser.add_argument("--collective-sizes", default="10,100,1000")
parser.add_argument("--timing-models", default="update_bound,compute_bound")
parser.add_argument("--repetitions", type=int, default=9)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--out", required=True)
ARGS = parser.parse_args()

import harness  # noqa: E402  (sets TF logging before TF loads)
import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

hvd.init()
# Ranks share the machine's cores: one compute thread each avoids
# oversubscription that would swamp the measurement.
tf.config.threading.set_intra_op_parallelism_threads(1)
RANK, SIZE = hvd.rank(), hvd.size()


class AllreduceAdamStep:
    """The Horovod data-parallel baseline: average gradients with one grouped
    all-reduce, then a full (unsharded) Adam update on every rank."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def __call__(self, grads):
        grads = hvd.grouped_allreduce(grads, op=hvd.Average)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))


def build_pair(make_model, kwargs=None):
    kwargs = kwargs or {}
    pairs = {}
    for name, cls in (("sharded", distadam.ShardedAdam), ("adam", keras.optimizers.Adam)):
        model = make_model()
        optimizer = cls(**kwargs)
        optimizer.build(model.trainable_variables)
        pairs[name] = (model, optimizer)
    return pairs


def make_step(name, model, optimizer):
    """Per-rank mean loss, as Horovod scripts write it (the Horovod backend
    and the baseline both average over ranks)."""
    baseline = AllreduceAdamStep(model, optimizer) if name == "adam" else None

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        if baseline is None:
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
        else:
            baseline(grads)
        return loss

    return step


def local_batch(input_dim, output_dim, batch, seed=0):
    rng = np.random.default_rng(seed + RANK)
    return (tf.constant(rng.normal(size=(batch, input_dim)).astype("float32")),
            tf.constant(rng.normal(size=(batch, output_dim)).astype("float32")))


def collectives_of(name, model, optimizer, batch, input_dim, output_dim):
    step = make_step(name, model, optimizer)
    x, y = local_batch(input_dim, output_dim, batch)
    backend = optimizer.collectives if isinstance(optimizer, distadam.ShardedAdam) else None
    before = dict(backend.launches) if backend else None
    recorder = harness.CallRecorder(backend) if backend else None
    start = time.perf_counter()
    graph = step.get_concrete_function(x, y).graph
    trace_s = time.perf_counter() - start
    ops = harness.fill_dynamic_sizes(harness.traced_collectives(graph), recorder)
    summary = harness.collective_summary(ops, workers_in_graph=1, n=SIZE)
    summary["trace_s"] = trace_s
    if backend is not None:
        counted = {k: v - before[k] for k, v in backend.launches.items()}
        summary["backend_launches_per_step"] = {k: int(v) for k, v in counted.items() if v}
        summary["reduce_scatter_mode"] = getattr(backend, "reduce_scatter_mode", None)
    return summary


def task_memory():
    spec = harness.MODELS["memory"]
    pairs = build_pair(lambda: harness.mlp(spec["input_dim"], spec["widths"]))
    (sharded_model, sharded), (adam_model, adam) = pairs["sharded"], pairs["adam"]
    # One process = one replica: the per-"device" dicts have a single entry.
    return {"default": {
        "model": harness.model_summary(sharded_model),
        "sharded_bytes_per_replica": sum(
            harness.optimizer_state_bytes(sharded, sharded_model.trainable_variables).values()),
        "sharded_reported_bytes_per_replica": sum(sharded.state_bytes_per_device().values()),
        "adam_bytes_per_replica": sum(
            harness.optimizer_state_bytes(adam, adam_model.trainable_variables).values()),
    }}


def task_collectives(sizes):
    rows = {}
    for count in sizes:
        pairs = build_pair(lambda: harness.many_variables_model(count))
        rows[str(count)] = {name: collectives_of(name, m, o, 2, 4, 2) for name, (m, o) in pairs.items()}
    return rows


def task_bytes():
    spec = harness.MODELS["update_bound"]
    pairs = build_pair(lambda: harness.mlp(spec["input_dim"], spec["widths"]))
    summary = harness.model_summary(pairs["sharded"][0])
    bound = harness.allreduce_bound(summary["param_bytes"], SIZE)
    rows = {"param_bytes": summary["param_bytes"], "ring_allreduce_bound": bound}
    for name, (model, optimizer) in pairs.items():
        stats = collectives_of(name, model, optimizer, spec["batch_per_replica"],
                               spec["input_dim"], spec["widths"][-1])
        stats["ratio_to_bound"] = stats["bytes_sent_per_worker"] / bound
        rows[name] = stats
    return rows


def task_timing(model_names):
    rows = {}
    for model_name in model_names:
        spec = harness.MODELS[model_name]
        pairs = build_pair(lambda: harness.mlp(spec["input_dim"], spec["widths"]))
        # Both start from rank 0's weights, as a real Horovod job would.
        for model, _ in pairs.values():
            for variable in model.trainable_variables:
                variable.assign(hvd.broadcast(variable.value, root_rank=0, name=f"bcast_{model_name}_{variable.path}"))
        x, y = local_batch(spec["input_dim"], spec["widths"][-1], spec["batch_per_replica"])
        runners = {}
        for name, (model, optimizer) in pairs.items():
            step = make_step(name, model, optimizer)
            runners[name] = lambda step=step: step(x, y).numpy()
        samples = harness.interleaved_timing(runners, ARGS.repetitions, ARGS.steps, ARGS.warmup)
        rows[model_name] = {
            "params": harness.model_summary(pairs["sharded"][0])["params"],
            "batch_per_replica": spec["batch_per_replica"],
            "sharded": harness.time_stats(samples["sharded"]),
            "adam": harness.time_stats(samples["adam"]),
            "ratio_sharded_over_adam": harness.ratio_stats(samples["sharded"], samples["adam"]),
            "repetitions": ARGS.repetitions,
            "steps_per_repetition": ARGS.steps,
        }
    return rows


def main():
    tasks = [t for t in ARGS.tasks.split(",") if t]
    result = {"replicas": SIZE, "strategy": "horovod", "baseline": "hvd.grouped_allreduce(Average) + keras Adam",
              "horovod_version": __import__("horovod").__version__,
              "controller": "mpi" if hvd.mpi_enabled() else "gloo"}
    started = time.perf_counter()
    if "memory" in tasks:
        result["memory"] = task_memory()
    if "collectives" in tasks:
        result["collectives"] = task_collectives([int(s) for s in ARGS.collective_sizes.split(",") if s])
    if "bytes" in tasks:
        result["bytes"] = task_bytes()
    if "timing" in tasks:
        result["timing"] = task_timing([m for m in ARGS.timing_models.split(",") if m])
    result["elapsed_s"] = time.perf_counter() - started
    if RANK == 0:
        with open(ARGS.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
