"""distadam: memory-efficient, exactly-correct distributed Adam for Keras 3.

The public names are loaded on first use (PEP 562 module ``__getattr__``):
``import distadam`` itself imports no TensorFlow, so the launcher
(``distadam launch``), cluster resolution and ``distadam plan --params`` run
in ~16 MB instead of TensorFlow's ~0.56 GB, and start without its import time. ``distadam.ShardedAdam`` (or ``from distadam import ShardedAdam``)
imports TensorFlow, and registers ShardedAdam with Keras' deserializer.
"""

import importlib
import sys

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ShardedAdam": "distadam.optimizer",
    "LossScaleOptimizer": "distadam.loss_scale",
    "Layout": "distadam.partition",
    "plan_layout": "distadam.partition",
    "resolve_cluster": "distadam.cluster",
    "strategy_from_env": "distadam.cluster",
    "enable_multiworker_fit": "distadam.multiworker_fit",
}
# Modules that need TensorFlow/Keras at import time.
_NEEDS_TENSORFLOW = {"distadam.optimizer", "distadam.loss_scale", "distadam.multiworker_fit"}

__all__ = ["ShardedAdam", "LossScaleOptimizer", "Layout", "plan_layout", "resolve_cluster",
           "strategy_from_env", "enable_multiworker_fit", "__version__"]


def _import(module_name):
    if module_name in _NEEDS_TENSORFLOW:
        try:
            import tensorflow  # noqa: F401
        except ModuleNotFoundError as error:
            if error.name != "tensorflow":
                raise
            raise ModuleNotFoundError(
                "distadam needs TensorFlow 2.21: pip install 'distadam[cpu]' (or 'distadam[gpu]')",
                name="tensorflow",
            ) from error
    return importlib.import_module(module_name)


def __getattr__(name):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'distadam' has no attribute {name!r}")
    value = getattr(_import(module_name), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


# A script that already imported Keras expects `import distadam` to make
# keras.models.load_model() know ShardedAdam, as before the lazy import; that
# costs nothing extra once TensorFlow is loaded.
if "keras" in sys.modules:
    __getattr__("ShardedAdam")
    __getattr__("LossScaleOptimizer")
