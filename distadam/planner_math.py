"""The planner's maths: per-worker memory and bytes of Keras Adam vs
ShardedAdam for a list of variable shapes (:func:`plan`), and the predicted
communication time for every shard group size G (:func:`comm_plan`).

Pure Python on ShardedAdam's own layout code (:func:`distadam.partition.plan_layout`)
and the one byte/time model (:mod:`distadam.cost_model`): no TensorFlow. The
accounting is explained in distadam/planner.py's docstring (the CLI's help).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Sequence

from distadam import cost_model, worker_grid
from distadam.partition import DEFAULT_BUCKET_ELEMENTS, DTYPE_BYTES, plan_layout, resolve_bucket_elements

MASTER_DTYPE = "float32"
# ShardedAdam's default for both ``replicate=`` and ``row_sparse=`` (Keras'
# Embedding tables), as its signature declares it; tests/test_planner.py
# checks the two agree.
EMBEDDINGS = ("embeddings",)
# The state kinds that follow the master copy into float32 under
# ``master_weights`` (the paper's recipe keeps m and v in float32).
_MASTER_PRECISION = ("master", cost_model.STATE_KINDS["momentum"], cost_model.STATE_KINDS["velocity"])


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """Shape and dtype of one trainable variable (what plan_layout needs)."""

    name: str
    shape: tuple
    dtype: str


@dataclasses.dataclass(frozen=True)
class Plan:
    params: int
    workers: int
    param_bytes: int  # Ψ in bytes: the parameters (and one gradient) in their dtype
    adam: dict  # component -> bytes per worker, data-parallel Keras Adam
    sharded: dict  # component -> bytes per worker, ShardedAdam
    k_bytes_per_param: float  # the paper's K
    padding_elements: int
    comm: dict  # name -> bytes sent per worker per optimizer update
    options: dict
    # Per row-sparse variable (matched by row_sparse patterns): its state and
    # traffic per worker under each placement, and Keras Adam's.
    placements: list = dataclasses.field(default_factory=list)

    @property
    def adam_total(self) -> int:
        return sum(self.adam.values())

    @property
    def sharded_total(self) -> int:
        return sum(self.sharded.values())

    @property
    def sharded_state_bytes(self) -> int:
        """Optimizer state per worker (what ``state_bytes_per_device`` reports)."""
        return sum(v for k, v in self.sharded.items() if k not in ("params", "grads"))

    @property
    def adam_state_bytes(self) -> int:
        return sum(v for k, v in self.adam.items() if k not in ("params", "grads"))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(adam_total=self.adam_total, sharded_total=self.sharded_total,
                   sharded_state_bytes=self.sharded_state_bytes, adam_state_bytes=self.adam_state_bytes)
        return out


def itemsize(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


def state_kinds(amsgrad=False, ema=False, accumulation_steps=None) -> list:
    """Optimizer state kinds, in ShardedAdam's order, by the planner's keys."""
    return [cost_model.STATE_KINDS[kind] for kind in cost_model.state_kinds(amsgrad, ema, accumulation_steps)]


def _matching(variables, patterns) -> list:
    """Indices of the variables whose name contains a pattern (as the
    optimizer matches ``replicate=`` and ``row_sparse=``)."""
    return [i for i, v in enumerate(variables) if any(p in v.name for p in patterns)]


def plan(
    variables: Sequence[VariableSpec],
    workers: int,
    *,
    amsgrad: bool = False,
    ema: bool = False,
    accumulation_steps: int | None = None,
    master_weights: bool = False,
    bucket_elements: int | None = DEFAULT_BUCKET_ELEMENTS,
    shard_alignment: int = 1,
    replicate: Sequence[str] = EMBEDDINGS,
    row_sparse: Sequence[str] = EMBEDDINGS,
    min_shard_elements: int = 0,
    rows_per_step: int | None = None,
) -> Plan:
    """Per-worker memory and communication for ``variables`` on ``workers``,
    with ShardedAdam's layout for the same arguments and the same defaults
    (``replicate`` and ``row_sparse`` patterns match variable names as the
    optimizer's do).
    ``rows_per_step``: rows of each row-sparse variable one worker's gradient
    holds per micro-step (e.g. batch x ids per example); without it their
    gradients are counted dense."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if accumulation_steps is not None and (not isinstance(accumulation_steps, int) or accumulation_steps < 2):
        raise ValueError(f"accumulation_steps must be an integer >= 2 or None, got {accumulation_steps!r}")
    if not variables:
        raise ValueError("no trainable variables to plan for")
    for spec in variables:
        itemsize(spec.dtype)
    if master_weights and any(itemsize(v.dtype) != 2 for v in variables):
        raise ValueError("--master-weights models 16-bit parameters with a float32 master copy: "
                         "use --dtype bfloat16 or float16")

    params = sum(math.prod(v.shape) for v in variables)
    param_bytes = sum(math.prod(v.shape) * itemsize(v.dtype) for v in variables)
    kinds = state_kinds(amsgrad, ema, accumulation_steps)

    # State dtype per kind. With master weights (the paper's recipe) m, v and
    # the master copy are float32; the others stay in the parameter dtype.
    def kind_itemsize(kind, dtype):
        if master_weights and kind in _MASTER_PRECISION:
            return itemsize(MASTER_DTYPE)
        return itemsize(dtype)

    state_kinds_all = (["master"] if master_weights else []) + kinds

    adam = {"params": param_bytes, "grads": param_bytes}
    for kind in state_kinds_all:
        adam[kind] = sum(math.prod(v.shape) * kind_itemsize(kind, v.dtype) for v in variables)

    if rows_per_step is not None and (not isinstance(rows_per_step, int) or rows_per_step < 1):
        raise ValueError(f"rows_per_step must be a positive integer, got {rows_per_step!r}")
    separate = _matching(variables, row_sparse)
    layout = plan_layout(list(variables), num_shards=workers, bucket_elements=bucket_elements,
                         shard_alignment=shard_alignment, replicated=_matching(variables, replicate),
                         separate=separate, min_shard_elements=min_shard_elements)
    sharded = {"params": param_bytes, "grads": param_bytes}
    for kind in state_kinds_all:
        sharded[kind] = sum(b.shard_size * kind_itemsize(kind, b.dtype) for b in layout.buckets)
    padding = sum(b.padding for b in layout.buckets)

    k = sum(adam[kind] for kind in state_kinds_all) / params

    n = workers
    padded_bytes = sum(b.padded_size * itemsize(b.dtype) for b in layout.buckets)
    micro = accumulation_steps or 1
    factor = lambda kind: cost_model.bytes_factor(kind, n)  # noqa: E731  (of the full buffer)
    comm = {
        "allreduce_bound": param_bytes * factor("all_reduce"),
        "adam_allreduce": param_bytes * factor("all_reduce"),
        # ZeRO-1: reduce-scatter every micro-step, all-gather once.
        "zero1_reduce_scatter_all_gather": micro * padded_bytes * factor("reduce_scatter")
        + padded_bytes * factor("all_gather"),
        # The portable path's reduce-scatter is an all-reduce and a slice.
        "sharded_allreduce_slice": micro * padded_bytes * factor("all_reduce") + padded_bytes * factor("all_gather"),
    }
    sparse = set(separate) if rows_per_step else set()
    comm["sharded_as_configured"] = sum(
        _bucket_bytes(b, n, micro, rows_per_step if _sparse_bucket(b, sparse) else None) for b in layout.buckets)
    comm["adam_as_configured"] = sum(
        _adam_variable_bytes(v, n, rows_per_step if i in sparse else None) for i, v in enumerate(variables))
    placements = [_placement_row(variables[i], n, micro, state_kinds_all, kind_itemsize, rows_per_step,
                                 shard_alignment) for i in separate]
    options = {
        "amsgrad": amsgrad, "ema": ema, "accumulation_steps": accumulation_steps,
        "master_weights": master_weights, "bucket_elements": bucket_elements,
        "shard_alignment": shard_alignment, "dtypes": sorted({v.dtype for v in variables}),
        "buckets": len(layout.buckets), "replicate": list(replicate), "row_sparse": list(row_sparse),
        "rows_per_step": rows_per_step, "min_shard_elements": min_shard_elements,
        "replicated_buckets": sum(b.replicated for b in layout.buckets),
    }
    return Plan(params=params, workers=n, param_bytes=param_bytes, adam=adam, sharded=sharded,
                k_bytes_per_param=k, padding_elements=padding, comm=comm, options=options,
                placements=placements)


# plan()'s keyword defaults, read from its signature so that comm_plan, which
# forwards the same keywords, declares none of them a second time.
_PLAN_DEFAULTS = {name: p.default for name, p in inspect.signature(plan).parameters.items()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY}


# Bytes each worker sends per update for one bucket or variable, from
# cost_model's ring table. A sparse gradient's rows travel as one all-gather
# of its values plus the index of each row.
def _row_bytes(variable, rows):
    return cost_model.sparse_rows_bytes(rows, math.prod(variable.shape[1:]), itemsize(variable.dtype))


def _sparse_bucket(bucket, sparse_indices) -> bool:
    return len(bucket.segments) == 1 and bucket.segments[0].variable_index in sparse_indices


def _bucket_bytes(bucket, n, micro, rows) -> float:
    size = itemsize(bucket.dtype)
    if rows is not None:
        (seg,) = bucket.segments
        reduce = cost_model.bytes_sent("all_gather", n, _row_bytes(VariableSpec(seg.name, seg.shape, bucket.dtype),
                                                                    rows))
    elif bucket.replicated:
        reduce = bucket.num_elements * size * cost_model.bytes_factor("all_reduce", n)
    else:
        reduce = bucket.padded_size * size * cost_model.bytes_factor("reduce_scatter", n)
    gather = 0.0 if bucket.replicated else bucket.padded_size * size * cost_model.bytes_factor("all_gather", n)
    return micro * reduce + gather


def _adam_variable_bytes(variable, n, rows) -> float:
    if rows is not None:  # Keras all-gathers an IndexedSlices gradient's rows
        return cost_model.bytes_sent("all_gather", n, _row_bytes(variable, rows))
    return cost_model.bytes_sent("all_reduce", n, math.prod(variable.shape) * itemsize(variable.dtype))


def _placement_row(variable, n, micro, kinds, kind_itemsize, rows, shard_alignment) -> dict:
    """One row-sparse variable alone in its bucket, sharded vs replicated."""
    elements = math.prod(variable.shape)
    shard = -(-elements // n)
    shard = -(-shard // shard_alignment) * shard_alignment
    state = lambda size: sum(size * kind_itemsize(kind, variable.dtype) for kind in kinds)  # noqa: E731
    sharded = plan_layout([variable], n, bucket_elements=None, shard_alignment=shard_alignment).buckets[0]
    replicated = plan_layout([variable], n, bucket_elements=None, replicated=[0]).buckets[0]
    return {
        "name": variable.name, "shape": list(variable.shape), "elements": elements,
        "rows_per_step": rows,
        "state_sharded": state(shard), "state_replicated": state(elements), "state_adam": state(elements),
        "bytes_sharded": _bucket_bytes(sharded, n, micro, rows),
        "bytes_replicated": _bucket_bytes(replicated, n, micro, rows),
        "bytes_adam": micro * _adam_variable_bytes(variable, n, rows),
    }


# ------------------------------------------------------- communication time
def bucket_shapes(variables, *, bucket_elements=DEFAULT_BUCKET_ELEMENTS, replicate=EMBEDDINGS,
                  row_sparse=EMBEDDINGS, min_shard_elements=0, split_first=False) -> list:
    """The buckets ShardedAdam lays ``variables`` out in, as
    ``cost_model.BucketShape``s (which buckets exist does not depend on G;
    their padding does, and the cost model adds it).

    ``split_first``: the first variable stands for a whole model given by
    ``--params``; it is cut into buckets of ``bucket_elements`` as a model
    of many variables smaller than the cap would be. (A model whose
    variables exceed the cap gets fewer, larger buckets, each its own:
    fewer latency terms; ``--model`` plans the real ones.)"""
    # Two shards: min_shard_elements replicates small buckets only when
    # there is more than one shard; any count above one decides alike.
    layout = plan_layout(list(variables), num_shards=2, bucket_elements=bucket_elements,
                         replicated=_matching(variables, replicate), separate=_matching(variables, row_sparse),
                         min_shard_elements=min_shard_elements)
    shapes = []
    for bucket in layout.buckets:
        size = itemsize(bucket.dtype)
        if split_first and bucket_elements and [s.variable_index for s in bucket.segments] == [0] \
                and not bucket.replicated:
            full, rest = divmod(bucket.num_elements, bucket_elements)
            for count, elements in ((full, bucket_elements), (1 if rest else 0, rest)):
                if count:
                    shapes.append(cost_model.BucketShape(count, elements, size,
                                                         replicated=elements < min_shard_elements))
            continue
        shapes.append(cost_model.BucketShape(1, bucket.num_elements, size, replicated=bucket.replicated))
    return shapes


def comm_plan(variables, workers, network, *, base=None, group_size=None, memory_budget=None,
              tolerance=cost_model.DEFAULT_TOLERANCE, split_first=False, **plan_kwargs) -> dict:
    """Predicted communication time per optimizer update and model states per
    worker for Keras Adam and for ShardedAdam with every shard group size G
    dividing ``workers`` (alpha-beta model, distadam/cost_model.py), and the
    recommended G. ``memory_budget``: bytes per device for the model states
    (parameters, gradients, optimizer state). ``plan_kwargs``: :func:`plan`'s
    keywords, with its defaults."""
    cost_model.check_workers(workers, network)
    if group_size is not None:
        cost_model.check_group_size(workers, group_size)
    options = {**_PLAN_DEFAULTS, **plan_kwargs}
    # "auto" buckets are sized for all N workers, whatever G (as the optimizer sizes them).
    requested_buckets = options["bucket_elements"]
    options["bucket_elements"] = resolve_bucket_elements(requested_buckets, workers, [v.dtype for v in variables])
    plan_kwargs = {**plan_kwargs, "bucket_elements": options["bucket_elements"]}
    base = base or plan(variables, workers, **plan_kwargs)
    shapes = bucket_shapes(variables, bucket_elements=options["bucket_elements"], replicate=options["replicate"],
                           row_sparse=options["row_sparse"], min_shard_elements=options["min_shard_elements"],
                           split_first=split_first)
    micro = options["accumulation_steps"] or 1
    rows = []
    for g in cost_model.divisors(workers):
        # The state of the hybrid layout is the layout of G shards: the same
        # code as the optimizer's, with num_shards=G.
        hybrid = base if g == workers else plan(variables, g, **plan_kwargs)
        timing = cost_model.sharded_time(shapes, workers, g, network, shard_alignment=options["shard_alignment"],
                                         micro_steps=micro)
        rows.append({"group_size": g, "seconds": timing["seconds"], "phases": timing["phases"],
                     "collectives": timing["collectives"], "bytes_sent": timing["bytes_sent"],
                     "links": timing["links"], "state_bytes": hybrid.sharded_state_bytes,
                     "total_bytes": hybrid.sharded_total,
                     "fits": None if memory_budget is None else hybrid.sharded_total <= memory_budget})
    keras = cost_model.keras_adam_time(base.param_bytes, workers, network)
    keras.update(state_bytes=base.adam_state_bytes, total_bytes=base.adam_total,
                 fits=None if memory_budget is None else base.adam_total <= memory_budget)
    nodes = worker_grid.WorkerGrid(workers, workers, network.gpus_per_node).num_nodes
    return {
        "network": network.to_dict(), "workers": workers, "nodes": nodes,
        "buckets": sum(s.count for s in shapes), "bucket_elements": options["bucket_elements"],
        "bucket_elements_requested": requested_buckets,
        "keras_adam": keras, "sharded": rows, "memory_budget": memory_budget, "tolerance": tolerance,
        "shard_group_size": group_size,
        "recommended": cost_model.recommend(rows, memory_budget, tolerance),
    }
