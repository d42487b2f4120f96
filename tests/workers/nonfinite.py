"""A NaN in one replica's gradient at one step skips that step on every replica.

usage: python nonfinite.py N RUNS_JSON ; prints one RESULT json line per run

RUNS_JSON: a list of runs, trained one after another on one MirroredStrategy
over N logical CPUs, each {"name", "wrap": "plain" | "loss_scale" |
"keras_loss_scale", "kwargs": ShardedAdam kwargs, "poison": "nan" | "inf" |
"overflow", "poison_steps": [step, ...]}. Each result also compares the final
weights with a run that never saw the poisoned batches: a skipped step must
leave no trace.
"""

import json
import sys

import common

num_replicas = int(sys.argv[1])
runs = json.loads(sys.argv[2])
common.use_logical_cpus(num_replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

# "overflow": finite, but its square is not (float32 tops out near 3.4e38),
# so Adam's v would become inf and stay there.
POISON_VALUES = {"nan": np.nan, "inf": np.inf, "overflow": 3e19}
POISON_REPLICA, STEPS = num_replicas - 1, 6
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])
(tokens, features), targets = common.make_data(STEPS)
dataset = tf.data.Dataset.from_tensor_slices(((tokens, features), targets)).batch(common.GLOBAL_BATCH)
batches = list(strategy.experimental_distribute_dataset(dataset))


def build(run):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = common.make_model()
        sharded = distadam.ShardedAdam(learning_rate=0.01, **run.get("kwargs", {}))
        optimizer = sharded
        if run.get("wrap") == "loss_scale":
            optimizer = distadam.LossScaleOptimizer(sharded, initial_scale=2.0**10)
        elif run.get("wrap") == "keras_loss_scale":
            optimizer = keras.optimizers.LossScaleOptimizer(sharded, initial_scale=2.0**10)
        optimizer.build(model.trainable_variables)
    return model, sharded, optimizer


def make_train_step(model, optimizer, step_counter, poison_steps, poison_value):
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
            grads[-1] = tf.where(poison, tf.fill(tf.shape(grads[-1]), poison_value), grads[-1])
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(step_fn, args=batch)

    return train_step


def replica_values(model):
    return [[np.asarray(c) for c in v.value.values] for v in model.trainable_variables]


for run in runs:
    poison_steps = run.get("poison_steps", [3])
    wrap = run.get("wrap", "plain")
    model, sharded, optimizer = build(run)
    step_counter = tf.Variable(0, dtype=tf.int64)
    train_step = make_train_step(model, optimizer, step_counter, poison_steps,
                                 POISON_VALUES[run.get("poison", "nan")])
    history = []
    for batch in batches:
        before = replica_values(model)
        train_step(batch)
        after = replica_values(model)
        step_counter.assign_add(1)
        history.append({
            "iterations": int(sharded.iterations_variable.numpy()),
            "unchanged": all(np.array_equal(a[0], b[0]) for a, b in zip(before, after)),
            "replicas_identical": all(all(np.array_equal(c, comps[0]) for c in comps) for comps in after),
            "finite": all(np.all(np.isfinite(c)) for comps in after for c in comps),
            "scale": float(optimizer.dynamic_scale.numpy()) if wrap != "plain" else None,
        })

    # The same training without the poisoned batches at all.
    clean_model, clean_sharded, clean_optimizer = build(run)
    clean_step = make_train_step(clean_model, clean_optimizer, tf.Variable(0, dtype=tf.int64), [], 0.0)
    for index, batch in enumerate(batches):
        if index not in poison_steps:
            clean_step(batch)
    difference = max(float(np.max(np.abs(np.asarray(a.value) - np.asarray(b.value))))
                     for a, b in zip(model.trainable_variables, clean_model.trainable_variables))
    print("RESULT " + json.dumps({"name": run["name"], "history": history, "skipped": sharded.skipped_steps,
                                  "poison_step": poison_steps[0], "poison_steps": poison_steps,
                                  "raw_iterations": int(sharded.iterations_variable.numpy()),
                                  "clean_raw_iterations": int(clean_sharded.iterations_variable.numpy()),
                                  "max_difference_to_clean_run": difference}), flush=True)
common.exit_now()
