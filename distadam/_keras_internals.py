"""The one seam through which distadam touches Keras 3's private optimizer
internals. ``ShardedAdam`` is a ``keras.optimizers.Optimizer`` and keeps
Keras' public surface (``apply``, ``apply_gradients``, ``iterations``,
``learning_rate``, ``exclude_from_weight_decay``, saving); below that surface
it relies on the private pieces listed here, checked once at import so an
incompatible Keras fails with one clear error instead of deep in a step.
Tested with Keras 3.15 (the range ``pyproject.toml`` declares).

Hooks ShardedAdam overrides or calls, and why:

* ``_backend_apply_gradients(grads, variables)``: where Keras' ``apply`` hands
  over after filtering empty gradients and unscaling ``loss_scale_factor``,
  and before it adds 1 to ``iterations``; TF's ``_backend_update_step`` (the
  all-reduce) would be too late. ShardedAdam replaces the whole body: clipping,
  weight decay, accumulation, EMA and the update happen on shards.
* ``_trainable_variables`` / ``_trainable_variables_indices`` /
  ``_get_variable_index`` / ``_var_key``: Keras' own bookkeeping of the
  variables the optimizer was built with, which ``apply`` checks against.
* ``_track_variable``: registers a state variable in ``optimizer.variables``.
* ``_distribution_strategy``: where Keras' TF optimizer keeps the strategy it
  runs under (set at build, read by Keras' callbacks and the EMA mirror).
* ``_use_weight_decay(variable)``: the exclusion rules of
  ``exclude_from_weight_decay``, matched exactly as Keras matches them.
* ``_iterations``: the variable counting ``apply`` calls (micro-steps under
  accumulation); the public ``iterations`` divides it.
* ``_overwrite_model_variables_with_average_value``: what
  ``finalize_variable_values`` calls for EMA.
* ``Variable._value``: the TensorFlow variable behind a Keras variable, whose
  resource handle (in replica context: this replica's copy) lets the compiled
  state update write into the variable in place (:func:`local_handle`).
"""

from __future__ import annotations

import keras

REQUIRED_HOOKS = (
    "_backend_apply_gradients",
    "_get_variable_index",
    "_var_key",
    "_track_variable",
    "_use_weight_decay",
    "_overwrite_model_variables_with_average_value",
    "finalize_variable_values",
)


def check_optimizer_hooks(base=keras.optimizers.Optimizer) -> None:
    missing = [name for name in REQUIRED_HOOKS if not callable(getattr(base, name, None))]
    if missing:
        raise ImportError(
            f"distadam.ShardedAdam needs the Keras optimizer hooks {missing}, which Keras "
            f"{keras.__version__} does not have; distadam is tested with the Keras range "
            "declared in its pyproject.toml."
        )


def set_untracked(obj, name: str, value) -> None:
    """Set an attribute without Keras'/TF's automatic tracking (which would wrap
    lists and dicts and could add their variables to ``optimizer.variables``,
    changing the saved layout)."""
    object.__setattr__(obj, name, value)


def register_built_variables(optimizer, variables: list) -> None:
    """Record ``variables`` as the ones the optimizer is built with, as Keras'
    own ``build`` does (``apply`` checks incoming variables against them)."""
    indices = {optimizer._var_key(variable): index for index, variable in enumerate(variables)}
    set_untracked(optimizer, "_trainable_variables_indices", indices)
    set_untracked(optimizer, "_trainable_variables", list(variables))


def built_variables(optimizer) -> list:
    return list(optimizer._trainable_variables)


def variable_index(optimizer, variable):
    """Build-order index of ``variable``, or None if the optimizer does not know it."""
    return optimizer._trainable_variables_indices.get(optimizer._var_key(variable))


def uses_weight_decay(optimizer, variable) -> bool:
    # Keras' TF optimizer matches exclusion patterns against the tf.Variable
    # name, which includes the layer path ("nobias/kernel:0" matches "bias").
    return bool(optimizer._use_weight_decay(getattr(variable, "value", variable)))


def iterations_variable(optimizer):
    return optimizer._iterations


def track_variable(optimizer, variable) -> None:
    """Register a state variable in ``optimizer.variables`` (saved with it)."""
    optimizer._track_variable(variable)


def distribution_strategy(optimizer):
    """The strategy Keras' TF optimizer recorded (None on other backends)."""
    return getattr(optimizer, "_distribution_strategy", None)


def set_distribution_strategy(optimizer, strategy) -> None:
    """Record the strategy the optimizer is built under, where Keras' TF
    optimizer keeps it (its callbacks, e.g. SwapEMAWeights, read it there)."""
    optimizer._distribution_strategy = strategy


check_optimizer_hooks()


def local_handle(variable):
    """The resource handle of ``variable``'s copy on this worker (inside
    replica context, the replica's own copy of a per-replica variable)."""
    tf_variable = getattr(variable, "_value", variable)
    handle = getattr(tf_variable, "handle", None)
    if handle is None:
        raise TypeError(f"distadam: {getattr(variable, 'path', variable)!r} has no resource handle; "
                        f"Keras {keras.__version__} is outside the range distadam is tested with")
    return handle


# --------------------------------------------------------------------------
# Keras' TensorFlow trainer (``model.fit``/``evaluate``/``predict``), which
# :mod:`distadam.multiworker_fit` patches so that they run under
# MultiWorkerMirroredStrategy (keras-team/keras#20585). Unlike the optimizer
# hooks above, these are looked up only when that module is enabled, and a
# Keras whose trainer changed fails there, with this error, not at import.

TRAINER_MODULE = "keras.src.backend.tensorflow.trainer"
# name in the module (dotted: an attribute of a class in it) -> why we need it
TRAINER_HOOKS = (
    "TensorFlowTrainer._maybe_symbolic_build",  # builds model/optimizer from a first batch
    "TensorFlowTrainer._make_function",  # wraps train_step/test_step into the step function
    "TensorFlowTrainer._symbolic_build",
    "TensorFlowTrainer._autoconvert_optionals",
    "reduce_per_replica",  # reduces the per-replica outputs of a step (logs, predictions)
    "_collective_all_reduce_multi_worker",  # Keras' own "is this MWMS on >1 worker" test
)


class KerasTrainerChanged(ImportError):
    """Keras' TensorFlow trainer lacks something distadam.multiworker_fit patches."""


def tensorflow_trainer():
    """Keras' TensorFlow trainer module, checked to have every hook in
    ``TRAINER_HOOKS``; raises :class:`KerasTrainerChanged` otherwise."""
    import importlib

    try:
        module = importlib.import_module(TRAINER_MODULE)
    except ImportError as error:
        raise KerasTrainerChanged(
            f"distadam.enable_multiworker_fit needs {TRAINER_MODULE}, which Keras {keras.__version__} "
            "does not have (is the Keras backend TensorFlow?); distadam is tested with the Keras range "
            "declared in its pyproject.toml.") from error
    missing = [name for name in TRAINER_HOOKS if _resolve(module, name) is None]
    if missing:
        raise KerasTrainerChanged(
            f"distadam.enable_multiworker_fit patches {missing} in {TRAINER_MODULE}, which Keras "
            f"{keras.__version__} does not have; distadam is tested with the Keras range declared in "
            "its pyproject.toml.")
    return module


def _resolve(module, dotted):
    owner = module
    for part in dotted.split("."):
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return owner


def trainer_hook(dotted):
    """The current value of a ``TRAINER_HOOKS`` entry (possibly our patch)."""
    return _resolve(tensorflow_trainer(), dotted)


def set_trainer_hook(dotted, value) -> None:
    """Replace a ``TRAINER_HOOKS`` entry (a module function or a class attribute)."""
    owner, _, name = dotted.rpartition(".")
    setattr(_resolve(tensorflow_trainer(), owner) if owner else tensorflow_trainer(), name, value)


def is_multi_worker(strategy) -> bool:
    """Keras' own test for a MultiWorkerMirroredStrategy on more than one
    worker: the case where its trainer breaks, and where our patches act."""
    return strategy is not None and bool(trainer_hook("_collective_all_reduce_multi_worker")(strategy))


def model_strategy(model):
    """The strategy the model was created under, or None (Keras' TF trainer
    keeps it as ``_distribute_strategy``; None means "build lazily")."""
    return getattr(model, "_distribute_strategy", None)


def symbolic_build(model, data_batch) -> None:
    """Keras' build of the model, metrics and optimizer from one batch."""
    model._symbolic_build(data_batch=data_batch)


def autoconvert_optionals(model, step):
    """Keras' wrapper turning empty ``tf.experimental.Optional`` inputs into None."""
    return model._autoconvert_optionals(step)


# --------------------------------------------------------------------------
# Shape-only model loading (``distadam plan --model``).

def deferred_variables():
    """Keras' list of variables whose initializer a
    ``StatelessScope(initialize_variables=False)`` deferred, or None.

    Keras 3 has no public way to drop deferred variables
    (``keras.utils.clear_session()`` would, but it resets all of Keras' global
    state, other models' name counters included, in a process that may be
    training). Fallback, when ``keras.src`` moves: nothing is dropped; the
    shapes are still right, and the one cost is that a later
    ``StatelessScope`` in the same process allocates the planned model's
    weights (a CLI run exits first)."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:
        return None
    return global_state.get_global_attribute("uninitialized_variables", [], set_to_default=True)
