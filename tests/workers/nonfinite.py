"""A NaN in one replica's gradient at one step skips that step on every replica.

usage: python nonfinite.py N WRAP(plain|loss_scale|keras_loss_scale) ; prints RESULT json
"""

import json
import sys

import common

num_replicas = int(sys.argv[1])
wrap = sys.argv[2]
common.use_logical_cpus(num_replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

POISON_STEP, POISON_REPLICA, STEPS = 3, num_replicas - 1, 6
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])
with strategy.scope():
    model = common.make_model()
    sharded = distadam.ShardedAdam(learning_rate=0.01)
    optimizer = sharded
    if wrap == "loss_scale":
        optimizer = distadam.LossScaleOptimizer(sharded, initial_scale=2.0**10)
    elif wrap == "keras_loss_scale":
        optimizer = keras.optimizers.LossScaleOptimizer(sharded, initial_scale=2.0**10)
    optimizer.build(model.trainable_variables)

(tokens, features), targets = common.make_data(STEPS)
dataset = tf.data.Dataset.from_tensor_slices(((tokens, features), targets)).batch(common.GLOBAL_BATCH)
step_counter = tf.Variable(0, dtype=tf.int64)


@tf.function
def train_step(batch):
    def step_fn(inputs, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(common.loss_fn(y, model(inputs, training=True)),
                                              global_batch_size=common.GLOBAL_BATCH)
            loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        poison = tf.logical_and(tf.equal(replica, POISON_REPLICA), tf.equal(step_counter, POISON_STEP))
        grads = [tf.convert_to_tensor(g) for g in grads]
        grads[-1] = tf.where(poison, tf.fill(tf.shape(grads[-1]), np.nan), grads[-1])
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    strategy.run(step_fn, args=batch)


def replica_values():
    return [[np.asarray(c) for c in v.value.values] for v in model.trainable_variables]


history = []
for batch in strategy.experimental_distribute_dataset(dataset):
    before = replica_values()
    train_step(batch)
    after = replica_values()
    step_counter.assign_add(1)
    history.append({
        "iterations": int(sharded.iterations.numpy()),
        "unchanged": all(np.array_equal(a[0], b[0]) for a, b in zip(before, after)),
        "replicas_identical": all(all(np.array_equal(c, comps[0]) for c in comps) for comps in after),
        "finite": all(np.all(np.isfinite(c)) for comps in after for c in comps),
        "scale": float(optimizer.dynamic_scale.numpy()) if wrap != "plain" else None,
    })
print("RESULT " + json.dumps({"history": history, "skipped": sharded.skipped_steps,
                              "poison_step": POISON_STEP}), flush=True)
