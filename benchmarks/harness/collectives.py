"""Collectives in a traced step: which ops launch one, the bytes of each
input, and what each worker sends. Bytes sent come from
``distadam.cost_model.bytes_sent``, the ring table the planner and the time
model use (TensorFlow's CPU RingReducer/RingGatherer and Horovod's Gloo/MPI
ring implement those algorithms)."""

from __future__ import annotations

import numpy as np

from distadam import cost_model

# Graph op types that launch a collective, and what they do.
COLLECTIVE_KINDS = {
    "CollectiveReduceV2": "all_reduce",
    "CollectiveReduce": "all_reduce",
    "CollectiveGatherV2": "all_gather",
    "CollectiveGather": "all_gather",
    "CollectiveReduceScatterV2": "reduce_scatter",
    "CollectiveAllToAllV2": "all_to_all",
    "CollectiveAllToAllV3": "all_to_all",
    "NcclAllReduce": "all_reduce",
    "HorovodAllreduce": "all_reduce",
    "HorovodGroupedAllreduce": "all_reduce",
    "HorovodAllgather": "all_gather",
    "HorovodGroupedAllgather": "all_gather",
    "HorovodAlltoall": "all_to_all",
    "HorovodReducescatter": "reduce_scatter",
    "HorovodGroupedReducescatter": "reduce_scatter",
    "HorovodBroadcast": "broadcast",
}


def traced_collectives(graph):
    """Every collective op in a traced step graph, with the bytes of its
    (per-worker) input, or ``None`` where the graph leaves the size dynamic
    (TensorFlow's all-gather pads its input to a size it learns at run time;
    :func:`fill_dynamic_sizes` supplies those). Raises if a collective hides
    inside a nested function body (cond/while), where it would be missed."""
    ops = []
    for op in graph.get_operations():
        kind = COLLECTIVE_KINDS.get(op.type)
        if kind is None:
            continue
        nbytes = 0
        for tensor in op.inputs[: _num_data_inputs(op)]:
            if not tensor.shape.is_fully_defined():
                nbytes = None
                break
            nbytes += int(np.prod(tensor.shape.as_list())) * tensor.dtype.size
        ops.append({"op": op.type, "kind": kind, "bytes": nbytes, "device": op.device})

    library = graph.as_graph_def().library
    nested = sum(
        1 for fn in library.function for node in fn.node_def if node.op in COLLECTIVE_KINDS
    )
    if nested:
        raise ValueError(
            f"{nested} collective op(s) inside nested function bodies: the byte accounting "
            "only sees the top-level step graph"
        )
    return ops


class CallRecorder:
    """Records the per-worker input size of every collective a distadam
    backend issues while a step is traced, by wrapping its private
    implementation methods on the instance (the public methods keep counting
    ``launches``)."""

    METHODS = {"_reduce_scatter_sum": "reduce_scatter", "_all_reduce_sum": "all_reduce", "_all_gather": "all_gather",
               "_all_gather_rows": "all_gather"}

    def __init__(self, collectives):
        self.calls = []
        for method, kind in self.METHODS.items():
            original = getattr(collectives, method)

            def wrapped(tensor, name, _original=original, _kind=kind):
                shape = tensor.shape
                if not shape.is_fully_defined():
                    raise ValueError(f"{_kind} input has a dynamic shape {shape}")
                self.calls.append((_kind, int(np.prod(shape.as_list())) * tensor.dtype.size))
                return _original(tensor, name)

            setattr(collectives, method, wrapped)

    def bytes_of(self, kind):
        return [nbytes for k, nbytes in self.calls if k == kind]


def fill_dynamic_sizes(ops, recorder):
    """Give dynamically shaped graph collectives the sizes the backend saw.
    Only TensorFlow's all-gather of equal shards produces them (one data
    gather per ``all_gather`` call, padded to the largest shard = the shard),
    so the counts must agree exactly; the byte total per kind is then exact
    whatever the pairing."""
    dynamic = [op for op in ops if op["bytes"] is None]
    if not dynamic:
        return ops
    kinds = {op["kind"] for op in dynamic}
    if kinds != {"all_gather"}:
        raise ValueError(f"dynamic-shaped collectives of kinds {sorted(kinds)}: no size source")
    sizes = recorder.bytes_of("all_gather") if recorder else []
    if len(sizes) != len(dynamic):
        raise ValueError(
            f"{len(dynamic)} dynamic-shaped all-gathers in the graph but the backend issued "
            f"{len(sizes)} all_gather calls: cannot attribute sizes"
        )
    for op, nbytes in zip(dynamic, sorted(sizes)):
        op["bytes"] = nbytes
    return ops


def _num_data_inputs(op):
    # Grouped Horovod ops take several tensors; every other collective has the
    # data first, then group size/keys/ordering tokens.
    if op.type.startswith("HorovodGrouped"):
        return int(op.get_attr("num_tensors"))
    return 1


def collective_summary(ops, workers_in_graph: int, n: int) -> dict:
    """Per-worker launches and bytes for one step. Under MirroredStrategy one
    graph holds every replica's ops, so counts are divided by the replicas in
    the graph (each replica launches the same collectives)."""
    launches, sizes = {}, {}
    sent = 0.0
    for op in ops:
        launches[op["kind"]] = launches.get(op["kind"], 0) + 1
        sizes.setdefault(op["kind"], []).append(op["bytes"])
        sent += cost_model.bytes_sent(op["kind"], n, op["bytes"])
    per_worker = {k: v / workers_in_graph for k, v in launches.items()}
    for kind, value in per_worker.items():
        if value != int(value):
            raise ValueError(f"{kind} launches {launches[kind]} not divisible by {workers_in_graph} replicas")
    return {
        "launches_per_step": {k: int(v) for k, v in sorted(per_worker.items())},
        "total_launches_per_step": int(sum(per_worker.values())),
        "bytes_sent_per_worker": sent / workers_in_graph,
        "collective_input_bytes": {k: sorted(set(v)) for k, v in sorted(sizes.items())},
    }
