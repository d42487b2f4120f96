"""Optimizer state accounting: bytes of every optimizer variable's copy on
each local device, read from the variables themselves."""

from __future__ import annotations

import numpy as np

def _components(variable):
    """(device, tensor) for each local copy of a Keras/TF variable: one per
    replica for mirrored and per-replica variables, one otherwise."""
    value = getattr(variable, "value", variable)
    copies = getattr(value, "values", None)
    if copies is None:
        return [(value.device, value)]
    return [(c.device, c) for c in copies]


def optimizer_state_bytes(optimizer, model_variables=()) -> dict:
    """Bytes of optimizer state held on each local device, read from the real
    variable copies. Left out: the iteration counter and a learning-rate
    variable (scalars every optimizer keeps replicated) and any model variable
    that ``optimizer.variables`` lists (a tracking slip must not be mistaken
    for optimizer state; :func:`tracked_model_variables` reports it)."""
    # ``_iterations`` is the variable; with gradient accumulation the public
    # ``iterations`` is a derived tensor.
    counter = getattr(optimizer, "_iterations", optimizer.iterations)
    skip = {id(counter)} | {id(v) for v in model_variables}
    learning_rate = getattr(optimizer, "_learning_rate", None)
    if learning_rate is not None and hasattr(learning_rate, "assign"):
        skip.add(id(learning_rate))
    totals = {}
    for variable in optimizer.variables:
        if id(variable) in skip:
            continue
        for device, copy in _components(variable):
            nbytes = int(np.prod(copy.shape)) * copy.dtype.size
            totals[device] = totals.get(device, 0) + nbytes
    return totals


def tracked_model_variables(optimizer, model_variables) -> list:
    """Paths of model variables that appear in ``optimizer.variables``."""
    ids = {id(v) for v in model_variables}
    return [v.path for v in optimizer.variables if id(v) in ids]


def _short_device(device: str) -> str:
    # "/job:localhost/replica:0/task:0/device:CPU:3" -> "CPU:3"
    return device.rsplit("device:", 1)[-1] if "device:" in device else device


def by_short_device(totals: dict) -> dict:
    return {_short_device(k): v for k, v in sorted(totals.items())}
