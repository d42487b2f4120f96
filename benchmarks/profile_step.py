"""Where a worker's step time goes, one process per worker (the set-up that
transfers to a cluster): MultiWorkerMirroredStrategy through the local
launcher, one compute thread per worker (intra- and inter-op, as
benchmarks/mwms_worker.py).

    python -m distadam.launch --nproc 2 benchmarks/profile_step.py --model dense_update_bound \
        [--variants forward_backward,keras_adam,sharded] [--out results/profile_mwms_n2_dense_update_bound.json]

For each variant rank 0 reports the interleaved step time (median, IQR) and a
tf.profiler trace of a few steps summarised by op type (self time on this
worker's threads; ``IDLE`` is time the executor waited, mostly for peers in a
collective). ``forward_backward`` computes the gradients and nothing else:
the floor every optimizer shares. Variants ``sharded:<kwargs-json>`` time
ShardedAdam with other arguments, e.g. ``sharded:{"bucket_elements": null}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from harness import models, profiler, steps, timing

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="dense_update_bound")
parser.add_argument("--variants", default="forward_backward;keras_adam;sharded",
                    help="semicolon-separated: forward_backward, keras_adam, sharded[:kwargs-json]")
parser.add_argument("--repetitions", type=int, default=7)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--profile-steps", type=int, default=5)
parser.add_argument("--top", type=int, default=12)
parser.add_argument("--no-trace", action="store_true", help="time only, no tf.profiler trace")
parser.add_argument("--inter-op-threads", type=int, default=1,
                    help="TensorFlow inter-op threads (default 1, as the benchmark; 0: TensorFlow's default)")
parser.add_argument("--out", default=None)
ARGS = parser.parse_args()
steps.quiet_tensorflow()

import keras  # noqa: E402

import distadam  # noqa: E402

STRATEGY, N, RANK = steps.multiprocess_worker(ARGS.inter_op_threads)
SPEC = models.MULTIPROCESS_MODELS[ARGS.model]


def make_variant(label):
    name, _, kwargs = label.partition(":")
    with STRATEGY.scope():
        model = SPEC["make"]()
        if name == "forward_backward":
            optimizer = None
        elif name == "keras_adam":
            optimizer = keras.optimizers.Adam()
        elif name == "sharded":
            optimizer = distadam.ShardedAdam(**(json.loads(kwargs) if kwargs else {}))
        else:
            raise SystemExit(f"unknown variant {label!r}")
        if optimizer is not None:
            optimizer.build(model.trainable_variables)
    return steps.multiprocess_step(STRATEGY, model, optimizer, SPEC["batch"] * N)


def main():
    labels = [label for label in ARGS.variants.split(";") if label]
    x, y = steps.multiprocess_batch(STRATEGY, SPEC, RANK)
    runners = {label: steps.runner(STRATEGY, make_variant(label), x, y) for label in labels}
    samples = timing.interleaved_timing(runners, ARGS.repetitions, ARGS.steps, ARGS.warmup)
    baseline = "keras_adam" if "keras_adam" in samples else labels[0]
    result = {"workers": N, "model": ARGS.model, "per_worker_batch": SPEC["batch"],
              "times": {k: timing.time_stats(v) for k, v in samples.items()},
              "ratio_to_" + baseline: {k: timing.ratio_stats(v, samples[baseline]) for k, v in samples.items()}}
    result["profile"] = {}
    if not ARGS.no_trace:
        with tempfile.TemporaryDirectory(prefix=f"distadam-profile-{RANK}-") as logdir:
            result["profile"] = {label: profiler.op_profile(runners[label], Path(logdir) / f"v{i}",
                                                            ARGS.profile_steps, ARGS.top)
                                 for i, label in enumerate(labels)}
    if RANK != 0:
        return
    print(f"N={N} {ARGS.model}, per-worker batch {SPEC['batch']}: step time, ratio to {baseline} [IQR]")
    for label in labels:
        r = result["ratio_to_" + baseline][label]
        print(f"  {label:<40} {1e3 * result['times'][label]['median_s']:8.1f} ms  "
              f"{r['median']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}]")
    for label, prof in result["profile"].items():
        if "error" in prof:
            print(f"\n{label}: {prof['error']}")
            continue
        print(f"\n{label}: {prof['busy_ms_per_step']:.1f} ms busy per step (+{prof['idle_ms_per_step']:.1f} ms idle)")
        for row in prof["by_op"]:
            print(f"  {row['op'][:70]:<70} {row['ms_per_step']:7.2f} ms")
    if ARGS.out:
        Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ARGS.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
