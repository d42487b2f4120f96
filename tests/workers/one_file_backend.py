"""ShardedAdam on a backend that lives in one file (mpi4py_collectives.py),
registered from outside distadam: training, consolidation, Keras-format saving,
EMA finalisation and the sharded checkpoint manager must all work through it.

usage: mpirun -np N python one_file_backend.py CHECKPOINT_DIR
"""

import sys

import numpy as np

import common  # noqa: F401  (sets TF logging before TF loads)
from mpi_results import emit  # noqa: E402

import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from mpi4py import MPI  # noqa: E402

import distadam  # noqa: E402
from distadam.checkpoint import ShardedCheckpointManager  # noqa: E402
from distadam.collectives import register_backend  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
register_backend("mpi4py", "mpi4py_collectives:MPI4PyCollectives")
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
STEPS = 24
CASE = {"name": "ema_amsgrad_global_clipnorm",
        "kwargs": {"use_ema": True, "ema_momentum": 0.9, "amsgrad": True, "global_clipnorm": 0.8,
                   "learning_rate": 0.01}}


def train(optimizer, model, data, worker, workers):
    """Custom loop: ``worker`` of ``workers`` takes its slice of every global
    batch; the loss is summed over the slice and divided by the global batch,
    so the gradients summed over workers are the global mean."""
    (tokens, features), targets = data
    per_worker = common.GLOBAL_BATCH // workers

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(common.loss_fn(y, model(x, training=True))) / common.GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for i in range(STEPS):
        rows = slice(i * common.GLOBAL_BATCH + worker * per_worker, i * common.GLOBAL_BATCH + (worker + 1) * per_worker)
        step((tokens[rows], features[rows]), targets[rows])


data = common.make_data(STEPS)
model = common.make_model()
optimizer = distadam.ShardedAdam(backend="mpi4py", **common.build_kwargs(CASE))
optimizer.build(model.trainable_variables)
train(optimizer, model, data, rank, size)

reference_model = common.make_model()
reference = common.DenseGradientAdam(**CASE["kwargs"])
train(reference, reference_model, data, 0, 1)

# Consolidated state, through the backend's eager gather, in Adam's layout.
ours, theirs = {}, {}
optimizer.save_own_variables(ours)
reference.save_own_variables(theirs)
state_diff = max(common.max_relative_difference([ours[k]], [theirs[k]]) for k in theirs)
weights_before_ema = common.max_relative_difference(model.get_weights(), reference_model.get_weights())

# A sharded checkpoint written through the backend's barrier, then restored
# into a fresh model and optimizer.
manager = ShardedCheckpointManager(sys.argv[1], model, optimizer)
saved = manager.save()
fresh_model = common.make_model(seed=99)
fresh = distadam.ShardedAdam(backend="mpi4py", **common.build_kwargs(CASE))
fresh.build(fresh_model.trainable_variables)
ShardedCheckpointManager(sys.argv[1], fresh_model, fresh).restore()
fresh_state = {}
fresh.save_own_variables(fresh_state)
restored_diff = max(common.max_relative_difference([fresh_state[k]], [ours[k]]) for k in ours)
restored_weights = common.max_relative_difference(fresh_model.get_weights(), model.get_weights())

# EMA finalisation gathers the sharded averages.
optimizer.finalize_variable_values(model.trainable_variables)
reference.finalize_variable_values(reference_model.trainable_variables)

emit({
    "rank": rank,
    "workers": size,
    "backend": type(optimizer.collectives).__name__,
    "launches": dict(optimizer.collectives.launches),
    "iterations": int(optimizer.iterations.numpy()),
    "weights_diff_before_ema": weights_before_ema,
    "weights_diff_after_ema": common.max_relative_difference(model.get_weights(), reference_model.get_weights()),
    "reference_moved": common.max_relative_difference(common.make_model().get_weights(), reference_model.get_weights()),
    "saved_state_diff": state_diff,
    "saved_keys": sorted(ours) == sorted(theirs),
    "restored_state_diff": restored_diff,
    "restored_weights_diff": restored_weights,
    "restored_iterations": int(fresh.iterations.numpy()),
    "checkpoint": saved.name,
    "clipped_updates": reference.clipped_updates(),
    "state_elements": int(sum(np.prod(v.shape) for v in optimizer.sharded_state.all_variables())),
    "param_elements": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    "shard_elements": sum(b.shard_size for b in optimizer.layout.buckets),
    "buckets": len(optimizer.layout.buckets),
}, rank)
keras.backend.clear_session()
common.exit_now(before=MPI.Finalize)
