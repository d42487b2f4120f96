"""Self time per op type from a ``tf.profiler`` trace of a few steps.

The one place the benchmarks touch private TensorFlow: the public
``tf.profiler.experimental`` API records a trace but offers no way to read
one back; only TensorBoard's profile plugin converts it, through the pybind
module :func:`framework_op_stats` imports. Fallback, when that module moves
or refuses the trace: the variant's profile is ``{"error": ...}`` and its
timing is unaffected (tests/test_benchmarks.py runs that path).
"""

from __future__ import annotations

import json
from pathlib import Path

#: Where TensorFlow 2.21 keeps the converter (private; may move).
PLUGIN_MODULE = "tensorflow.python.profiler.internal._pywrap_profiler_plugin"


def framework_op_stats(xplanes) -> str | None:
    """The trace's per-op table (TensorBoard's "framework_op_stats" tool)
    as JSON text, or None when the converter is missing or fails."""
    try:
        import importlib

        plugin = importlib.import_module(PLUGIN_MODULE)
    except ImportError:
        return None
    try:
        data, ok = plugin.xspace_to_tools_data(list(xplanes), "framework_op_stats", {})
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None  # the module moved its API: same fallback as a missing module
    return data if ok else None


def summarize(data: str, profile_steps: int, top: int) -> dict:
    """Busy and idle milliseconds per step and the ``top`` ops by self time,
    from :func:`framework_op_stats`' JSON."""
    table = json.loads(data)
    if isinstance(table, list):  # [host table, device table]; CPU ops are on the host
        table = table[0]
    columns = [c["id"] for c in table["cols"]]
    by_type, by_name = {}, {}
    for row in table["rows"]:
        cells = dict(zip(columns, (c.get("v") for c in row["c"])))
        op_type = cells.get("type") or cells.get("operation")
        self_time = float(cells.get("total_self_time") or 0.0)
        by_type[op_type] = by_type.get(op_type, 0.0) + self_time
        by_name[f"{op_type} {cells.get('operation')}"] = self_time
    idle = by_type.pop("IDLE", 0.0)
    busy = sum(by_type.values()) or 1.0
    per_step = 1e3 * profile_steps  # microseconds -> ms per step

    def largest(table):
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [{"op": k, "ms_per_step": v / per_step} for k, v in ranked]

    return {"busy_ms_per_step": busy / per_step, "idle_ms_per_step": idle / per_step,
            "by_op_type": largest(by_type), "by_op": largest(by_name)}


def op_profile(run, path: Path, profile_steps: int, top: int) -> dict:
    """Trace ``profile_steps`` calls of ``run`` into ``path`` and summarize."""
    import tensorflow as tf

    tf.profiler.experimental.start(str(path))
    for _ in range(profile_steps):
        run()
    tf.profiler.experimental.stop()
    data = framework_op_stats(str(p) for p in Path(path).rglob("*.xplane.pb"))
    if data is None:
        return {"error": "profiler plugin could not convert the trace"}
    return summarize(data, profile_steps, top)
