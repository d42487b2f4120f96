"""distadam: memory-efficient, exactly-correct distributed Adam for Keras 3."""

from distadam.optimizer import ShardedAdam
from distadam.partition import Layout, plan_layout

__version__ = "0.1.0"
__all__ = ["ShardedAdam", "Layout", "plan_layout", "__version__"]
from distadam.cluster import resolve_cluster, strategy_from_env  # noqa: E402,F401
