"""Train with ShardedAdam under horovodrun; rank ``DIE_RANK`` dies abruptly
(os._exit, no cleanup, as on an OOM kill) at step ``DIE_STEP`` while the others
are inside the step's collectives. The launcher must take the job down.

usage: horovodrun -np N python hvd_rank_dies.py DIE_RANK DIE_STEP
"""

import os
import sys

import common

import horovod.tensorflow as hvd  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

hvd.init()
die_rank, die_step = int(sys.argv[1]), int(sys.argv[2])
model = common.make_model()
optimizer = distadam.ShardedAdam()
(tokens, features), targets = common.make_data(50)


@tf.function
def step(inputs, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(common.loss_fn(y, model(inputs, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


for i in range(50):
    if hvd.rank() == die_rank and i == die_step:
        print(f"rank {die_rank}: dying at step {i}", flush=True)
        os._exit(17)
    rows = slice(i * common.GLOBAL_BATCH, (i + 1) * common.GLOBAL_BATCH)
    step((tokens[rows], features[rows]), targets[rows])
print(f"rank {hvd.rank()}: finished all steps", flush=True)
