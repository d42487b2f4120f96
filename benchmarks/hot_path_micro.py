"""Side-by-side timings of three pieces of ShardedAdam's step on one CPU
thread, each against the way it was done before (what the numbers in
README.md's "How one step works" and benchmarks/README.md come from):

* **row sum**: the local half of a reduce-scatter done as an all-to-all,
  the sum of the N received rows: ``tf.reduce_sum(rows, axis=0)`` (a column
  reduction) against ``tf.add_n(tf.unstack(rows))``
  (:func:`distadam.collectives.base.sum_rows`).
* **split**: the gathered parameters of a bucket into its variables: split
  and finite check inside one XLA function (every element written again)
  against views of the buffer (``tf.split`` along the first dimension) and
  an XLA check that only reads, each followed by the assignments.
* **state**: writing a shard's new m, v: returned by the fused update and
  assigned inside a ``tf.cond`` (store, then copy) against computed again
  after the verdict and written in place into the variables
  (:func:`distadam.shard_update.in_place`).

Repetitions alternate the order of the two variants; each prints the median
of the per-repetition ratios [q25, q75] and the medians in ms.

    .venv/bin/python benchmarks/hot_path_micro.py            # ~1 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from distadam import shard_update  # noqa: E402
from distadam.collectives.base import sum_rows  # noqa: E402


def side_by_side(label, before, after, repetitions, calls):
    """Time ``before`` and ``after`` (callables returning a tensor) in
    alternating order; print and return the ratio after / before."""
    for f in (before, after):
        for _ in range(3):
            np.asarray(f())
    samples = {"before": [], "after": []}
    for rep in range(repetitions):
        order = [("before", before), ("after", after)]
        for name, f in (order if rep % 2 == 0 else order[::-1]):
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                np.asarray(f())
                times.append(time.perf_counter() - start)
            samples[name].append(statistics.median(times))
    ratios = [a / b for a, b in zip(samples["after"], samples["before"])]
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    print(f"{label:44s} after/before {q50:.3f} [{q25:.3f}, {q75:.3f}]   "
          f"before {1e3 * statistics.median(samples['before']):7.2f} ms  "
          f"after {1e3 * statistics.median(samples['after']):7.2f} ms", flush=True)
    return float(q50)


def row_sum(workers, elements, args):
    rows = tf.random.normal([workers, elements // workers])
    before = tf.function(lambda r: tf.reduce_sum(r, axis=0))
    after = tf.function(sum_rows)
    side_by_side(f"row sum [{workers}, {elements // workers}]", lambda: before(rows), lambda: after(rows),
                 args.repetitions, args.calls)


# The update-bound benchmark model's variables (MLP 64-1024-1024-1024-256).
SHAPES = [(64, 1024), (1024,), (1024, 1024), (1024,), (1024, 1024), (1024,), (1024, 256), (256,)]


def split(args):
    sizes = [int(np.prod(s)) for s in SHAPES]
    variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
    flat = tf.random.normal([sum(sizes)])

    def pieces(flat):
        return [tf.reshape(p, s) for p, s in zip(tf.split(flat, sizes), SHAPES)]

    split_and_check = tf.function(
        lambda flat: (pieces(flat), tf.stack([tf.reduce_all(tf.math.is_finite(p)) for p in pieces(flat)])),
        jit_compile=True)
    check = tf.function(lambda flat: tf.stack([tf.reduce_all(tf.math.is_finite(p)) for p in pieces(flat)]),
                        jit_compile=True)

    @tf.function
    def before(flat):
        tensors, finite = split_and_check(flat)
        for variable, tensor in zip(variables, tensors):
            variable.assign(tensor)
        return finite

    @tf.function
    def after(flat):
        finite = check(flat)
        for variable, tensor in zip(variables, pieces(flat)):
            variable.assign(tensor)
        return finite

    side_by_side(f"split {sum(sizes)} gathered elements", lambda: before(flat), lambda: after(flat),
                 args.repetitions, args.calls)


def state(elements, args):
    param = tf.Variable(tf.random.normal([elements]))
    m, v = tf.Variable(tf.zeros([elements])), tf.Variable(tf.zeros([elements]))
    grad = tf.random.normal([elements]) * 1e-3
    ok = tf.constant(True)

    def update(grad, param, state):
        m2 = state["m"] + (grad - state["m"]) * 0.1
        v2 = state["v"] + (grad * grad - state["v"]) * 0.001
        return param - 0.001 * m2 / (tf.sqrt(v2) + 1e-7), {"m": m2, "v": v2}

    fused = tf.function(update, jit_compile=True)
    params_only = tf.function(lambda g, p, s: update(g, p, s)[0], jit_compile=True)
    in_place = tf.function(shard_update.in_place(update), jit_compile=True)

    @tf.function
    def before():
        new_param, new_state = fused(grad, param.value(), {"m": m.value(), "v": v.value()})

        def commit():
            with tf.control_dependencies([m.assign(new_state["m"]), v.assign(new_state["v"])]):
                return tf.constant(True)

        tf.cond(ok, commit, lambda: tf.constant(False))
        param.assign(new_param)
        return ok

    @tf.function
    def after():
        new_param = params_only(grad, param.value(), {"m": m.value(), "v": v.value()})
        with tf.control_dependencies([new_param]):
            in_place({"m": m.handle, "v": v.handle}, {"m": tf.float32, "v": tf.float32}, ok, None, grad,
                     param.value())
        param.assign(new_param)
        return ok

    side_by_side(f"state of a {elements}-element shard", before, after, args.repetitions, args.calls)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=12)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    if not (1 <= args.repetitions <= 1000 and 1 <= args.calls <= 1000):
        parser.error("--repetitions and --calls must be from 1 to 1000")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    print(f"one CPU thread; load average {os.getloadavg()[0]:.2f}", flush=True)
    row_sum(2, 2_400_000, args)
    row_sum(3, 2_400_000, args)
    split(args)
    state(1_200_000, args)
    state(6_400_000, args)


if __name__ == "__main__":
    main()
