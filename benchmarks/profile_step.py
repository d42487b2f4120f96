"""Where the step time goes at N=4 (or --replicas) on the update-bound model,
and what two hot-path changes would buy. Prototypes live here (subclasses), not in distadam.

    python benchmarks/profile_step.py [--replicas 4] [--repetitions 9] [--out results/profile_n4.json]

Measured side by side in one process, interleaved like run_all.py:

* ``forward_backward``: the model's gradients only (no optimizer, no
  communication): the floor every variant shares;
* ``keras_adam``: Keras' Adam (packed all-reduce + N full Adam updates);
* ``sharded``: ShardedAdam as shipped;
* ``sharded+direct_gather``: the all-gather of equal shards issued as one
  CollectiveGatherV2 through the strategy's launcher, instead of
  ``ReplicaContext.all_gather``, which first all-gathers the shapes, pads, and
  re-concatenates (one collective and two bucket copies saved);
* ``sharded+all_to_all``: reduce-scatter as CollectiveAllToAllV2 + a local
  sum (Ψ(N−1)/N bytes per worker) instead of all-reduce + slice (2Ψ(N−1)/N);
* ``sharded+all``: both together;
* ``sharded+no_skip``: ``ShardedAdam(skip_nonfinite=False)``, the price of the
  global non-finite check (an is_finite pass, and tf.where over the shard's
  parameters and every state kind).

A tf.profiler trace of ``keras_adam``, ``sharded`` and ``sharded+all`` is summarised by op type
(self time over all replicas' threads) to show where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--replicas", type=int, default=4)
parser.add_argument("--model", default="update_bound")
parser.add_argument("--repetitions", type=int, default=9)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--profile-steps", type=int, default=5)
parser.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/profile_n<N>.json)")
ARGS = parser.parse_args()
if ARGS.out is None:
    ARGS.out = str(Path(__file__).resolve().parent / "results" / f"profile_n{ARGS.replicas}.json")

import harness  # noqa: E402

harness.use_logical_cpus(ARGS.replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.distribute import collective_util, distribute_utils, values as value_lib  # noqa: E402
from tensorflow.python.ops import collective_ops  # noqa: E402

import distadam  # noqa: E402
from distadam.collectives.tf_distribute import DistributeCollectives  # noqa: E402

N = ARGS.replicas
STRATEGY = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(N)])
SPEC = harness.MODELS[ARGS.model]


# ------------------------------------------------------------- prototypes
def _launchers(strategy, value):
    cross_ops = strategy.extended._get_cross_device_ops(value)  # CollectiveAllReduce
    return cross_ops, cross_ops._launchers


class FastCollectives(DistributeCollectives):
    """MirroredStrategy-only prototype: equal-shard all-gather and all-to-all
    reduce-scatter through the strategy's own collective launchers (same group
    and instance keys, same ordering tokens as its other collectives)."""

    direct_gather = True
    all_to_all = True

    def _all_gather(self, shard, name):
        if self.num_workers == 1 or not self.direct_gather:
            return super()._all_gather(shard, name)

        def merge_fn(strategy, per_replica):
            cross_ops, launchers = _launchers(strategy, per_replica)
            options = collective_util.Options()
            with cross_ops._lock, tf.name_scope("direct_allgather"):
                outs = [launchers[i]._all_gather(per_replica.values[i], options) for i in range(len(launchers))]
            return distribute_utils.regroup(outs, wrap_class=value_lib.Mirrored)

        return self._context().merge_call(merge_fn, args=(shard,))

    def _reduce_scatter_sum(self, flat, name):
        if self.num_workers == 1 or not self.all_to_all:
            return super()._reduce_scatter_sum(flat, name)
        n = self.num_workers

        def merge_fn(strategy, per_replica):
            cross_ops, launchers = _launchers(strategy, per_replica)
            outs = []
            with cross_ops._lock, tf.name_scope("alltoall_reduce_scatter"):
                for i, launcher in enumerate(launchers):
                    with tf.device(launcher._device):
                        rows = tf.reshape(per_replica.values[i], [n, -1])
                        exchanged = collective_ops.all_to_all_v2(
                            rows, launcher._group_size, launcher._group_key, launcher._next_instance_key(),
                            ordering_token=launcher._get_ordering_token())
                        outs.append(tf.reduce_sum(exchanged, axis=0))
            return distribute_utils.regroup(outs, wrap_class=value_lib.Mirrored)

        return self._context().merge_call(merge_fn, args=(flat,))


def fast_collectives(direct_gather, all_to_all):
    cls = type("Fast", (FastCollectives,), {"direct_gather": direct_gather, "all_to_all": all_to_all})
    return cls


# -------------------------------------------------------------- variants
RECORDERS = {}


def make_variant(name):
    with STRATEGY.scope():
        model = harness.mlp(SPEC["input_dim"], SPEC["widths"])
        if name == "forward_backward":
            optimizer = None
        elif name == "keras_adam":
            optimizer = keras.optimizers.Adam()
        else:
            parts = set(name.split("+")[1:]) if "+" in name else set()
            if "all" in parts:
                parts = {"direct_gather", "all_to_all"}
            optimizer = distadam.ShardedAdam(skip_nonfinite="no_skip" not in parts)
        if optimizer is not None:
            optimizer.build(model.trainable_variables)
            if isinstance(optimizer, distadam.ShardedAdam) and {"direct_gather", "all_to_all"} & parts:
                optimizer.collectives.__class__ = fast_collectives("direct_gather" in parts, "all_to_all" in parts)
            if isinstance(optimizer, distadam.ShardedAdam):
                # Before the first trace, so the byte accounting sees every call.
                RECORDERS[name] = harness.CallRecorder(optimizer.collectives)
    global_batch = N * SPEC["batch_per_replica"]

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                per_example = tf.reduce_mean(tf.square(model(x, training=True) - y), axis=-1)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            if optimizer is None:
                # Consume every gradient so none of the backward pass is pruned.
                return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return STRATEGY.run(replica_fn, args=(x, y))

    return model, optimizer, step


VARIANTS = ["forward_backward", "keras_adam", "sharded", "sharded+direct_gather", "sharded+all_to_all",
            "sharded+all", "sharded+no_skip"]


def distributed_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, SPEC["batch_per_replica"], SPEC["input_dim"])).astype("float32")
    y = rng.normal(size=(N, SPEC["batch_per_replica"], SPEC["widths"][-1])).astype("float32")
    return STRATEGY.experimental_distribute_values_from_function(
        lambda ctx: (tf.constant(x[ctx.replica_id_in_sync_group]), tf.constant(y[ctx.replica_id_in_sync_group])))


def check_equivalence(variants, x, y):
    """The prototypes must compute exactly what ShardedAdam computes."""
    reference = variants["sharded"]
    for _ in range(3):
        for name, (_, optimizer, step) in variants.items():
            if optimizer is not None and name.startswith("sharded"):
                step(x, y)
    worst = {}
    for name, (model, optimizer, _) in variants.items():
        if name.startswith("sharded+"):
            worst[name] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                              for a, b in zip(model.get_weights(), reference[0].get_weights()))
    return worst


def op_profile(step, x, y, label, logdir):
    """Self time per op type from a tf.profiler trace of a few steps."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    path = Path(logdir) / label
    tf.profiler.experimental.start(str(path))
    for _ in range(ARGS.profile_steps):
        STRATEGY.experimental_local_results(step(x, y))[0].numpy()
    tf.profiler.experimental.stop()
    xplanes = [str(p) for p in path.rglob("*.xplane.pb")]
    data, ok = plugin.xspace_to_tools_data(xplanes, "framework_op_stats", {})
    if not ok:
        return {"error": "profiler plugin could not convert the trace"}
    table = json.loads(data)
    if isinstance(table, list):  # [host table, device table]; CPU ops are on the host
        table = table[0]
    columns = [c["id"] for c in table["cols"]]
    totals = {}
    for row in table["rows"]:
        cells = dict(zip(columns, (c.get("v") for c in row["c"])))
        op_type = cells.get("type") or cells.get("operation")
        totals[op_type] = totals.get(op_type, 0.0) + float(cells.get("total_self_time") or 0.0)
    # IDLE is the profiler's name for threads waiting (here mostly replicas
    # blocked in a collective for their peers): reported, not ranked.
    idle = totals.pop("IDLE", 0.0)
    busy = sum(totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:14]
    per_step = 1e3 * ARGS.profile_steps  # profiler times are in microseconds
    return {
        "busy_ms_per_step": busy / per_step,
        "idle_ms_per_step": idle / per_step,
        "by_op_type": [{"op": k, "ms_per_step": v / per_step, "share_of_busy": v / busy} for k, v in top],
    }


def main():
    x, y = distributed_batch()
    variants = {name: make_variant(name) for name in VARIANTS}
    equivalence = check_equivalence(variants, x, y)
    runners = {name: (lambda step=step: STRATEGY.experimental_local_results(step(x, y))[0].numpy())
               for name, (_, _, step) in variants.items()}
    started = time.perf_counter()
    samples = harness.interleaved_timing(runners, ARGS.repetitions, ARGS.steps, ARGS.warmup)
    param_bytes = harness.model_summary(variants["sharded"][0])["param_bytes"]
    comm = {}
    for name, (_, optimizer, step) in variants.items():
        if optimizer is None:
            continue
        graph = step.get_concrete_function(x, y).graph
        ops = harness.fill_dynamic_sizes(harness.traced_collectives(graph), RECORDERS.get(name))
        summary = harness.collective_summary(ops, workers_in_graph=N, n=N)
        summary["ratio_to_bound"] = summary["bytes_sent_per_worker"] / harness.allreduce_bound(param_bytes, N)
        comm[name] = summary
    result = {
        "replicas": N, "model": ARGS.model, "collectives": comm, "params": harness.model_summary(variants["sharded"][0])["params"],
        "batch_per_replica": SPEC["batch_per_replica"],
        "max_abs_weight_difference_vs_sharded": equivalence,
        "times": {name: harness.time_stats(s) for name, s in samples.items()},
        "ratio_to_keras_adam": {name: harness.ratio_stats(s, samples["keras_adam"]) for name, s in samples.items()},
        "ratio_to_sharded": {name: harness.ratio_stats(s, samples["sharded"]) for name, s in samples.items()},
        "timing_s": time.perf_counter() - started,
    }
    with tempfile.TemporaryDirectory(prefix="distadam-profile-") as logdir:
        result["profile"] = {name: op_profile(variants[name][2], x, y, name.replace("+", "_"), logdir)
                             for name in ("keras_adam", "sharded", "sharded+all")}
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"N={N} {ARGS.model}: step-time ratio to keras Adam, median [q25, q75]")
    for name in VARIANTS:
        r = result["ratio_to_keras_adam"][name]
        print(f"  {name:<24} {1e3 * result['times'][name]['median_s']:7.1f} ms   "
              f"{r['median']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}]")
    print("max |weights - ShardedAdam| after 3 steps:", equivalence)
    print("\ncollective launches per step (graph) and bytes sent per worker / 2Ψ(N-1)/N:")
    for name, summary in result["collectives"].items():
        print(f"  {name:<24} {summary['total_launches_per_step']} {summary['launches_per_step']}  "
              f"bytes ratio {summary['ratio_to_bound']:.3f}")
    for name, prof in result["profile"].items():
        if "error" in prof:
            print(f"\n{name}: {prof['error']}")
            continue
        print(f"\n{name}: {prof['busy_ms_per_step']:.1f} ms busy op time per step summed over replica "
              f"threads (+{prof['idle_ms_per_step']:.1f} ms idle/waiting)")
        for row in prof["by_op_type"][:10]:
            print(f"  {row['op']:<28} {row['ms_per_step']:7.2f} ms  {100 * row['share_of_busy']:5.1f}%")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
