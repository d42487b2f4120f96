"""Communication backends.

Adding one is one file: subclass :class:`distadam.collectives.base.Collectives`
and register it, e.g. ``register_backend("mpi", "my_pkg.mpi_backend:MPICollectives")``;
then ``ShardedAdam(backend="mpi")`` uses it. Backends are imported lazily, so
an optional framework (Horovod) is only imported when its backend is chosen.
"""

from __future__ import annotations

import importlib
import sys

from distadam.collectives.base import Collectives

BACKENDS = {
    "tf.distribute": "distadam.collectives.tf_distribute:DistributeCollectives",
    "horovod": "distadam.collectives.horovod:HorovodCollectives",
}


def register_backend(name: str, target: str) -> None:
    """Register ``"module:Class"`` (a :class:`Collectives` subclass) under ``name``."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    module_name, sep, class_name = str(target).partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"backend target must look like 'package.module:Class', got {target!r}")
    BACKENDS[name] = target


def backend_class(name: str) -> type:
    """The registered class for ``name`` (imports its module)."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    module_name, _, class_name = BACKENDS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Collectives)):
        raise TypeError(f"backend {name!r} ({BACKENDS[name]}) is not a Collectives subclass")
    return cls


def resolve_backend(name: str = "auto") -> Collectives:
    """Backend instance for ``name``; ``"auto"`` picks tf.distribute when a
    strategy is active, else Horovod when it is initialised, else
    tf.distribute (default strategy, one worker)."""
    import tensorflow as tf

    if name == "auto":
        if not tf.distribute.has_strategy() and _horovod_initialized():
            name = "horovod"
        else:
            name = "tf.distribute"
    return backend_class(name)()


def _horovod_initialized() -> bool:
    hvd = sys.modules.get("horovod.tensorflow")  # never import Horovod just to ask
    if hvd is None:
        return False
    try:
        return bool(hvd.is_initialized())
    except Exception:  # an uninitialised Horovod raises instead of answering
        return False


__all__ = ["Collectives", "BACKENDS", "backend_class", "register_backend", "resolve_backend"]
