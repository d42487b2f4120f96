"""Communication backends. Adding one is one file: subclass
:class:`distadam.comm.base.Collectives` and register it in ``BACKENDS``."""

from __future__ import annotations

from distadam.comm.base import Collectives
from distadam.comm.tf_distribute import DistributeCollectives

BACKENDS = {"tf.distribute": "distadam.comm.tf_distribute:DistributeCollectives"}
BACKENDS["horovod"] = "distadam.comm.horovod:HorovodCollectives"


def register_backend(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (imported lazily on use)."""
    BACKENDS[name] = target


def _load(name: str):
    import importlib

    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def resolve_backend(name: str = "auto") -> Collectives:
    """Backend instance for ``name``; ``"auto"`` picks tf.distribute when a
    strategy is active, else Horovod when it is initialised, else tf.distribute
    (default strategy, one worker)."""
    import tensorflow as tf

    if name == "auto":
        if not tf.distribute.has_strategy() and "horovod" in BACKENDS and _horovod_initialized():
            name = "horovod"
        else:
            name = "tf.distribute"
    if name not in BACKENDS:
        raise ValueError(
            f"Unknown backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}"
        )
    return _load(name)()


def _horovod_initialized() -> bool:
    import sys

    hvd = sys.modules.get("horovod.tensorflow")
    if hvd is None:
        return False
    try:
        return bool(hvd.is_initialized())
    except Exception:  # an uninitialised Horovod raises instead of answering
        return False


__all__ = ["Collectives", "DistributeCollectives", "resolve_backend", "register_backend", "BACKENDS"]
