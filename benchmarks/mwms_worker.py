"""Multi-process benchmark worker: one process per worker under
MultiWorkerMirroredStrategy, started by the local launcher, one compute thread
each, the way a cluster runs (one device per worker). Both optimizers train
their own copy of the model on the same strategy, in interleaved blocks, so
the machine's drift hits both alike. Rank 0 writes the JSON.

    python -m distadam.launch --nproc 2 benchmarks/mwms_worker.py --out result.json

Models (per worker batch): ``dense_update_bound`` (MLP 64-1024-1024-1024-256,
2.4M params, batch 2), ``dense_compute_bound`` (MLP 64-512-256-256-16, 0.23M
params, batch 256), ``embedding`` (Embedding(200k, 32) -> mean of 16 ids ->
Dense 64 -> 8, sparse gradients, batch 32), ``transformer`` (one pre-norm
Transformer block: 4-head self-attention + MLP, LayerNorms, d=128, length 64,
batch 8).
"""

from __future__ import annotations

import argparse
import json
import time

from harness import accounting, collectives, models, steps, timing

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default="dense_update_bound,dense_compute_bound,embedding,transformer")
parser.add_argument("--repetitions", type=int, default=11)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--inter-op-threads", type=int, default=1,
                    help="TensorFlow inter-op threads (default 1; 0: TensorFlow's default, one per core)")
parser.add_argument("--no-floors", dest="floors", action="store_false",
                    help="skip the communication floors (gradients alone; gradients + each optimizer's collectives)")
parser.add_argument("--out", required=True)
ARGS = parser.parse_args()
steps.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import distadam  # noqa: E402
from distadam import cost_model  # noqa: E402

STRATEGY, N, RANK = steps.multiprocess_worker(ARGS.inter_op_threads)

# ShardedAdam variants timed against Keras Adam, per model: the defaults, for
# the embedding model the other placement of the table's state (the default
# keeps it whole), and for the small compute-bound model its one bucket kept
# whole (min_shard_elements above its size).
VARIANTS = {
    "default": {},
    "table_sharded": {"replicate": []},
    "small_buckets_whole": {"min_shard_elements": 1 << 20},
}
MODEL_VARIANTS = {"embedding": ("default", "table_sharded"), "dense_compute_bound": ("default", "small_buckets_whole")}


def state_bytes(optimizer, model):
    return sum(accounting.optimizer_state_bytes(optimizer, model.trainable_variables).values())


def ring_bytes(calls):
    """Bytes each worker sends per step for the backend calls recorded while
    tracing one step (distadam.cost_model's ring table)."""
    return sum(cost_model.bytes_sent(kind, N, nbytes) for kind, nbytes in calls)


def keras_bytes(model, grads_sparse_rows):
    """Keras Adam under MultiWorkerMirroredStrategy: one all-reduce of the
    dense gradients, and an all-gather of each sparse gradient's rows
    (values and int32 indices)."""
    dense = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables if v.path not in grads_sparse_rows)
    rows = sum(cost_model.sparse_rows_bytes(count, width, 4) for count, width in grads_sparse_rows.values())
    return cost_model.bytes_sent("all_reduce", N, dense) + cost_model.bytes_sent("all_gather", N, rows)


def time_model(name):
    spec = models.MULTIPROCESS_MODELS[name]
    runners, info = {}, {}
    x, y = steps.multiprocess_batch(STRATEGY, spec, RANK)
    optimizers = {"adam": lambda: keras.optimizers.Adam()}
    for variant in MODEL_VARIANTS.get(name, ("default",)):
        optimizers[variant] = lambda v=variant: distadam.ShardedAdam(**VARIANTS[v])
    sparse_rows = {}
    for label, make_optimizer in optimizers.items():
        with STRATEGY.scope():
            model = spec["make"]()
            optimizer = make_optimizer()
            optimizer.build(model.trainable_variables)
        if name == "embedding":
            # The table's gradient: one row per id in the worker's batch.
            table = next(v for v in model.trainable_variables if "embeddings" in v.path)
            sparse_rows = {table.path: (spec["batch"] * spec["x"][1][0], int(table.shape[1]))}
        sharded = isinstance(optimizer, distadam.ShardedAdam)
        recorder = collectives.CallRecorder(optimizer.collectives) if sharded else None
        step = steps.multiprocess_step(STRATEGY, model, optimizer, spec["batch"] * N)
        runners[label] = steps.runner(STRATEGY, step, x, y)
        runners[label]()  # trace (and record the collectives) once, outside the timing
        info[label] = {
            "state_bytes": state_bytes(optimizer, model),
            "params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
            "bytes_sent_per_step": ring_bytes(recorder.calls) if sharded else keras_bytes(model, sparse_rows),
        }
        if sharded:
            info[label]["launches_per_step"] = dict(optimizer.collectives.launches)
            info[label]["buckets"] = [{"elements": b.num_elements, "placement": "replicated" if b.replicated else "sharded"}
                                      for b in optimizer.layout.buckets]
    floor_launches = None
    if ARGS.floors:
        floor_steps, floor_launches = floor_runners(spec, x, y)
        runners.update(floor_steps)
    samples = timing.interleaved_timing(runners, ARGS.repetitions, ARGS.steps, ARGS.warmup)
    floors = {k: samples.pop(k) for k in FLOORS if k in samples}
    result = {"workers": N, "per_worker_batch": spec["batch"], "optimizers": info,
              "times": {k: timing.time_stats(v) for k, v in samples.items()},
              "ratios": {k: timing.ratio_stats(samples[k], samples["adam"]) for k in samples if k != "adam"},
              "samples": samples}
    if floors:
        result["floors"] = {
            "times": {k: timing.time_stats(v) for k, v in floors.items()},
            # The best ratio ShardedAdam's collectives allow (a free update),
            # and where Keras Adam's own collectives put it.
            "ratios": {k: timing.ratio_stats(v, samples["adam"]) for k, v in floors.items()},
            "samples": floors,
            # The collectives the floor traced: the same as ShardedAdam's step.
            "sharded_collectives_launches": floor_launches,
        }
    return result


# Steps timed next to the optimizers, interleaved with them: forward/backward
# alone, and forward/backward + each optimizer's collectives without its math
# (steps.multiprocess_exchange_step). What a step costs beyond its
# communication floor is the optimizer's own work.
FLOORS = ("grads_only", "keras_collectives", "sharded_collectives")


def floor_runners(spec, x, y):
    runners = {}
    for label in FLOORS:
        with STRATEGY.scope():
            model = spec["make"]()
            optimizer = distadam.ShardedAdam() if label == "sharded_collectives" else None
            if optimizer is not None:
                optimizer.build(model.trainable_variables)
        if label == "grads_only":
            step = steps.multiprocess_step(STRATEGY, model, None, spec["batch"] * N)
        else:
            exchange = steps.keras_exchange if optimizer is None else steps.sharded_exchange(optimizer)
            step = steps.multiprocess_exchange_step(STRATEGY, model, spec["batch"] * N, exchange)
        runners[label] = steps.runner(STRATEGY, step, x, y)
        runners[label]()  # trace once, outside the timing
        if optimizer is not None:
            launches = dict(optimizer.collectives.launches)
    return runners, launches


def main():
    started = time.perf_counter()
    results = {"workers": N, "models": {}}
    for name in ARGS.models.split(","):
        results["models"][name] = time_model(name)
        if RANK == 0:
            ratios = results["models"][name]["ratios"]
            floors = results["models"][name].get("floors", {}).get("ratios", {})
            print(f"[mwms N={N}] {name}: " + ", ".join(
                f"{k} {v['median']:.3f} [{v['q25']:.3f}, {v['q75']:.3f}]" for k, v in {**ratios, **floors}.items()),
                flush=True)
    results["elapsed_s"] = time.perf_counter() - started
    if RANK == 0:
        with open(ARGS.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
