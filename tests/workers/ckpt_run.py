"""Checkpoint phases under MirroredStrategy(N logical CPUs).

usage:
  python ckpt_run.py N save JOBS_JSON         for each job {"dir", "placement"}: train steps
                                              [0, K), saving in DIR at K-2 and K, then on to T:
                                              DIR.uninterrupted.npz holds the weights of this
                                              uninterrupted run
  python ckpt_run.py M resume JOBS_JSON OUT   for each job {"dir", "placement"}: a fresh model
                                              and optimizer with that placement restore DIR's
                                              newest checkpoint and train [K, T); OUT holds them
  python ckpt_run.py N backup DIR OUT         model.fit + keras BackupAndRestore, interrupted vs not

A placement: ShardedAdam arguments that place the state (e.g. {"replicate":
["embed"]} or {"shard_group_size": 2}), so checkpoints are tested across
placements as well as worker counts.
"""

import json
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
# Op by op (fused_update=False): what these runs test is the state's layout
# on disk and its resharding, and XLA compiling each bucket per replica would
# be most of their time; the equivalence tests cover the fused update.
CASE = {"kwargs": {"amsgrad": True, "use_ema": True, "ema_overwrite_frequency": 5, "global_clipnorm": 0.05,
                   "fused_update": False},
        "schedule": {"initial_learning_rate": 0.01, "decay_steps": 4, "decay_rate": 0.7, "staircase": True}}
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])
data = common.make_data(T)


def window(first, last):
    (tokens, features), targets = data
    lo, hi = first * common.GLOBAL_BATCH, last * common.GLOBAL_BATCH
    return (tokens[lo:hi], features[lo:hi]), targets[lo:hi]


def fresh(placement=None):
    case = {**CASE, "kwargs": {**CASE["kwargs"], **(placement or {})}}
    with strategy.scope():
        model = common.make_model()
        optimizer = distadam.ShardedAdam(**common.build_kwargs(case))
        optimizer.build(model.trainable_variables)
    return model, optimizer


def train(model, optimizer, first, last):
    common.train_custom_loop(strategy, model, optimizer, window(first, last), last - first, finalize=False)


def outcome(model, optimizer, prefix=""):
    arrays = {f"{prefix}w{i}": w for i, w in enumerate(model.get_weights())}
    arrays[f"{prefix}iterations"] = np.array(int(optimizer.iterations.numpy()))
    arrays[f"{prefix}lr"] = np.array(float(optimizer.learning_rate.numpy()))
    return arrays


if phase == "save":
    for job in json.loads(sys.argv[3]):
        model, optimizer = fresh(job["placement"])
        manager = ShardedCheckpointManager(job["dir"], model, optimizer, max_to_keep=2)
        train(model, optimizer, 0, K - 2)
        manager.save()
        train(model, optimizer, K - 2, K)
        print("saved", manager.save(), flush=True)
        # On, uninterrupted, to T: what every resume of this run must reach.
        train(model, optimizer, K, T)
        np.savez(f"{job['dir']}.uninterrupted.npz", **outcome(model, optimizer))
elif phase == "resume":
    arrays = {}
    for index, job in enumerate(json.loads(sys.argv[3])):
        model, optimizer = fresh(job["placement"])
        restored = ShardedCheckpointManager(job["dir"], model, optimizer).restore()
        assert restored is not None and int(optimizer.iterations.numpy()) == K, restored
        train(model, optimizer, K, T)
        arrays.update(outcome(model, optimizer, prefix=f"run{index}_"))
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
common.exit_now()
