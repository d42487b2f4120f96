"""Keras 3 ``model.fit``/``evaluate``/``predict`` under MultiWorkerMirroredStrategy.

With TensorFlow 2.21 and Keras 3.15, ``model.fit`` under a
MultiWorkerMirroredStrategy of more than one worker fails before the first
step, with any optimizer (``ValueError: Attempt to convert a value
(PerReplica:{...}) ... to a Tensor``); upstream this is keras-team/keras#20585
(also tensorflow/tensorflow#72388). The custom training loop
(``strategy.run`` + ``optimizer.apply_gradients``) is not affected.

:func:`enable_multiworker_fit` replaces three pieces of Keras' TensorFlow
trainer. Each replacement first asks Keras' own question "is this a
MultiWorkerMirroredStrategy on more than one worker?" and, if not, calls the
original Keras code unchanged: one process, ``MirroredStrategy``, the default
strategy and a one-worker MWMS behave exactly as without it. It works for any
Keras optimizer (it touches the trainer, never the optimizer);
:class:`distadam.ShardedAdam` calls it itself when it is created or built
under a multi-worker strategy. Every private Keras name it uses goes through
:mod:`distadam._keras_internals`.

The three replacements, and why each exists:

1. ``TensorFlowTrainer._maybe_symbolic_build``: before the first step Keras
   builds the model from a first batch. With a strategy it averages that
   batch over the replicas with ``strategy.reduce("MEAN", batch, axis=None)``
   on the whole ``(x, y, sample_weight)`` tuple; MWMS's reduce does not map
   over nested structures and fails on the tuple (the error above). Building
   needs only shapes and dtypes, so we build from this worker's first local
   replica's batch, with no collective at all.
2. ``reduce_per_replica``: Keras reduces a step's per-replica logs (loss,
   metrics) under MWMS with ``strategy.reduce("MEAN", v, axis=0)``, which
   fails on the scalar logs. We reduce each log with ``axis=None``: the mean
   over replicas, the value MirroredStrategy's path returns, identical on
   every worker. The other reductions (``"concat"`` for predict, ``"sum"``,
   ``"first"``) stay Keras'.
3. ``TensorFlowTrainer._make_function`` with ``steps_per_execution > 1``:
   Keras runs the steps in a ``tf.while_loop`` over
   ``iterator.get_next_as_optional()``, which fails to run under MWMS. We run
   the steps as a Python loop of one-step functions instead. The end-of-data
   test is its own small function, checked before each step: folding it into
   the step's graph (stop on OutOfRange) can run the optimizer's
   ``iterations += 1`` of a step without data, which silently shifts Adam's
   bias correction and learning-rate schedule.

What each worker receives: ``fit``/``evaluate`` logs are the mean over the
replicas of each replica's metric (the global value when every replica gets
equally many rows of every global batch, see the README), identical on every
worker; ``predict`` returns the predictions of the whole input on every
worker, gathered with ``strategy.gather`` (Keras' code). TensorFlow ranks the
members of a gather by task name, so from 11 workers on ("task:10" sorts
before "task:2") Keras' predict concatenation is not in input order (see
:mod:`distadam.collectives.member_order`); this module does not change that.
"""

from __future__ import annotations

import warnings

import tensorflow as tf

from distadam import _keras_internals as hooks

__all__ = ["enable_multiworker_fit"]

# The Keras originals, captured on first enable (so enabling twice never
# wraps a wrapper).
_ORIGINALS: dict = {}


def enable_multiworker_fit() -> None:
    """Make Keras 3 ``model.fit``, ``evaluate`` and ``predict`` work under
    ``tf.distribute.MultiWorkerMirroredStrategy`` (TensorFlow backend), with
    any optimizer.

    Call it once per process, before ``fit`` (calling it again does nothing).
    It patches Keras' TensorFlow trainer process-wide; under any other
    strategy, or a multi-worker strategy of one worker, Keras' original code
    runs. ``distadam.ShardedAdam`` created or built inside a multi-worker
    ``strategy.scope()`` calls it itself.

    Works around keras-team/keras#20585. Raises
    ``distadam._keras_internals.KerasTrainerChanged`` (an ImportError) if
    Keras' trainer is not the one distadam is tested with.
    """
    if _ORIGINALS:
        return
    originals = {
        "TensorFlowTrainer._maybe_symbolic_build": hooks.trainer_hook("TensorFlowTrainer._maybe_symbolic_build"),
        "TensorFlowTrainer._make_function": hooks.trainer_hook("TensorFlowTrainer._make_function"),
        "reduce_per_replica": hooks.trainer_hook("reduce_per_replica"),
    }
    replacements = {
        "TensorFlowTrainer._maybe_symbolic_build": _maybe_symbolic_build,
        "TensorFlowTrainer._make_function": _make_function,
        "reduce_per_replica": _reduce_per_replica,
    }
    _ORIGINALS.update(originals)
    for name, replacement in replacements.items():
        hooks.set_trainer_hook(name, replacement)


def enable_if_multi_worker(strategy) -> bool:
    """ShardedAdam's call: enable when ``strategy`` is multi-worker. A Keras
    whose trainer changed gets a warning, not an error (custom loops, which
    need none of this, keep working). Returns whether it is enabled."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return bool(_ORIGINALS)
    try:
        if not _ORIGINALS and hooks.is_multi_worker(strategy):
            enable_multiworker_fit()
    except hooks.KerasTrainerChanged as error:
        warnings.warn(f"{error} model.fit under MultiWorkerMirroredStrategy will fail as in plain "
                      "Keras (keras-team/keras#20585); a custom training loop works.", stacklevel=3)
    return bool(_ORIGINALS)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = hooks.model_strategy(self)
    if not hooks.is_multi_worker(strategy):
        return _ORIGINALS["TensorFlowTrainer._maybe_symbolic_build"](self, iterator=iterator,
                                                                      data_batch=data_batch)
    # Patch 1: shapes from this worker's first replica; no cross-worker reduce.
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0]
                if isinstance(value, tf.distribute.DistributedValues) else value,
                next(batches))
            break
    with strategy.scope():
        hooks.symbolic_build(self, data_batch)


def _reduce_per_replica(values, strategy, reduction):
    original = _ORIGINALS["reduce_per_replica"]
    if reduction not in ("auto", "mean") or not hooks.is_multi_worker(strategy):
        return original(values, strategy, reduction)
    # Patch 2: "auto" is "mean" off TPU; reduce each log over all replicas of
    # all workers (axis=None: element-wise, so scalars work).
    return tf.nest.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)


def _make_function(self, step_function):
    original = _ORIGINALS["TensorFlowTrainer._make_function"]
    strategy = self.distribute_strategy
    if self.steps_per_execution == 1 or not hooks.is_multi_worker(strategy):
        return original(self, step_function)

    # Patch 3: several steps per call as a Python loop of one-step functions.
    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        outputs = strategy.run(step_function, args=(data,))
        return _reduce_per_replica(outputs, strategy, "auto")

    def next_optional(iterator):
        return iterator.get_next_as_optional()

    if not self.run_eagerly:
        one_step_on_data = tf.function(one_step_on_data, reduce_retracing=True, jit_compile=self.jit_compile)
        next_optional = tf.function(next_optional)
    one_step_on_data = hooks.autoconvert_optionals(self, one_step_on_data)

    def function(iterator):
        outputs = None
        if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            for _ in range(self.steps_per_execution):
                optional = next_optional(iterator)
                # has_value() of a distributed iterator is already agreed by
                # all workers (MWMS synchronises end of data), so every
                # worker stops at the same step.
                if not bool(optional.has_value()):
                    break
                outputs = one_step_on_data(optional.get_value())
            if outputs is None:
                raise StopIteration
            return outputs
        for _, data in zip(range(self.steps_per_execution), iterator):  # train_on_batch & co.
            outputs = one_step_on_data(data)
        return outputs

    return function
