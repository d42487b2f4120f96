"""A NaN in one replica's gradient at one step skips that step on every replica.

usage: python nonfinite.py N WRAP(plain|loss_scale|keras_loss_scale) [OPTIONS_JSON] ; prints RESULT json

OPTIONS_JSON (optional): {"kwargs": ShardedAdam kwargs, "poison": "nan" | "inf" | "overflow",
"poison_steps": [step, ...]}. The result also compares the final weights with a
run that never saw the poisoned batches: a skipped step must leave no trace.
"""

import json
import sys

import common

num_replicas = int(sys.argv[1])
wrap = sys.argv[2]
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
common.use_logical_cpus(num_replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

POISON_STEPS = options.get("poison_steps", [3])
# "overflow": finite, but its square is not (float32 tops out near 3.4e38),
# so Adam's v would become inf and stay there.
POISON_VALUE = {"nan": np.nan, "inf": np.inf, "overflow": 3e19}[options.get("poison", "nan")]
POISON_REPLICA, STEPS = num_replicas - 1, 6
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])


def build():
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = common.make_model()
        sharded = distadam.ShardedAdam(learning_rate=0.01, **options.get("kwargs", {}))
        optimizer = sharded
        if wrap == "loss_scale":
            optimizer = distadam.LossScaleOptimizer(sharded, initial_scale=2.0**10)
        elif wrap == "keras_loss_scale":
            optimizer = keras.optimizers.LossScaleOptimizer(sharded, initial_scale=2.0**10)
        optimizer.build(model.trainable_variables)
    return model, sharded, optimizer


model, sharded, optimizer = build()
(tokens, features), targets = common.make_data(STEPS)
dataset = tf.data.Dataset.from_tensor_slices(((tokens, features), targets)).batch(common.GLOBAL_BATCH)
step_counter = tf.Variable(0, dtype=tf.int64)


def make_train_step(model, optimizer, poison_steps):
  @tf.function
  def train_step(batch):
    def step_fn(inputs, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(common.loss_fn(y, model(inputs, training=True)),
                                              global_batch_size=common.GLOBAL_BATCH)
            loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, model.trainable_variables)
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        poisoned_step = tf.reduce_any(tf.equal(step_counter, tf.constant(poison_steps + [-1], tf.int64)))
        poison = tf.logical_and(tf.equal(replica, POISON_REPLICA), poisoned_step)
        grads = [tf.convert_to_tensor(g) for g in grads]
        grads[-1] = tf.where(poison, tf.fill(tf.shape(grads[-1]), POISON_VALUE), grads[-1])
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    strategy.run(step_fn, args=batch)
  return train_step


train_step = make_train_step(model, optimizer, POISON_STEPS)


def replica_values():
    return [[np.asarray(c) for c in v.value.values] for v in model.trainable_variables]


history = []
batches = list(strategy.experimental_distribute_dataset(dataset))
for batch in batches:
    before = replica_values()
    train_step(batch)
    after = replica_values()
    step_counter.assign_add(1)
    history.append({
        "iterations": int(sharded.iterations_variable.numpy()),
        "unchanged": all(np.array_equal(a[0], b[0]) for a, b in zip(before, after)),
        "replicas_identical": all(all(np.array_equal(c, comps[0]) for c in comps) for comps in after),
        "finite": all(np.all(np.isfinite(c)) for comps in after for c in comps),
        "scale": float(optimizer.dynamic_scale.numpy()) if wrap != "plain" else None,
    })

# The same training without the poisoned batches at all.
clean_model, clean_sharded, clean_optimizer = build()
clean_step = make_train_step(clean_model, clean_optimizer, [])
for index, batch in enumerate(batches):
    if index not in POISON_STEPS:
        clean_step(batch)
difference = max(float(np.max(np.abs(np.asarray(a.value) - np.asarray(b.value))))
                 for a, b in zip(model.trainable_variables, clean_model.trainable_variables))
print("RESULT " + json.dumps({"history": history, "skipped": sharded.skipped_steps,
                              "poison_step": POISON_STEPS[0], "poison_steps": POISON_STEPS,
                              "raw_iterations": int(sharded.iterations_variable.numpy()),
                              "clean_raw_iterations": int(clean_sharded.iterations_variable.numpy()),
                              "max_difference_to_clean_run": difference}), flush=True)
