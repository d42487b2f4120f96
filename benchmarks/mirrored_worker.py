"""One MirroredStrategy benchmark process: ShardedAdam vs keras.optimizers.Adam
under the same strategy on N logical CPU devices, same models, same data.

usage: python benchmarks/mirrored_worker.py --replicas N [--tasks memory,collectives,bytes,timing]
       [--collective-sizes 10,100,1000] [--timing-models update_bound,compute_bound]
       [--repetitions R] [--steps S] [--warmup W] --out result.json

Run each N in its own process: TensorFlow allows one MirroredStrategy per
process (a second one collides on collective keys).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--tasks", default="memory,collectives,bytes,timing")
    parser.add_argument("--collective-sizes", default="10,100,1000")
    # Tracing Keras Adam's per-variable update under MirroredStrategy costs
    # seconds per variable and replica; its launch count is one packed
    # all-reduce at every size, so the baseline is traced up to this size only.
    parser.add_argument("--baseline-collective-max", type=int, default=100)
    parser.add_argument("--timing-models", default="update_bound,compute_bound")
    parser.add_argument("--repetitions", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


ARGS = parse_args()

import harness  # noqa: E402  (sets TF logging before TF loads)

harness.use_logical_cpus(ARGS.replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

N = ARGS.replicas
STRATEGY = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(N)])

# Optimizer configurations for the memory measurement: the default, and every
# optional state kind at once (what the planner's flags model).
MEMORY_CONFIGS = {
    "default": {},
    "amsgrad_ema_accumulation": {"amsgrad": True, "use_ema": True, "gradient_accumulation_steps": 2},
}


def build_pair(make_model, kwargs):
    """(model, optimizer) for ShardedAdam and for Adam, identical weights,
    both built under the strategy."""
    pairs = {}
    with STRATEGY.scope():
        for name, cls in (("sharded", distadam.ShardedAdam), ("adam", keras.optimizers.Adam)):
            model = make_model()
            optimizer = cls(**kwargs)
            optimizer.build(model.trainable_variables)
            pairs[name] = (model, optimizer)
    return pairs


def make_step(model, optimizer, global_batch):
    """A custom-loop step as the README describes (loss averaged over the
    global batch, apply_gradients inside strategy.run)."""

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(model(x, training=True) - y), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return STRATEGY.run(replica_fn, args=(x, y))

    return step


def distributed_batch(input_dim, output_dim, batch_per_replica, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, batch_per_replica, input_dim)).astype("float32")
    y = rng.normal(size=(N, batch_per_replica, output_dim)).astype("float32")
    return STRATEGY.experimental_distribute_values_from_function(
        lambda ctx: (tf.constant(x[ctx.replica_id_in_sync_group]), tf.constant(y[ctx.replica_id_in_sync_group]))
    )


def collectives_of(model, optimizer, batch_per_replica, input_dim, output_dim):
    step = make_step(model, optimizer, N * batch_per_replica)
    x, y = distributed_batch(input_dim, output_dim, batch_per_replica)
    backend = optimizer.collectives if isinstance(optimizer, distadam.ShardedAdam) else None
    before = dict(backend.launches) if backend else None
    recorder = harness.CallRecorder(backend) if backend else None
    start = time.perf_counter()
    graph = step.get_concrete_function(x, y).graph
    trace_s = time.perf_counter() - start
    ops = harness.fill_dynamic_sizes(harness.traced_collectives(graph), recorder)
    summary = harness.collective_summary(ops, workers_in_graph=N, n=N)
    summary["trace_s"] = trace_s
    if backend is not None:
        # The backend counts calls while tracing; MirroredStrategy traces the
        # replica function once per replica.
        counted = {k: (v - before[k]) / N for k, v in backend.launches.items()}
        summary["backend_launches_per_step"] = {k: int(v) for k, v in counted.items() if v}
    return summary


def task_memory():
    spec = harness.MODELS["memory"]
    rows = {}
    for config_name, kwargs in MEMORY_CONFIGS.items():
        pairs = build_pair(lambda: harness.mlp(spec["input_dim"], spec["widths"]), kwargs)
        sharded_model, sharded = pairs["sharded"]
        adam_model, adam = pairs["adam"]
        sharded_vars, adam_vars = sharded_model.trainable_variables, adam_model.trainable_variables
        rows[config_name] = {
            "optimizer_kwargs": kwargs,
            "model": harness.model_summary(sharded_model),
            "sharded_bytes_per_replica": harness.by_short_device(
                harness.optimizer_state_bytes(sharded, sharded_vars)),
            "sharded_reported_bytes_per_replica": harness.by_short_device(sharded.state_bytes_per_device()),
            "adam_bytes_per_replica": harness.by_short_device(harness.optimizer_state_bytes(adam, adam_vars)),
            "model_variables_in_optimizer_variables": {
                "sharded": harness.tracked_model_variables(sharded, sharded_vars),
                "adam": harness.tracked_model_variables(adam, adam_vars),
            },
            "state_kinds": list(sharded.sharded_state.kinds),
            "num_buckets": len(sharded.layout.buckets),
            "padding_elements": sum(b.padding for b in sharded.layout.buckets),
        }
    return rows


def task_collectives(sizes):
    rows = {}
    for count in sizes:
        pairs = build_pair(lambda: harness.many_variables_model(count), {})
        rows[str(count)] = {}
        for name, (model, optimizer) in pairs.items():
            if name == "adam" and count > ARGS.baseline_collective_max:
                rows[str(count)][name] = {
                    "not_measured": f"baseline traced only up to {ARGS.baseline_collective_max} variables "
                                    "(--baseline-collective-max): Keras Adam's trace time grows per variable"
                }
                continue
            rows[str(count)][name] = collectives_of(model, optimizer, 2, 4, 2)
        rows[str(count)]["model"] = harness.model_summary(pairs["sharded"][0])
        rows[str(count)]["model"].pop("variable_shapes")
    return rows


def task_bytes():
    """Communication volume per worker per step on the update-bound model,
    from the traced collectives and the ring cost model."""
    spec = harness.MODELS["update_bound"]
    pairs = build_pair(lambda: harness.mlp(spec["input_dim"], spec["widths"]), {})
    summary = harness.model_summary(pairs["sharded"][0])
    bound = harness.allreduce_bound(summary["param_bytes"], N)
    rows = {"param_bytes": summary["param_bytes"], "ring_allreduce_bound": bound}
    for name, (model, optimizer) in pairs.items():
        stats = collectives_of(model, optimizer, spec["batch_per_replica"], spec["input_dim"], spec["widths"][-1])
        stats["ratio_to_bound"] = stats["bytes_sent_per_worker"] / bound if bound else None
        rows[name] = stats
    return rows


def task_timing(model_names):
    rows = {}
    for model_name in model_names:
        spec = harness.MODELS[model_name]
        pairs = build_pair(lambda: harness.mlp(spec["input_dim"], spec["widths"]), {})
        x, y = distributed_batch(spec["input_dim"], spec["widths"][-1], spec["batch_per_replica"])
        runners = {}
        for name, (model, optimizer) in pairs.items():
            step = make_step(model, optimizer, N * spec["batch_per_replica"])
            # Fetching one replica's loss waits for the whole step: every
            # replica's update joins the final all-gather / all-reduce.
            runners[name] = (lambda step=step: STRATEGY.experimental_local_results(step(x, y))[0].numpy())
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
    unknown = set(tasks) - {"memory", "collectives", "bytes", "timing"}
    if unknown:
        sys.exit(f"unknown task(s) {sorted(unknown)}")
    result = {"replicas": N, "strategy": "MirroredStrategy", "devices": list(STRATEGY.extended.worker_devices)}
    started = time.perf_counter()
    if "memory" in tasks:
        result["memory"] = task_memory()
    if "collectives" in tasks:
        result["collectives"] = task_collectives([int(s) for s in ARGS.collective_sizes.split(",") if s])
    if "bytes" in tasks and N > 1:
        result["bytes"] = task_bytes()
    if "timing" in tasks:
        result["timing"] = task_timing([m for m in ARGS.timing_models.split(",") if m])
    result["elapsed_s"] = time.perf_counter() - started
    with open(ARGS.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
