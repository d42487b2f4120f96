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

``--variants 'g4={"shard_group_size": 4};g2={"shard_group_size": 2}'`` times
those ShardedAdam variants (label=kwargs-json) on every model instead of the
per-model defaults; ``--floors grads_only`` keeps only some floors;
``--net-bytes eth0`` (an emulated node's interface under ``distadam launch
--nodes``, read from /proc/self/net/dev) also counts the bytes that
interface sends and receives per step, for every timed variant, on the first
worker of each node (one node's total: traffic between a node's own workers
stays on loopback). benchmarks/emulated_cluster_steps.py runs it so.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from harness import accounting, collectives, models, steps, timing

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default="dense_update_bound,dense_compute_bound,embedding,transformer")
parser.add_argument("--repetitions", type=int, default=11)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--inter-op-threads", type=int, default=1,
                    help="TensorFlow inter-op threads (default 1; 0: TensorFlow's default, one per core)")
parser.add_argument("--floors", default="grads_only,keras_collectives,sharded_collectives",
                    help="communication floors to time (comma-separated; default all three)")
parser.add_argument("--no-floors", dest="floors", action="store_const", const="",
                    help="skip the communication floors (gradients alone; gradients + each optimizer's collectives)")
parser.add_argument("--variants", default=None,
                    help="ShardedAdam variants for every model, 'label=kwargs-json;...' "
                         "(default: the per-model variants below)")
parser.add_argument("--net-bytes", default=None, metavar="IFACE",
                    help="also count IFACE's tx/rx bytes per step for every timed variant, per node")
parser.add_argument("--net-bytes-steps", type=int, default=5)
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
if ARGS.variants:
    VARIANTS = dict((label, json.loads(kwargs or "{}")) for label, _, kwargs in
                    (item.partition("=") for item in ARGS.variants.split(";") if item))
    MODEL_VARIANTS = {}
FLOOR_NAMES = tuple(f for f in ARGS.floors.split(",") if f)
WORKERS_PER_NODE = int(os.environ.get("DISTADAM_WORKERS_PER_NODE", "0")) or N


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
    for variant in MODEL_VARIANTS.get(name, tuple(VARIANTS) if ARGS.variants else ("default",)):
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
        hybrid = sharded and optimizer.shard_group_size not in (None, N)
        info[label] = {
            "state_bytes": state_bytes(optimizer, model),
            "params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
            # ring_bytes counts every call over all N workers: not a hybrid step's.
            "bytes_sent_per_step": None if hybrid else
            ring_bytes(recorder.calls) if sharded else keras_bytes(model, sparse_rows),
            "variables": [{"path": v.path, "shape": [int(d) for d in v.shape], "dtype": str(v.dtype)}
                          for v in model.trainable_variables],
        }
        if sharded:
            info[label]["launches_per_step"] = dict(optimizer.collectives.launches)
            info[label]["buckets"] = [{"elements": b.num_elements, "placement": "replicated" if b.replicated else "sharded"}
                                      for b in optimizer.layout.buckets]
    floor_launches = None
    if FLOOR_NAMES:
        floor_steps, floor_launches = floor_runners(spec, x, y)
        runners.update(floor_steps)
    samples = timing.interleaved_timing(runners, ARGS.repetitions, ARGS.steps, ARGS.warmup)
    net_bytes = count_net_bytes(runners) if ARGS.net_bytes else None
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
    if net_bytes is not None:
        result["net_bytes_per_step"] = net_bytes
    return result


def read_counters():
    """[tx_bytes, rx_bytes] of ARGS.net_bytes in this process's network
    namespace: /proc/self/net/dev (/sys/class/net shows the namespace that
    mounted sysfs, not the node's)."""
    with open("/proc/self/net/dev") as handle:
        for line in handle:
            name, _, fields = line.partition(":")
            if fields and name.strip() == ARGS.net_bytes:
                values = fields.split()
                return [float(values[8]), float(values[0])]
    raise SystemExit(f"no interface {ARGS.net_bytes!r} in this network namespace (/proc/self/net/dev)")


def count_net_bytes(runners):
    """Bytes ARGS.net_bytes sent and received per step while each runner ran
    ARGS.net_bytes_steps steps alone (after one untimed step, so the
    previous runner's traffic has drained), read on every worker and
    gathered; per node, the first worker's reading (the interface is the
    node's, shared by its workers). Edges: a peer may still be sending the
    last step's tail when the counter is read (a few percent of one step's
    traffic over ARGS.net_bytes_steps steps)."""
    import tensorflow as tf

    local = []
    for label, run in runners.items():
        run()
        before = read_counters()
        for _ in range(ARGS.net_bytes_steps):
            run()
        after = read_counters()
        local += [(a - b) / ARGS.net_bytes_steps for a, b in zip(after, before)]

    # Gathered as a sum of per-rank rows (a cross-replica reduce).
    mine = np.zeros((N, len(local)))
    mine[RANK] = local
    values = STRATEGY.experimental_distribute_values_from_function(lambda ctx: tf.constant(mine, tf.float64))
    table = STRATEGY.reduce("SUM", values, axis=None).numpy()
    nodes = {}
    for node, row in enumerate(table[::WORKERS_PER_NODE]):
        for i, label in enumerate(runners):
            nodes.setdefault(label, []).append({"node": node, "tx": float(row[2 * i]), "rx": float(row[2 * i + 1])})
    return {"interface": ARGS.net_bytes, "steps": ARGS.net_bytes_steps, "workers_per_node": WORKERS_PER_NODE,
            "per_variant": nodes}


# Steps timed next to the optimizers, interleaved with them: forward/backward
# alone, and forward/backward + each optimizer's collectives without its math
# (steps.multiprocess_exchange_step). What a step costs beyond its
# communication floor is the optimizer's own work.
FLOORS = ("grads_only", "keras_collectives", "sharded_collectives")


def floor_runners(spec, x, y):
    runners, launches = {}, None
    for label in FLOOR_NAMES:
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
    unknown = set(FLOOR_NAMES) - set(FLOORS)
    if unknown:
        raise SystemExit(f"unknown floors {sorted(unknown)}; expected some of {', '.join(FLOORS)}")
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
