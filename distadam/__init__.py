"""distadam: memory-efficient, exactly-correct distributed Adam for Keras 3."""

try:
    import tensorflow as _tf  # noqa: F401
except ModuleNotFoundError as error:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        "distadam needs TensorFlow 2.21: pip install 'distadam[cpu]' (or 'distadam[gpu]')"
    ) from error

from distadam.loss_scale import LossScaleOptimizer
from distadam.optimizer import ShardedAdam
from distadam.partition import Layout, plan_layout

__version__ = "0.1.0"
__all__ = ["ShardedAdam", "LossScaleOptimizer", "Layout", "plan_layout", "__version__"]
from distadam.cluster import resolve_cluster, strategy_from_env  # noqa: E402,F401
