"""Keras 3 integration for Horovod, without ``horovod.tensorflow.keras``.

Horovod 0.28's Keras wrappers predate Keras 3: its ``DistributedOptimizer``
wraps a Keras 3 optimizer without error but never averages the gradients (each
rank silently trains on its own data), and ``BroadcastGlobalVariablesCallback``
/ ``hvd.broadcast_variables(model.variables)`` crash on Keras 3 variables. This
module provides what a Horovod training script needs, built only on Horovod's
tensor ops (``broadcast``/``allreduce``), which do work:

* :func:`broadcast_variables` - copy rank 0's values into Keras 3 (or TF)
  variables everywhere: one broadcast per dtype, not one per variable;
* :class:`BroadcastInitialStateCallback` - do that for the model and the
  optimizer's replicated state when ``model.fit`` starts;
* :class:`MetricAverageCallback` - average epoch metrics over ranks;
* :class:`ModelCheckpoint` - Keras' checkpointing, run on every rank (saving
  gathers ShardedAdam's shards, a collective), keeping rank 0's file.

Typical script, launched with ``horovodrun -np 4 python train.py``::

    import horovod.tensorflow as hvd
    import distadam
    from distadam import horovod_keras

    hvd.init()
    model = make_model()
    model.compile(optimizer=distadam.ShardedAdam(1e-3), loss="mse")
    model.fit(x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()],
              callbacks=horovod_keras.callbacks(),
              verbose=1 if hvd.rank() == 0 else 0)

``ShardedAdam`` picks the Horovod backend by itself once ``hvd.init()`` has
run; its sharded ``m``/``v`` are per-rank by design and are never broadcast.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf


def _hvd():
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:
        raise ImportError(
            "distadam.horovod_keras needs Horovod with TensorFlow support; run "
            "`./dev setup` (scripts/install_horovod.sh builds it)."
        ) from error
    return hvd


def _tf_variable(variable):
    """The tf.Variable behind a Keras 3 variable (or the variable itself)."""
    value = getattr(variable, "value", variable)
    if not isinstance(value, tf.Variable):
        raise TypeError(
            f"Cannot broadcast {variable!r}: expected a keras.Variable or tf.Variable "
            "holding real storage (a symbolic tensor means the model/optimizer is not built)."
        )
    return value


def broadcast_variables(variables, root_rank: int = 0, name: str = "distadam_broadcast") -> None:
    """Overwrite ``variables`` on every rank with their values on ``root_rank``.

    Accepts Keras 3 variables and tf.Variables. Variables are packed into one
    flat buffer per dtype, so the number of Horovod ops does not depend on the
    number of variables. A collective: every rank must call it with the same
    variables (same order, shapes and dtypes) at the same point. Eager only.
    """
    hvd = _hvd()
    if not tf.executing_eagerly():
        raise RuntimeError("broadcast_variables runs eagerly (outside tf.function).")
    tf_vars = [_tf_variable(v) for v in variables]
    if hvd.size() == 1 or not tf_vars:
        return
    by_dtype = {}
    for variable in tf_vars:
        by_dtype.setdefault(variable.dtype, []).append(variable)
    # Sorted so every rank issues the ops in the same order with the same names.
    for dtype in sorted(by_dtype, key=lambda d: d.name):
        group = by_dtype[dtype]
        flat = tf.concat([tf.reshape(v, [-1]) for v in group], axis=0)
        if dtype == tf.bool:  # Horovod has no bool broadcast
            flat = tf.cast(
                hvd.broadcast(tf.cast(flat, tf.uint8), root_rank, name=f"{name}_{dtype.name}"),
                tf.bool,
            )
        else:
            flat = hvd.broadcast(flat, root_rank, name=f"{name}_{dtype.name}")
        sizes = [int(np.prod(v.shape)) for v in group]
        for variable, piece in zip(group, tf.split(flat, sizes)):
            variable.assign(tf.reshape(piece, variable.shape))


def replicated_optimizer_variables(optimizer) -> list:
    """Optimizer variables that must be equal on every rank (iterations,
    learning rate, Adam's slots for an unsharded optimizer), excluding
    ShardedAdam's per-rank shards, which differ by design."""
    from distadam.state import ShardStateVariable

    return [v for v in optimizer.variables if not isinstance(v, ShardStateVariable)]


def broadcast_model_and_optimizer(model, optimizer=None, root_rank: int = 0) -> None:
    """Broadcast a model's variables (trainable and not, e.g. BatchNorm
    statistics) and the optimizer's replicated state from ``root_rank``."""
    variables = list(model.variables)
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        variables += replicated_optimizer_variables(optimizer)
    broadcast_variables(variables, root_rank=root_rank)


class BroadcastInitialStateCallback(keras.callbacks.Callback):
    """Start every rank from ``root_rank``'s weights and optimizer state.

    Runs once, at ``on_train_begin``. Without a tf.distribute strategy Keras 3
    would build the optimizer lazily inside the first traced step; the callback
    builds it first (as Keras' own symbolic build does under a strategy) so the
    model's variables, ``iterations`` and the learning-rate state all go out in
    the same broadcast. Model weights and the step counter that only rank 0
    loaded are thereby covered; ShardedAdam's ``m``/``v`` are not broadcast
    (each rank owns a different shard), so load an optimizer checkpoint on
    every rank, each keeps its own shard. No per-batch hook: it would turn off
    Keras' asynchronous callback dispatch for the whole fit.
    """

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = root_rank

    def on_train_begin(self, logs=None):
        """Build the optimizer if needed, then broadcast the model and the
        replicated optimizer state from ``root_rank``."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built and self.model.trainable_variables:
            optimizer.build(self.model.trainable_variables)
        broadcast_model_and_optimizer(self.model, optimizer, root_rank=self.root_rank)


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace each numeric epoch log (loss, metrics, val_*) with its mean
    over ranks, with one allreduce per epoch.

    Put it before callbacks that read the logs (ModelCheckpoint, EarlyStopping,
    CSVLogger): Keras passes one logs dict through the callbacks in order.
    Metrics are averaged with equal weight per rank, which is the global value
    when ranks see equally many samples (as with an even shard of the data).
    """

    def __init__(self):
        super().__init__()
        self._epochs = 0

    def on_epoch_end(self, epoch, logs=None):
        """Replace each numeric entry of ``logs`` with its mean over ranks."""
        hvd = _hvd()
        if logs is None or hvd.size() == 1:
            return
        keys = sorted(k for k, v in logs.items() if _is_number(v))
        if not keys:
            return
        values = tf.constant([float(logs[k]) for k in keys], dtype=tf.float64)
        self._epochs += 1
        averaged = hvd.allreduce(values, op=hvd.Average, name=f"distadam_metric_average_{self._epochs}")
        for key, value in zip(keys, averaged.numpy()):
            logs[key] = float(value)


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``keras.callbacks.ModelCheckpoint`` that is safe under Horovod.

    Saving a model trained with ShardedAdam gathers the sharded optimizer state
    (``save_weights`` includes the optimizer): a collective, so every rank has
    to save at the same moment. The usual Horovod recipe, a ModelCheckpoint on
    rank 0 only, therefore hangs at the first save. This callback runs on every
    rank and keeps only ``root_rank``'s file; the other ranks write to a
    scratch directory that is removed when training ends.

    Place it after :class:`MetricAverageCallback` (``callbacks()`` followed by
    this one): with ``save_best_only`` every rank must reach the same
    decision, which it does on the averaged metric, not on its local one.
    """

    def __init__(self, filepath, *args, root_rank: int = 0, **kwargs):
        hvd = _hvd()
        self._scratch = None
        if hvd.rank() != root_rank:
            self._scratch = tempfile.mkdtemp(prefix=f"distadam-checkpoint-rank{hvd.rank()}-")
            filepath = os.path.join(self._scratch, os.path.basename(os.fspath(filepath)))
        super().__init__(filepath, *args, **kwargs)

    def on_train_end(self, logs=None):
        """Finish as Keras' ModelCheckpoint does, then remove this rank's
        scratch directory (ranks other than ``root_rank``)."""
        super().on_train_end(logs)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, np.number)):
        return True
    return isinstance(value, (np.ndarray, tf.Tensor)) and np.size(value) == 1


def callbacks(root_rank: int = 0) -> list:
    """The callbacks a ``model.fit`` under Horovod needs, in the right order.
    Append anything that reads the logs (e.g. :class:`ModelCheckpoint`)."""
    return [BroadcastInitialStateCallback(root_rank), MetricAverageCallback()]
