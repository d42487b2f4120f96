"""Checkpoint phases under MirroredStrategy(N logical CPUs).

usage:
  python ckpt_run.py N save DIR               train steps [0, K), save (twice: K-2 and K)
  python ckpt_run.py M resume DIR1,DIR2,... OUT  uninterrupted [0, T), then for each DIR:
                                              restore, train [K, T); writes all weights
  python ckpt_run.py N backup DIR OUT         model.fit + keras BackupAndRestore, interrupted vs not
"""

import json
import os
import sys

import common

num_replicas = int(sys.argv[1])
phase = sys.argv[2]
common.use_logical_cpus(num_replicas)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402
from distadam.checkpoint import ShardedCheckpointManager  # noqa: E402

K, T = 12, 30
CASE = {"kwargs": {"amsgrad": True, "use_ema": True, "ema_overwrite_frequency": 5, "global_clipnorm": 0.05},
        "schedule": {"initial_learning_rate": 0.01, "decay_steps": 4, "decay_rate": 0.7, "staircase": True}}
# Placement of the optimizer state for this run (e.g. {"replicate": ["embed"]}),
# so checkpoints are tested across placements as well as worker counts.
CASE["kwargs"].update(json.loads(os.environ.get("CKPT_PLACEMENT", "{}")))
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])
data = common.make_data(T)


def window(first, last):
    (tokens, features), targets = data
    lo, hi = first * common.GLOBAL_BATCH, last * common.GLOBAL_BATCH
    return (tokens[lo:hi], features[lo:hi]), targets[lo:hi]


def fresh():
    with strategy.scope():
        model = common.make_model()
        optimizer = distadam.ShardedAdam(**common.build_kwargs(CASE))
        optimizer.build(model.trainable_variables)
    return model, optimizer


def train(model, optimizer, first, last):
    common.train_custom_loop(strategy, model, optimizer, window(first, last), last - first, finalize=False)


if phase == "save":
    model, optimizer = fresh()
    manager = ShardedCheckpointManager(sys.argv[3], model, optimizer, max_to_keep=2)
    train(model, optimizer, 0, K - 2)
    manager.save()
    train(model, optimizer, K - 2, K)
    print("saved", manager.save(), flush=True)
elif phase == "resume":
    # The uninterrupted run on this worker count, to compare against.
    model, optimizer = fresh()
    train(model, optimizer, 0, T)
    arrays = {f"full_w{i}": w for i, w in enumerate(model.get_weights())}
    arrays["full_lr"] = np.array(float(optimizer.learning_rate.numpy()))
    for index, directory in enumerate(sys.argv[3].split(",")):
        model, optimizer = fresh()
        restored = ShardedCheckpointManager(directory, model, optimizer).restore()
        assert restored is not None and int(optimizer.iterations.numpy()) == K, restored
        train(model, optimizer, K, T)
        arrays.update({f"run{index}_w{i}": w for i, w in enumerate(model.get_weights())})
        arrays[f"run{index}_iterations"] = np.array(int(optimizer.iterations.numpy()))
        arrays[f"run{index}_lr"] = np.array(float(optimizer.learning_rate.numpy()))
    np.savez(sys.argv[4], **arrays)
elif phase == "backup":
    # keras.callbacks.BackupAndRestore in model.fit: interrupted, then resumed.
    import keras

    (tokens, features), targets = data
    backup_dir = sys.argv[3]

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("simulated preemption")

    def fit(callbacks):
        model, optimizer = fresh()
        model.compile(optimizer=optimizer, loss="mse")
        model.fit([tokens, features], targets, batch_size=common.GLOBAL_BATCH, epochs=3,
                  shuffle=False, verbose=0, callbacks=callbacks)
        return model, optimizer

    try:
        fit([keras.callbacks.BackupAndRestore(backup_dir), Interrupt()])
        raise AssertionError("the interruption did not happen")
    except RuntimeError as error:
        assert "simulated preemption" in str(error)
    resumed, resumed_opt = fit([keras.callbacks.BackupAndRestore(backup_dir)])
    straight, straight_opt = fit([])
    arrays = {f"resumed_w{i}": w for i, w in enumerate(resumed.get_weights())}
    arrays.update({f"straight_w{i}": w for i, w in enumerate(straight.get_weights())})
    arrays["iterations"] = np.array([int(resumed_opt.iterations.numpy()), int(straight_opt.iterations.numpy())])
    np.savez(sys.argv[4], **arrays)
print("done", flush=True)
