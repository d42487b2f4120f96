"""One worker of the capacity benchmark (benchmarks/capacity.py starts it
through the local launcher; one process per worker, MultiWorkerMirroredStrategy).

    python -m distadam launch --nproc 2 benchmarks/capacity_worker.py \\
        --optimizer sharded --width 4096 --depth 4 --out-dir /tmp/trial

Before TensorFlow loads, the worker joins the memory cgroup the runner made
for its rank (``--cgroup-dir``/rank<k>, a memory limit and no swap), so
everything TensorFlow allocates counts against the cap. It then builds an MLP
of ``depth`` square Dense layers of ``width`` (float32), builds the optimizer
eagerly and trains ``--steps`` steps on a batch of ``--batch`` per worker.
Each phase it reaches is appended to ``<out-dir>/rank<k>.phases`` (so a worker
killed for memory shows where), and at the end ``<out-dir>/rank<k>.json``
holds its result and peak RSS (``VmHWM``). ``--optimizer none`` trains
nothing: forward/backward with the gradients consumed, TensorFlow's own
baseline without any optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

#: sharded: ShardedAdam's defaults; sharded_unfused: fused_update=False (no
#: XLA); sharded_4m: bucket_elements=2**22 (16 MiB buckets, the fixed default
#: before "auto").
OPTIMIZERS = ("none", "adam", "sharded", "sharded_unfused", "sharded_4m")


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--optimizer", choices=OPTIMIZERS, required=True)
parser.add_argument("--width", type=positive, required=True)
parser.add_argument("--depth", type=positive, default=4)
parser.add_argument("--batch", type=positive, default=2)
parser.add_argument("--steps", type=positive, default=3)
parser.add_argument("--cgroup-dir", default=None, help="join <dir>/rank<k> (made by the runner) before TensorFlow loads")
parser.add_argument("--out-dir", required=True)
ARGS = parser.parse_args()
RANK = int(os.environ.get("DISTADAM_RANK", "0"))
PHASES = os.path.join(ARGS.out_dir, f"rank{RANK}.phases")
START = time.monotonic()


def proc_status() -> dict:
    """This process's memory lines of /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "VmData", "VmPeak"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def phase(name: str, **extra) -> None:
    with open(PHASES, "a") as out:
        out.write(json.dumps({"phase": name, "seconds": round(time.monotonic() - START, 2), **proc_status(), **extra}) + "\n")


if ARGS.cgroup_dir:
    # "0": the writing process. Charges from before the move stay where they
    # were (a few MB of interpreter); everything TensorFlow does lands here.
    with open(os.path.join(ARGS.cgroup_dir, f"rank{RANK}", "cgroup.procs"), "w") as procs:
        procs.write("0")
phase("joined_cgroup")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import accounting, models, steps  # noqa: E402

steps.quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402

import distadam  # noqa: E402

STRATEGY, N, _ = steps.multiprocess_worker(1)
phase("strategy")

spec = {"batch": ARGS.batch, "x": ("float", (ARGS.width,)), "y": (ARGS.width,)}
x, y = steps.multiprocess_batch(STRATEGY, spec, RANK)
with STRATEGY.scope():
    model = models.mlp(ARGS.width, [ARGS.width] * ARGS.depth)
    if ARGS.optimizer == "adam":
        optimizer = keras.optimizers.Adam()
    elif ARGS.optimizer.startswith("sharded"):
        optimizer = distadam.ShardedAdam(**{"sharded": {}, "sharded_unfused": {"fused_update": False},
                                            "sharded_4m": {"bucket_elements": 1 << 22}}[ARGS.optimizer])
    else:
        optimizer = None
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    phase("model_built", params=params)
    if optimizer is not None:
        optimizer.build(model.trainable_variables)
state_bytes = sum(accounting.optimizer_state_bytes(optimizer, model.trainable_variables).values()) if optimizer else 0
layout = None
if isinstance(optimizer, distadam.ShardedAdam):
    buckets = [b.num_elements for b in optimizer.layout.buckets]
    layout = {"bucket_elements_setting": optimizer.bucket_elements, "buckets": len(buckets),
              "largest_bucket_elements": max(buckets)}
phase("optimizer_built", state_bytes=state_bytes, layout=layout)

run = steps.runner(STRATEGY, steps.multiprocess_step(STRATEGY, model, optimizer, ARGS.batch * N), x, y)
step_seconds = []
for i in range(ARGS.steps):
    began = time.monotonic()
    loss = run()
    step_seconds.append(round(time.monotonic() - began, 3))
    if not np.isfinite(loss):
        raise SystemExit(f"rank {RANK}: non-finite loss {loss} at step {i}")
    phase(f"step{i + 1}", loss=loss)

result = {"rank": RANK, "workers": N, "optimizer": ARGS.optimizer, "width": ARGS.width, "depth": ARGS.depth,
          "batch": ARGS.batch, "params": params, "state_bytes": state_bytes, "layout": layout, "steps_done": len(step_seconds),
          "step_seconds": step_seconds, "seconds": round(time.monotonic() - START, 2), **proc_status()}
with open(os.path.join(ARGS.out_dir, f"rank{RANK}.json"), "w") as out:
    json.dump(result, out)
