"""ShardedAdam's state in ``keras.optimizers.Adam``'s exact layout.

``model.save`` / ``save_weights`` / ``BackupAndRestore`` call the optimizer's
``save_own_variables(store)``; ShardedAdam fills ``store`` with consolidated
(gathered) state under the same keys, in the same order, as plain Adam would,
so the file loads into plain Adam, and into ShardedAdam on any worker count.

Loading a distadam model into plain Keras Adam, in one line::

    model = distadam.keras_format.load_model_as_adam("model.keras")

and without distadam installed (the file names ``distadam>ShardedAdam``, which
Keras cannot find), map that name to an object whose ``from_config`` builds
Adam from the arguments Adam knows::

    adam_keys = keras.optimizers.Adam().get_config()
    as_adam = type("AsAdam", (), {"from_config": staticmethod(lambda c: keras.optimizers.Adam.from_config(
        {k: v for k, v in c.items() if k in adam_keys}))})
    model = keras.saving.load_model("model.keras", custom_objects={"distadam>ShardedAdam": as_adam})

Either way the optimizer state (moments, iterations) continues the same
trajectory in plain Adam.
"""

from __future__ import annotations

import keras
import numpy as np


def adam_variable_order(optimizer) -> list:
    """(kind, variable_index) in the order ``keras.optimizers.Adam`` lists
    its ``variables`` for the same constructor arguments."""
    order = [("iteration", None)]
    if _learning_rate_variable(optimizer) is not None:
        order.append(("learning_rate", None))
    count = optimizer.layout.num_variables
    if optimizer.use_ema:
        order += [("average", i) for i in range(count)]
    if optimizer.gradient_accumulation_steps:
        order += [("accumulator", i) for i in range(count)]
    for i in range(count):
        order += [("momentum", i), ("velocity", i)]
    if optimizer.amsgrad:
        order += [("velocity_hat", i) for i in range(count)]
    return order


def save_adam_layout(optimizer, store) -> None:
    """Fill ``store`` as ``keras.optimizers.Adam.save_own_variables`` would.
    Gathers every state kind: a collective."""
    state = optimizer.sharded_state
    full = {kind: state.gather(kind) for kind in state.kinds}
    for key, (kind, index) in enumerate(adam_variable_order(optimizer)):
        if kind == "iteration":
            value = optimizer.iterations_variable.numpy()
        elif kind == "learning_rate":
            value = _learning_rate_variable(optimizer).numpy()
        else:
            value = full[kind][index]
        store[str(key)] = value


def load_adam_layout(optimizer, store) -> bool:
    """Load Adam-layout state (written by ShardedAdam on any worker count, or
    by plain ``keras.optimizers.Adam``); each worker keeps only its shards.
    Returns False, touching nothing, when ``store`` does not have Adam's
    variable count for this configuration (Keras then warns and skips)."""
    order = adam_variable_order(optimizer)
    if len(store.keys()) != len(order):
        return False
    shapes = optimizer.layout.variable_shapes()
    per_kind = {}
    scalars = {}
    for key, (kind, index) in enumerate(order):
        value = np.asarray(store[str(key)])
        if index is None:
            scalars[kind] = value
            continue
        expected = shapes[index]
        if value.shape != expected:
            raise ValueError(
                f"Saved {kind} for variable #{index} has shape {value.shape}, "
                f"expected {expected}: the checkpoint is for a different model."
            )
        per_kind.setdefault(kind, {})[index] = value
    # Everything checked: now write.
    for kind, values in per_kind.items():
        optimizer.sharded_state.load_full(kind, values)
    optimizer.iterations_variable.assign(scalars["iteration"])
    if "learning_rate" in scalars:
        _learning_rate_variable(optimizer).assign(scalars["learning_rate"])
    return True


def ema_mirror(optimizer) -> list:
    """Full-shaped variables holding a ``use_ema`` ShardedAdam's EMA, what
    Keras' optimizers keep as ``_model_variables_moving_average``.

    The EMA itself stays sharded; this mirror is made on first use (one full
    copy of the trainable weights per replica, the memory Keras' EMA takes;
    only code that asks pays it) and refreshed from the shards (a
    collective: every worker reads it at the same point, as callbacks do)
    when training has advanced since the last refresh. Not refreshing
    otherwise is what makes ``keras.callbacks.SwapEMAWeights``' in-place
    exchange work: between its swap-in and its swap-out nothing trains, and
    the mirror then holds the weights it swapped out. Writes to the mirror
    never reach the optimizer's EMA."""
    import tensorflow as tf

    from distadam import _keras_internals as hooks

    step = int(optimizer.iterations_variable.numpy())
    mirror = optimizer.__dict__.get("_ema_mirror")
    if mirror is not None and mirror[0] == step:
        return list(mirror[1])
    averages = optimizer.gather_full_state("average")
    if mirror is None:
        strategy = hooks.distribution_strategy(optimizer) or tf.distribute.get_strategy()
        with strategy.scope():
            variables = [tf.Variable(average, trainable=False, name=f"ema_mirror_{index}")
                         for index, average in enumerate(averages)]
    else:
        variables = mirror[1]
        for variable, average in zip(variables, averages):
            variable.assign(average)
    hooks.set_untracked(optimizer, "_ema_mirror", (step, variables))
    return list(variables)


def write_average_into(optimizer, variables) -> None:
    """Keras' EMA finalisation (``finalize_variable_values``): each of
    ``variables`` the optimizer was built with takes its EMA (gathered: a
    collective)."""
    from distadam import _keras_internals as hooks

    averages = optimizer.gather_full_state("average")
    for variable in variables:
        index = hooks.variable_index(optimizer, variable)
        if index is not None:
            variable.assign(averages[index])


def _learning_rate_variable(optimizer):
    """The variable holding a float learning rate (Keras' getter returns it
    as is), or None for a schedule or a callable."""
    rate = optimizer.learning_rate
    return rate if isinstance(rate, keras.Variable) else None


class _PlainAdamFromConfig:
    """Stands in for ShardedAdam when a saved model is loaded: builds a plain
    ``keras.optimizers.Adam`` from the Adam arguments of the saved config."""

    @staticmethod
    def from_config(config, custom_objects=None):
        adam_keys = keras.optimizers.Adam().get_config()
        return keras.optimizers.Adam.from_config({k: v for k, v in config.items() if k in adam_keys})


def load_model_as_adam(path, **kwargs):
    """``keras.saving.load_model`` with every distadam optimizer in the file
    loaded as its plain Keras counterpart (``ShardedAdam`` as
    ``keras.optimizers.Adam``, ``distadam.LossScaleOptimizer`` as Keras'),
    carrying the same state.

    Keras prefers registered classes to ``custom_objects``, so distadam's
    registrations are lifted (through the public
    ``keras.saving.get_custom_objects()``) for the duration of the load and
    put back afterwards; not safe to call while another thread deserializes
    distadam objects."""
    plain = {
        "distadam>ShardedAdam": _PlainAdamFromConfig,
        "distadam>LossScaleOptimizer": keras.optimizers.LossScaleOptimizer,
    }
    registered = keras.saving.get_custom_objects()
    lifted = {name: registered.pop(name) for name in plain if name in registered}
    try:
        custom_objects = {**(kwargs.pop("custom_objects", None) or {}), **plain}
        return keras.saving.load_model(path, custom_objects=custom_objects, **kwargs)
    finally:
        registered.update(lifted)
