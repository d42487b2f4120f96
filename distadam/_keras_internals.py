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
