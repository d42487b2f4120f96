"""Run under horovodrun/mpirun: train with ShardedAdam (Horovod backend), every
rank on its own slice of each global batch, and compare on rank 0 with Keras
Adam on one process over the whole global batch. Emits one result per case
(mpi_results).

usage: horovodrun -np N python hvd_equivalence.py CASES_JSON

Each case: name, steps, mode ("custom" | "fit"), kwargs, schedule,
target_scale (see common.py), reduce_scatter ("auto" | "alltoall" | "reducescatter" | "allreduce").
Non-root ranks start from different weights, so the result is only right if
the initial broadcast works.
"""

import json
import os
import sys

import numpy as np

import common  # noqa: F401  (sets TF logging before TF loads)
from mpi_results import emit
import reference

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402
from distadam import horovod_keras  # noqa: E402
from distadam.collectives.horovod import HorovodCollectives  # noqa: E402

# Hybrid sharding needs process sets: added by the optimizer when Horovod
# runs with HOROVOD_DYNAMIC_PROCESS_SETS=1, or declared at init as here when
# the test asks for it (DISTADAM_TEST_DECLARE_GROUPS=G).
declared = os.environ.get("DISTADAM_TEST_DECLARE_GROUPS")
if declared:
    from distadam.collectives.horovod import hybrid_process_sets

    hvd.init(process_sets=hybrid_process_sets(int(os.environ["HOROVOD_SIZE"]), int(declared)))
else:
    hvd.init()
# Up to 3 ranks share 2 cores: one compute thread each avoids thrashing.
tf.config.threading.set_intra_op_parallelism_threads(1)
rank, size = hvd.rank(), hvd.size()
assert common.GLOBAL_BATCH % size == 0, "the global batch must split evenly"
local_batch = common.GLOBAL_BATCH // size


def local_slice(array, steps):
    """Rank's rows of each global batch: concatenated in rank order they are
    exactly the global batch the reference trains on."""
    shaped = array[: steps * common.GLOBAL_BATCH].reshape(
        (steps, size, local_batch) + array.shape[1:]
    )
    return shaped[:, rank].reshape((steps * local_batch,) + array.shape[1:])


def train_custom(model, optimizer, x, y, steps):
    horovod_keras.broadcast_model_and_optimizer(model, optimizer)

    @tf.function
    def step(inputs, targets):
        with tf.GradientTape() as tape:
            # The local mean, exactly as on one process; the Horovod backend
            # averages over ranks.
            loss = tf.reduce_mean(common.loss_fn(targets, model(inputs, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(local_batch, drop_remainder=True)
    for inputs, targets in dataset.take(steps):
        step(inputs, targets)

    # A broadcast mid-training (e.g. after rank 0 restores a checkpoint) must
    # leave each rank's own shards of m and v alone: they differ by design.
    shards = [np.array(v) for v in optimizer.variables if "_shard" in v.name]
    horovod_keras.broadcast_model_and_optimizer(model, optimizer)
    after = [np.array(v) for v in optimizer.variables if "_shard" in v.name]
    kept = all(np.array_equal(a, b) for a, b in zip(shards, after))
    # Only the non-root ranks can lose anything: ask every rank.
    kept_everywhere = hvd.allgather(tf.constant([int(kept)]), name="shards_kept").numpy()
    return {"shard_variables": len(shards), "shards_kept_by_broadcast": bool(kept_everywhere.all())}


class RecordLogs(keras.callbacks.Callback):
    """Keeps each epoch's logs as this rank saw them before averaging."""

    def __init__(self):
        super().__init__()
        self.raw = []

    def on_epoch_end(self, epoch, logs=None):
        self.raw.append(dict(logs or {}))


def train_fit(model, optimizer, x, y, epochs=2):
    model.compile(optimizer=optimizer, loss="mse")
    recorder = RecordLogs()
    callbacks = horovod_keras.callbacks()
    # Before MetricAverageCallback, so it records the un-averaged values.
    callbacks.insert(1, recorder)
    history = model.fit(list(x), y, batch_size=local_batch, epochs=epochs,
                        shuffle=False, verbose=0, callbacks=callbacks)
    raw = np.array([logs["loss"] for logs in recorder.raw], np.float64)
    all_raw = hvd.allgather(tf.constant(raw[None]), name="raw_losses").numpy()
    return {
        "averaged_loss": [float(v) for v in history.history["loss"]],
        "mean_of_raw_losses": [float(v) for v in all_raw.mean(axis=0)],
        "raw_losses_differ": bool(np.ptp(all_raw, axis=0).max() > 0),
    }


def reference_of(case, steps, fit):
    """Keras Adam on the global batches (the session's cached copy): a fit
    case's two epochs over half the batches, as a custom loop sees them."""
    result = reference.get(case, steps, "custom", repeat=2 if fit else 1)
    return result.weights, result.state_bytes, result.clipped_updates


cases = json.loads(sys.argv[1])
for index, case in enumerate(cases):
    steps = case.get("steps", 30)
    fit = case.get("mode", "custom") == "fit"
    if fit:
        # Two epochs over half the batches (so MetricAverageCallback runs
        # twice); the reference sees the same batches in the same order.
        epoch = common.make_data(steps // 2, scale=case.get("target_scale", 1.0))
        data = ((np.concatenate([epoch[0][0]] * 2), np.concatenate([epoch[0][1]] * 2)),
                np.concatenate([epoch[1]] * 2))
        (tokens, features), targets = epoch
        rows = steps // 2
    else:
        data = common.make_data(steps, scale=case.get("target_scale", 1.0))
        (tokens, features), targets = data
        rows = steps
    x = (local_slice(tokens, rows), local_slice(features, rows))
    y = local_slice(targets, rows)

    # The backend reads its reduce-scatter mode when the optimizer is built.
    os.environ["DISTADAM_HOROVOD_REDUCE_SCATTER"] = case.get("reduce_scatter", "auto")
    # Different initial weights off rank 0: the broadcast must fix them.
    model = common.make_model(seed=7 if rank == 0 else 100 + rank)
    optimizer = common.configure(distadam.ShardedAdam(**common.build_kwargs(case)), case)
    if fit:
        extra = train_fit(model, optimizer, x, y)
    else:
        extra = train_custom(model, optimizer, x, y, steps)
    optimizer.finalize_variable_values(model.trainable_variables)

    flat = np.concatenate([np.ravel(w) for w in model.get_weights()])
    everyone = hvd.allgather(tf.constant(flat[None]), name=f"weights_{index}").numpy()
    iterations = hvd.allgather(tf.reshape(tf.cast(optimizer.iterations, tf.int64), [1]),
                               name=f"iterations_{index}").numpy()
    state = optimizer.state_bytes_per_device()
    state_bytes = hvd.allgather(tf.constant([sum(state.values())], tf.int64),
                                name=f"state_{index}").numpy()
    if rank != 0:
        continue
    ref_weights, ref_state_bytes, clipped_updates = reference_of(case, steps, fit)
    result = {
        "case": case["name"],
        "mode": "fit" if fit else "custom",
        "workers": size,
        "backend": type(optimizer.collectives).__name__,
        "reduce_scatter": getattr(optimizer.collectives, "reduce_scatter_mode", None),
        "max_rel_diff": common.max_relative_difference(model.get_weights(), ref_weights),
        "reference_moved": common.max_relative_difference(common.make_model().get_weights(), ref_weights),
        "ranks_identical": bool(np.all(everyone == everyone[0])),
        "iterations": [int(i) for i in iterations],
        "clipped_updates": clipped_updates,
        "state_bytes_per_rank": [int(b) for b in state_bytes],
        "reference_state_bytes": ref_state_bytes,
        "state_kinds": len(optimizer.sharded_state.kinds),
        "buckets": len(optimizer.layout.buckets),
        "launches": common.step_launches(optimizer),
        "shard_group_size": optimizer.num_shards,
        **extra,
    }
    assert isinstance(optimizer.collectives, HorovodCollectives)
    emit(result, rank)
common.exit_now(before=hvd.shutdown)
