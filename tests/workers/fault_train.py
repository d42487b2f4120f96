"""Checkpointed training under any launcher; optionally SIGKILLs itself once.

usage: python fault_train.py CKPT_DIR OUT_PREFIX [KILL_RANK KILL_AT_STEP [kill|stall]]
       DISTADAM_FAULT_BOUND=watchdog (default) | collective-timeout

Resumes from the newest usable checkpoint in CKPT_DIR, trains to step T with a
checkpoint every EVERY steps, writes OUT_PREFIX-rank<r>.npz. With KILL_*, that
rank kills itself with SIGKILL (or, with "stall", hangs without exiting) at
that step, but only on the first attempt (a marker file in CKPT_DIR
remembers), so a restarted job runs through.
"""

import os
import signal
import sys
import time
from pathlib import Path

import common

import distadam  # noqa: E402

# The stall bound: past the first step's tracing (op by op, a few seconds
# even with another job on the 2 cores), short enough that a test's wait for
# it stays small.
T, EVERY, BOUND_SECONDS = 16, 5, 20
# How a stalled peer is bounded: distadam's one-thread watchdog (the default,
# as in examples/train_digits.py) or TensorFlow's per-collective timeout.
BOUND = os.environ.get("DISTADAM_FAULT_BOUND", "watchdog")
strategy = distadam.strategy_from_env(communication_timeout=BOUND_SECONDS if BOUND == "collective-timeout" else None)

import numpy as np  # noqa: E402

from distadam.checkpoint import ShardedCheckpointManager  # noqa: E402
from distadam.watchdog import StallWatchdog  # noqa: E402

ckpt_dir, out_prefix = Path(sys.argv[1]), sys.argv[2]
kill_rank, kill_at = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (None, None)
fault = sys.argv[5] if len(sys.argv) > 5 else "kill"
rank = int(os.environ.get("DISTADAM_RANK", "0"))

with strategy.scope():
    model = common.make_model()
    optimizer = distadam.ShardedAdam(learning_rate=0.01, global_clipnorm=0.05, fused_update=False)
    optimizer.build(model.trainable_variables)
manager = ShardedCheckpointManager(ckpt_dir, model, optimizer, max_to_keep=2)
restored = manager.restore()
start = int(optimizer.iterations.numpy())
print(f"rank {rank}: starting at step {start} from {restored}", flush=True)

(tokens, features), targets = common.make_data(T)


train_step = common.make_train_step(strategy, model, optimizer)


def batch(step):
    """This worker's part of global batch ``step`` (contiguous split by rank)."""
    per_worker = common.GLOBAL_BATCH // strategy.num_replicas_in_sync
    lo = step * common.GLOBAL_BATCH + rank * per_worker
    return (tokens[lo:lo + per_worker], features[lo:lo + per_worker]), targets[lo:lo + per_worker]


marker = ckpt_dir / f"killed-rank{kill_rank}"
watchdog = StallWatchdog(BOUND_SECONDS) if BOUND == "watchdog" else None
for step in range(start, T):
    if rank == kill_rank and step == kill_at and not marker.exists():
        marker.touch()
        if fault == "stall":
            if watchdog is not None:
                # Its own watchdog would end the stalled worker as well; the
                # test is about the survivor noticing on its own.
                watchdog.close()
            print(f"rank {rank}: stalling at step {step} at t={time.time():.3f}", flush=True)
            time.sleep(3600)
        print(f"rank {rank}: SIGKILL at step {step} at t={time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    inputs, y = batch(step)
    train_step(inputs, y)
    if (step + 1) % EVERY == 0:
        manager.save()
    if watchdog is not None:
        watchdog.beat()
if watchdog is not None:
    watchdog.close()
np.savez(f"{out_prefix}-rank{rank}.npz", *model.get_weights(),
         iterations=np.array(int(optimizer.iterations.numpy())))
print(f"rank {rank}: finished at step {int(optimizer.iterations.numpy())}", flush=True)
common.exit_now(strategy)
