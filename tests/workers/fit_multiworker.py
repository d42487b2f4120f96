"""One worker of a `distadam launch --nproc N` job running Keras' own
``model.fit``/``evaluate``/``predict`` under MultiWorkerMirroredStrategy.

usage: python fit_multiworker.py CASES_JSON OUT_DIR
CASES_JSON: [sharded_case] or [sharded_case, plain_case] (the references come
from reference.py, run beside the job, with the same cases). In one strategy,
in this order:

1. plain Keras: ``keras.optimizers.Adam`` + ``model.fit`` before anything
   enabled distadam.multiworker_fit; the error is recorded (the upstream
   failure, keras-team/keras#20585).
2. ``distadam.ShardedAdam`` created in ``strategy.scope()``, nothing else
   changed: fit (with validation_data) for ``EPOCHS`` epochs, evaluate,
   predict.
3. (with plain_case) plain ``keras.optimizers.Adam`` after ``distadam.enable_multiworker_fit()``,
   with ``steps_per_execution=STEPS_PER_EXECUTION`` (not a divisor of the
   epoch's steps).
4. (with plain_case) ShardedAdam under Keras' EarlyStopping and
   ReduceLROnPlateau on the validation loss: written to OUT_DIR/rank{R}-callbacks.npz
   (epochs run, the learning rate after each epoch, the weights).

For case i each process writes OUT_DIR/rank{R}-{i}.npz: its weights,
iterations, fit history, evaluate results, predictions, and the evaluation and
prediction of the same weights by a one-process model (no strategy).
"""

import json
import os
import sys
import time

STARTED = time.monotonic()

import common  # noqa: F401  (sets TF logging before TF loads)

import distadam  # noqa: E402

strategy = distadam.strategy_from_env(communication_timeout=120)
print(f"strategy after {time.monotonic() - STARTED:.1f} s", flush=True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from distadam import multiworker_fit  # noqa: E402

EPOCHS = 2
CALLBACK_EPOCHS = 6
STEPS_PER_EXECUTION = 3
BATCH = common.GLOBAL_BATCH

cases = json.loads(sys.argv[1])
sharded_case, plain_case = cases[0], cases[-1]
out_dir = sys.argv[2]
rank = int(os.environ.get("DISTADAM_RANK", "0"))
assert strategy.num_replicas_in_sync == int(os.environ["DISTADAM_WORLD_SIZE"]) > 1

(val_tokens, val_features), val_targets = common.make_data(4, seed=1)  # 96 rows
(pred_tokens, pred_features), _ = common.make_data(5, seed=2)
pred_x = (pred_tokens[:100], pred_features[:100])  # last batch of 4 rows: ragged over the workers
validation = tf.data.Dataset.from_tensor_slices(((val_tokens, val_features), val_targets)).batch(BATCH)


def train_data(case):
    # The first steps // EPOCHS global batches, seen EPOCHS times (the
    # reference's "repeat").
    (tokens, features), targets = common.make_data(case["steps"] // EPOCHS)
    return tf.data.Dataset.from_tensor_slices(((tokens, features), targets)).batch(BATCH)


def build(case, make_optimizer, **compile_kwargs):
    with strategy.scope():
        model = common.make_model(dense=case.get("model") == "dense")
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss="mse", metrics=["mae"], **compile_kwargs)
    return model


def run(case, model):
    history = model.fit(train_data(case), epochs=EPOCHS, validation_data=validation, verbose=0)
    evaluated = model.evaluate(validation, return_dict=True, verbose=0)
    predicted = model.predict(pred_x, batch_size=BATCH, verbose=0)
    # The same weights in one process, no strategy: called eagerly (no
    # tf.function to trace), loss and metric in float64 NumPy.
    local = common.make_model(dense=case.get("model") == "dense")
    local.set_weights(model.get_weights())
    error = np.asarray(local((val_tokens, val_features), training=False), np.float64) - val_targets
    local_evaluated = {"loss": np.mean(np.square(error)), "mae": np.mean(np.abs(error))}
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays["iterations"] = np.array(int(model.optimizer.iterations.numpy()))
    arrays.update({f"history_{k}": np.array(v, np.float64) for k, v in history.history.items()})
    arrays.update({f"evaluate_{k}": np.array(v, np.float64) for k, v in evaluated.items()})
    arrays.update({f"local_{k}": np.array(v, np.float64) for k, v in local_evaluated.items()})
    arrays["predict"] = predicted
    arrays["local_predict"] = np.asarray(local(pred_x, training=False))
    return arrays


# 1. Plain Keras before the fix.
model = build(plain_case, lambda: keras.optimizers.Adam(**common.build_kwargs(plain_case, reference=True)))
try:
    model.fit(train_data(plain_case), epochs=1, verbose=0)
    plain_error = ""
except ValueError as error:
    plain_error = f"{type(error).__name__}: {error}"
print(f"rank {rank}: {time.monotonic() - STARTED:.1f} s: plain Keras fit before the fix: "
      f"{plain_error[:160] or 'no error'}", flush=True)

# 2. ShardedAdam, no other change to the script.
enabled_before = bool(multiworker_fit._ORIGINALS)
model = build(sharded_case, lambda: distadam.ShardedAdam(**common.build_kwargs(sharded_case)))
arrays = run(sharded_case, model)
arrays["plain_error"] = np.array(plain_error)
arrays["enabled_before"] = np.array(enabled_before)
arrays["enabled_by_sharded_adam"] = np.array(bool(multiworker_fit._ORIGINALS))
np.savez(os.path.join(out_dir, f"rank{rank}-0.npz"), **arrays)
print(f"rank {rank}: {time.monotonic() - STARTED:.1f} s: ShardedAdam fit done", flush=True)

# 3. Plain Keras Adam with the documented call (idempotent here).
if len(cases) > 1:
    distadam.enable_multiworker_fit()
    model = build(plain_case, lambda: keras.optimizers.Adam(**common.build_kwargs(plain_case, reference=True)),
                  steps_per_execution=STEPS_PER_EXECUTION)
    np.savez(os.path.join(out_dir, f"rank{rank}-1.npz"), **run(plain_case, model))
    print(f"rank {rank}: {time.monotonic() - STARTED:.1f} s: keras Adam fit done", flush=True)

    # 4. Callbacks that decide from the (global) validation loss. A worker
    # deciding alone would stop or change its learning rate at another epoch
    # than the others and hang them in the next collective. min_delta is
    # larger than any improvement, so both act after epoch 2.
    kwargs = {**common.build_kwargs(sharded_case), "learning_rate": 0.01}
    kwargs.pop("global_clipnorm", None)
    model = build(sharded_case, lambda: distadam.ShardedAdam(**kwargs))
    learning_rates = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: learning_rates.append(float(model.optimizer.learning_rate.numpy())))
    history = model.fit(train_data(sharded_case), epochs=CALLBACK_EPOCHS, validation_data=validation, verbose=0,
                        callbacks=[keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=1,
                                                                     min_delta=1e9),
                                   keras.callbacks.EarlyStopping("val_loss", patience=2, min_delta=1e9),
                                   record])
    np.savez(os.path.join(out_dir, f"rank{rank}-callbacks.npz"), epochs=np.array(len(history.history["loss"])),
             learning_rates=np.array(learning_rates), val_loss=np.array(history.history["val_loss"]),
             iterations=np.array(int(model.optimizer.iterations.numpy())),
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    print(f"rank {rank}: {time.monotonic() - STARTED:.1f} s: callbacks fit done", flush=True)
common.exit_now(strategy)
