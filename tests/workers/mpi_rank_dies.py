"""Plain mpirun + MultiWorkerMirroredStrategy; rank ``DIE_RANK`` raises an
exception at step ``DIE_STEP`` (an ordinary Python crash, so interpreter
shutdown and atexit handlers run). mpirun must take the whole job down.

usage: mpirun -np N python mpi_rank_dies.py DIE_RANK DIE_STEP
"""

import json
import os
import sys

import common

from distadam.mpi_rendezvous import rendezvous_tf_config  # noqa: E402

tf_config = rendezvous_tf_config()
os.environ["TF_CONFIG"] = json.dumps(tf_config)
rank = tf_config["task"]["index"]
die_rank, die_step = int(sys.argv[1]), int(sys.argv[2])

import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = common.make_model()
    optimizer = distadam.ShardedAdam()
(tokens, features), targets = common.make_data(50)


@tf.function
def step(inputs, y):
    def step_fn(inputs, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(common.loss_fn(y, model(inputs, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    strategy.run(step_fn, args=(inputs, y))


for i in range(50):
    if rank == die_rank and i == die_step:
        raise RuntimeError(f"rank {rank}: simulated crash at step {i}")
    rows = slice(i * common.GLOBAL_BATCH, (i + 1) * common.GLOBAL_BATCH)
    step((tokens[rows], features[rows]), targets[rows])
print(f"rank {rank}: finished all steps", flush=True)
