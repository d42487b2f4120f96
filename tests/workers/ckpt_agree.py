"""All processes restore the same checkpoint (issue 13, item 8), under any launcher.

usage: python ckpt_agree.py DIR

First, process 0's disk is full while it takes the writer lock (its
``os.pwrite`` fails with ENOSPC): every rank's save raises CheckpointError
(none waits forever in the agreement) and a later save works. Then it trains
and saves steps 10 and 12, and restores twice into fresh models:

1. "lagging listing": rank 1's directory listing does not show ckpt-12 yet
   (what NFS attribute caching does to a directory another client just
   renamed into place). Process 0 decides, so every rank restores step 12.
2. "one rank's file is bad": rank 0 corrupts shard 1 of ckpt-12, which only
   rank 1 reads. Rank 1 finds it, and every rank falls back to step 10
   together; rank 0 never reads (hashes) shard 1 itself.

Prints one "RESULT {json}" line per restore.
"""

import errno
import hashlib
import json
import os
import sys
import warnings

import common

import distadam  # noqa: E402

strategy = distadam.strategy_from_env()

import numpy as np  # noqa: E402

from distadam.checkpoint import CheckpointError, ShardedCheckpointManager  # noqa: E402

directory = sys.argv[1]
rank = int(os.environ["DISTADAM_RANK"])
data = common.make_data(12)


def fresh():
    with strategy.scope():
        model = common.make_model()
        optimizer = distadam.ShardedAdam(learning_rate=0.01)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def batch(step):
    per_worker = common.GLOBAL_BATCH // strategy.num_replicas_in_sync
    (tokens, features), targets = data
    lo = step * common.GLOBAL_BATCH + rank * per_worker
    return (tokens[lo:lo + per_worker], features[lo:lo + per_worker]), targets[lo:lo + per_worker]


def barrier(optimizer):
    optimizer.collectives.all_reduce_eagerly(np.ones([1], np.float32))


model, optimizer = fresh()
manager = ShardedCheckpointManager(directory, model, optimizer, max_to_keep=3)
train_step = common.make_train_step(strategy, model, optimizer)

real_pwrite = os.pwrite
if rank == 0:
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    os.pwrite = disk_full
try:
    manager.save()
    outcome = "saved"
except CheckpointError as error:
    outcome = str(error)
os.pwrite = real_pwrite
print("RESULT " + json.dumps({"scenario": "lock-enospc", "rank": rank, "error": outcome}), flush=True)

for step in range(12):
    train_step(*batch(step))
    if step + 1 in (10, 12):
        manager.save()


def restore(scenario):
    model, optimizer = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = ShardedCheckpointManager(directory, model, optimizer).restore()
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights()))
    print("RESULT " + json.dumps({
        "scenario": scenario, "rank": rank, "restored": os.path.basename(str(restored)),
        "iterations": int(optimizer.iterations_variable.numpy()), "weights": digest.hexdigest(),
        "warnings": [str(w.message) for w in caught],
    }), flush=True)
    return optimizer


newest = "ckpt-000000000012"
real_scandir = os.scandir


class HidingScandir:
    """os.scandir without the newest checkpoint, as a lagging listing shows it."""

    def __init__(self, path="."):
        self._it = real_scandir(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._it.close()

    def __iter__(self):
        return (entry for entry in self._it if entry.name != newest)

    def close(self):
        self._it.close()


if rank == 1:
    os.scandir = HidingScandir
optimizer = restore("lagging-listing")
os.scandir = real_scandir

if rank == 0:
    shard = os.path.join(directory, newest, "shard-00001-of-00002.npz")
    with open(shard, "r+b") as handle:
        handle.seek(200)
        handle.write(b"corrupted by the test")
barrier(optimizer)
restore("one-rank-bad-file")
common.exit_now(strategy)
