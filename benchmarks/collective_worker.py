"""Collective timing worker: one process per worker under
MultiWorkerMirroredStrategy (started by the local launcher, one compute thread
each), timing the three collectives ShardedAdam's tf.distribute backend issues
in a step, through that backend itself (``DistributeCollectives``: the direct
path's all-to-all + local sum for ``reduce_scatter_sum``, its equal-shard
``all_gather``, the strategy's ``all_reduce``), each called inside
``strategy.run`` in a ``tf.function`` as the optimizer calls them. Rank 0
writes the JSON; ``benchmarks/run_all.py`` fits the planner's ``local-cpu``
alpha-beta parameters to it (``distadam.cost_model.fit_alpha_beta``).

    python -m distadam.launch --nproc 2 --timeout 300 benchmarks/collective_worker.py --out c.json

Sizes are the collective's full buffer S in float32 elements (the all-reduce
input, the reduce-scatter input, the all-gather output), rounded up to a
multiple of N so every worker's shard is equal, as a ShardedAdam bucket is.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

from harness import steps

KINDS = ("all_reduce", "reduce_scatter", "all_gather")
MAX_ELEMENTS = 1 << 24  # 64 MB of float32 per buffer: plenty for a 2-core host


def _bounded(low, high):
    def parse(text):
        if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text[:40]!r}")
        return int(text)
    return parse


def _sizes(text):
    parts = text.split(",")
    if not 1 <= len(parts) <= 32:
        raise argparse.ArgumentTypeError("expected 1 to 32 comma-separated sizes")
    return [_bounded(1, MAX_ELEMENTS)(part) for part in parts]


def _kinds(text):
    kinds = text.split(",")
    if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"expected distinct kinds among {','.join(KINDS)}, got {text[:60]!r}")
    return kinds


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sizes", type=_sizes, default=[1 << k for k in range(10, 23, 2)],
                    help="comma-separated buffer sizes in float32 elements (default 2**10, 2**12, ..., 2**22)")
parser.add_argument("--kinds", type=_kinds, default=list(KINDS))
parser.add_argument("--repetitions", type=_bounded(1, 1000), default=15, help="timed calls per (kind, size), in rounds")
parser.add_argument("--warmup", type=_bounded(1, 100), default=2, help="untimed calls first (tracing, buffers)")
parser.add_argument("--out", required=True)
ARGS = parser.parse_args()
steps.quiet_tensorflow()

import tensorflow as tf  # noqa: E402

from distadam.collectives.tf_distribute import DistributeCollectives  # noqa: E402

# inter_op_threads=1: ops one at a time, collectives on their own threads, as
# in the step benchmark (mwms_worker.py), so both measure the same set-up.
STRATEGY, N, RANK = steps.multiprocess_worker(1)
# One tf.function per (kind, size) is the point here, not accidental
# retracing: silence TensorFlow's warning about it.
tf.get_logger().setLevel("ERROR")
COLLECTIVES = DistributeCollectives(STRATEGY)


def buffers(kind, size):
    """(input elements per worker, full buffer S) for one call."""
    shard = -(-size // N)
    full = shard * N
    if kind == "all_gather":
        return shard, full
    return full, full


def expected_first(kind):
    # Worker r contributes r + 1 everywhere: the sum is N(N+1)/2, and the
    # gathered buffer starts with worker 0's shard (1.0).
    return 1.0 if kind == "all_gather" else N * (N + 1) / 2


def call(kind, tensor):
    if kind == "all_reduce":
        return COLLECTIVES.all_reduce_sum(tensor, name="bench_all_reduce")
    if kind == "reduce_scatter":
        return COLLECTIVES.reduce_scatter_sum(tensor, name="bench_reduce_scatter")
    return COLLECTIVES.all_gather(tensor, name="bench_all_gather")


def prepare(kind, size):
    """A traced, warmed-up, checked call of one collective on one size."""
    elements_in, full = buffers(kind, size)
    value = STRATEGY.experimental_distribute_values_from_function(
        lambda ctx: tf.fill([elements_in], tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)))

    @tf.function
    def run(v):
        # tf.identity puts the replica's input on its device, where the
        # strategy's collectives look for their destinations.
        return STRATEGY.run(lambda t: call(kind, tf.identity(t)), args=(v,))

    for _ in range(ARGS.warmup):
        out = run(value)
    local = STRATEGY.experimental_local_results(out)[0]
    # A wrong collective must not produce a plausible time.
    expected_len = full // N if kind == "reduce_scatter" else full
    first = float(local[0])
    if int(local.shape[0]) != expected_len or first != expected_first(kind):
        raise RuntimeError(f"{kind} of {full}: got {int(local.shape[0])} elements starting {first}, expected "
                           f"{expected_len} starting {expected_first(kind)}")
    return {"kind": kind, "requested_elements": size, "elements": full, "bytes": 4 * full,
            "run": lambda: run(value)}


def main():
    started = time.perf_counter()
    cells = [prepare(kind, size) for size in ARGS.sizes for kind in ARGS.kinds]
    times = [[] for _ in cells]
    # Rounds over every (kind, size), alternating direction, instead of all
    # repetitions of one cell in a row: a burst of load from other jobs on
    # the shared machine then lands on many cells a little, not on one cell
    # entirely, and the median of each cell stays comparable with the rest.
    for round_index in range(ARGS.repetitions):
        order = range(len(cells)) if round_index % 2 == 0 else reversed(range(len(cells)))
        for i in order:
            # A CPU tf.function call returns when its ops have run; each
            # call's collective also lines the workers up for the next one.
            begin = time.perf_counter()
            cells[i]["run"]()
            times[i].append(time.perf_counter() - begin)
    rows = []
    for cell, samples in zip(cells, times):
        row = {k: v for k, v in cell.items() if k != "run"}
        row.update(median_s=statistics.median(samples), min_s=min(samples), times_s=samples)
        rows.append(row)
        if RANK == 0:
            print(f"[collectives N={N}] {row['kind']} {row['elements']}: {1e3 * row['median_s']:.2f} ms", flush=True)
    result = {"workers": N, "direct_collectives": COLLECTIVES.uses_direct_collectives, "dtype": "float32",
              "repetitions": ARGS.repetitions, "rows": rows, "elapsed_s": time.perf_counter() - started}
    if RANK == 0:
        with open(ARGS.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
