"""Cluster-sizing planner: per-worker memory and communication of plain
data-parallel Adam vs ShardedAdam (ZeRO stage 1).

    python -m distadam plan --params 7e9 --workers 64 --dtype bfloat16
    python -m distadam plan --model model.keras --workers 8 --amsgrad --ema

Accounting (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models", section 3.1 and 5)
------------------------------------------------------------------------
For Ψ parameters the paper counts the *model states*: parameters, gradients
and the optimizer state, the last as K·Ψ bytes. Data parallelism replicates
all three on every worker, (p + g + K)·Ψ; ZeRO stage 1 (P_os) shards the
optimizer state, (p + g)·Ψ + K·Ψ/N. Activations, temporary buffers and
fragmentation are outside this accounting, here as in the paper.

K is derived from the configuration instead of fixed:

* ShardedAdam keeps every state tensor in its variable's dtype (as Keras' Adam
  does): m and v give K = 2·itemsize (8 for float32, 4 for bfloat16), plus one
  itemsize each for ``amsgrad`` (v_hat), ``use_ema`` (the moving average) and
  ``gradient_accumulation_steps`` (the accumulator). Keras' ``mixed_*``
  precision policies keep variables in float32: plan those with
  ``--dtype float32``.
* ``--master-weights`` reproduces the paper's mixed-precision recipe: 16-bit
  parameters and gradients (p = g = 2) with a float32 master copy and float32
  m, v: K = 4 + 4 + 4 = 12. (Its 7.5B-parameter, N = 64 example: 120 GB per
  worker for data parallelism, 31.4 GB with P_os.) ShardedAdam has no separate
  master copy; this mode is for comparing with systems that do.

ShardedAdam's sharded state is exact, not Ψ/N: each dtype bucket is padded to
a multiple of N (and of ``shard_alignment``), so every state kind costs
ceil(elements / N) elements per worker and bucket. The planner uses the same
layout code as the optimizer (:func:`distadam.partition.plan_layout`), so its
numbers equal ``ShardedAdam.state_bytes_per_device()``.

Communication (bytes each worker sends per optimizer update, ring algorithms):

* data-parallel Adam: one all-reduce of the gradients, 2Ψ(N−1)/N — the
  bound against which ZeRO is measured;
* ZeRO-1 as in the paper: a reduce-scatter Ψ(N−1)/N plus an all-gather of
  the updated parameters Ψ(N−1)/N: the same 2Ψ(N−1)/N;
* ShardedAdam reduce-scatters each bucket and all-gathers the updated
  parameters: the ZeRO-1 bytes above, 2Ψ(N−1)/N, wherever the backend has a
  ring-bound reduce-scatter. That is the case for the tf.distribute backend on
  ``CollectiveAllReduce`` (the CPU default: an all-to-all plus a local sum, the
  same bytes) and for the Horovod backend (``alltoall`` on CPU,
  ``reducescatter`` on NCCL);
* where the backend must emulate the reduce-scatter with an all-reduce
  followed by a slice (tf.distribute's portable path: NCCL or TPU
  cross-device ops, or ``DISTADAM_DIRECT_COLLECTIVES=0``), the reduce-scatter
  costs an all-reduce: 3Ψ(N−1)/N in all;
* with gradient accumulation over A micro-steps ShardedAdam reduce-scatters
  every micro-step (its accumulator is sharded) and all-gathers once per
  update. The data-parallel row assumes full local accumulators and one
  all-reduce per update (Horovod's ``backward_passes_per_step``); Keras 3's
  own Adam cannot accumulate under MirroredStrategy at all (its accumulation
  ``cond`` contains the gradient all-reduce, a ``merge_call`` TensorFlow
  rejects inside control flow).

Collectives per step: one reduce-scatter and one all-gather per bucket; the
non-finite verdict rides in the gathered parameters. Only norm clipping adds
one small all-reduce (one scalar for ``global_clipnorm``, one per variable for
``clipnorm``), left out of the byte counts.

Communication time (``distadam/cost_model.py``): an alpha-beta model of the
ring collectives on nodes of ``--gpus-per-node`` workers (``--node-type``
presets, every figure overridable) predicts the time per update of Keras
Adam's all-reduce, of ShardedAdam over all N workers, and of hybrid sharding
``ShardedAdam(shard_group_size=G)`` for every G dividing N (reduce-scatter in
the group, all-reduce of the 1/G shard across the N/G groups, all-gather in
the group), next to each one's state per worker (the layout with G shards),
and recommends G: the fastest, or with ``--memory-per-device`` the fastest
whose model states fit. With ``--params`` the model is cut into buckets of
``--bucket-elements`` (each bucket pays its latency terms).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import zipfile
from typing import Sequence

from distadam import cost_model
from distadam.partition import DEFAULT_BUCKET_ELEMENTS, plan_layout

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
MASTER_DTYPE = "float32"
# Bounds on what the command line can ask for: well past any real model or
# cluster, small enough that every number stays exact in a float64.
MAX_PARAMS = 10**15
MAX_WORKERS = 10**6
# A .keras file's config.json is a few kB to a few MB; more is not a model.
MAX_CONFIG_BYTES = 64 << 20


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


def _itemsize(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") from None


def state_kinds(amsgrad=False, ema=False, accumulation_steps=None) -> list:
    """Optimizer state kinds, in ShardedAdam's order."""
    kinds = ["m", "v"]
    if amsgrad:
        kinds.append("v_hat")
    if ema:
        kinds.append("ema")
    if accumulation_steps:
        kinds.append("accumulator")
    return kinds


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
    replicate: Sequence[str] = ("embeddings",),
    row_sparse: Sequence[str] = ("embeddings",),
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
        _itemsize(spec.dtype)
    if master_weights and any(_itemsize(v.dtype) != 2 for v in variables):
        raise ValueError("--master-weights models 16-bit parameters with a float32 master copy: "
                         "use --dtype bfloat16 or float16")

    params = sum(math.prod(v.shape) for v in variables)
    param_bytes = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in variables)
    kinds = state_kinds(amsgrad, ema, accumulation_steps)

    # State dtype per kind. With master weights (the paper's recipe) m, v and
    # the master copy are float32; the others stay in the parameter dtype.
    def kind_itemsize(kind, dtype):
        if master_weights and kind in ("m", "v", "master"):
            return _itemsize(MASTER_DTYPE)
        return _itemsize(dtype)

    state_kinds_all = (["master"] if master_weights else []) + kinds

    adam = {"params": param_bytes, "grads": param_bytes}
    for kind in state_kinds_all:
        adam[kind] = sum(math.prod(v.shape) * kind_itemsize(kind, v.dtype) for v in variables)

    if rows_per_step is not None and (not isinstance(rows_per_step, int) or rows_per_step < 1):
        raise ValueError(f"rows_per_step must be a positive integer, got {rows_per_step!r}")
    names = [v.name for v in variables]
    replicated = [i for i, name in enumerate(names) if any(p in name for p in replicate)]
    separate = [i for i, name in enumerate(names) if any(p in name for p in row_sparse)]
    layout = plan_layout(list(variables), num_shards=workers, bucket_elements=bucket_elements,
                         shard_alignment=shard_alignment, replicated=replicated, separate=separate,
                         min_shard_elements=min_shard_elements)
    sharded = {"params": param_bytes, "grads": param_bytes}
    for kind in state_kinds_all:
        sharded[kind] = sum(b.shard_size * kind_itemsize(kind, b.dtype) for b in layout.buckets)
    padding = sum(b.padding for b in layout.buckets)

    k = sum(adam[kind] for kind in state_kinds_all) / params

    n = workers
    padded_bytes = sum(b.padded_size * _itemsize(b.dtype) for b in layout.buckets)
    frac = (n - 1) / n
    micro = accumulation_steps or 1
    comm = {
        "allreduce_bound": 2 * param_bytes * frac,
        "adam_allreduce": 2 * param_bytes * frac,
        "zero1_reduce_scatter_all_gather": micro * padded_bytes * frac + padded_bytes * frac,
        "sharded_allreduce_slice": micro * 2 * padded_bytes * frac + padded_bytes * frac,
    }
    sparse = set(separate) if rows_per_step else set()
    comm["sharded_as_configured"] = sum(
        _bucket_bytes(b, n, micro, rows_per_step if _sparse_bucket(b, sparse) else None) for b in layout.buckets)
    comm["adam_as_configured"] = sum(
        _adam_variable_bytes(v, n, rows_per_step if i in sparse else None) for i, v in enumerate(variables))
    placements = [_placement_row(i, variables[i], n, micro, state_kinds_all, kind_itemsize, rows_per_step,
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


# Bytes each worker sends per update for one bucket or variable (ring cost
# model, as benchmarks/harness.py measures it): a reduce-scatter or all-to-all
# sends (N-1)/N of its input, an all-gather N-1 times its input, an
# all-reduce 2(N-1)/N. A sparse gradient's rows travel as one all-gather of
# its values plus the 4-byte index of each row.
def _row_bytes(variable, rows):
    width = math.prod(variable.shape[1:])
    return rows * (width * _itemsize(variable.dtype) + 4)


def _sparse_bucket(bucket, sparse_indices) -> bool:
    return len(bucket.segments) == 1 and bucket.segments[0].variable_index in sparse_indices


def _bucket_bytes(bucket, n, micro, rows) -> float:
    frac = (n - 1) / n
    itemsize = _itemsize(bucket.dtype)
    if rows is not None:
        (seg,) = bucket.segments
        reduce = _row_bytes(VariableSpec(seg.name, seg.shape, bucket.dtype), rows) * (n - 1)
    elif bucket.replicated:
        reduce = 2 * bucket.num_elements * itemsize * frac
    else:
        reduce = bucket.padded_size * itemsize * frac
    gather = 0.0 if bucket.replicated else bucket.padded_size * itemsize * frac
    return micro * reduce + gather


def _adam_variable_bytes(variable, n, rows) -> float:
    if rows is not None:  # Keras all-gathers an IndexedSlices gradient's rows
        return _row_bytes(variable, rows) * (n - 1)
    return 2 * math.prod(variable.shape) * _itemsize(variable.dtype) * (n - 1) / n


def _placement_row(index, variable, n, micro, kinds, kind_itemsize, rows, shard_alignment) -> dict:
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


def variables_from_count(params: float, dtype: str) -> list:
    if not isinstance(params, (int, float)) or not math.isfinite(params) or params != int(params) \
            or not 1 <= params <= MAX_PARAMS:
        raise ValueError(f"--params must be a positive whole number up to {MAX_PARAMS:.0e}, got {params!r}")
    count = int(params)
    _itemsize(dtype)
    # One variable of Ψ elements: one bucket, the layout ShardedAdam uses for a
    # single-dtype model with the default bucket_elements=None.
    return [VariableSpec("params", (count,), dtype)]


def read_model_config(path: str) -> dict:
    """The model's serialized config, without reading any weights: from a
    ``.keras`` zip's ``config.json``, or an ``.h5`` file's ``model_config``."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("config.json")
                if info.file_size > MAX_CONFIG_BYTES:
                    raise ValueError(f"config.json is {info.file_size} bytes (at most {MAX_CONFIG_BYTES})")
                with archive.open(info) as member:
                    text = member.read(MAX_CONFIG_BYTES + 1)
                if len(text) > MAX_CONFIG_BYTES:
                    raise ValueError(f"config.json is more than {MAX_CONFIG_BYTES} bytes")
        else:
            import h5py

            with h5py.File(path, "r") as h5:
                text = h5.attrs.get("model_config")
                if text is None:
                    raise ValueError("neither a .keras zip nor an .h5 file with a model_config")
        config = json.loads(text)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot load a Keras model from {path!r}: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"cannot load a Keras model from {path!r}: its config is not an object")
    return config


def variables_from_model(path: str) -> list:
    """Trainable variables of a saved Keras model (``.keras`` or ``.h5``),
    shapes only: the model is rebuilt from its config inside
    ``keras.StatelessScope(initialize_variables=False)``, where Keras defers
    every variable's initializer, so no weight is ever allocated or read (a
    13 kB file declaring a 20000x20000 Dense costs no 1.6 GB)."""
    config = read_model_config(path)
    import keras

    pending = _uninitialized_variables()
    before = len(pending) if pending is not None else 0
    try:
        with keras.StatelessScope(initialize_variables=False):
            model = keras.saving.deserialize_keras_object(config, safe_mode=True)
            specs = [VariableSpec(str(v.path), tuple(int(d) for d in v.shape), str(v.dtype))
                     for v in model.trainable_variables]
    except Exception as error:  # deserialization errors vary by layer and Keras version
        raise ValueError(f"cannot load a Keras model from {path!r}: {error}") from error
    finally:
        if pending is not None:
            # The deferred variables stay registered with Keras, which would
            # initialize (allocate) them at the next StatelessScope's exit.
            del pending[before:]
    if not specs:
        raise ValueError(f"model {path!r} has no trainable variables")
    return specs


def _uninitialized_variables():
    """Keras' list of deferred variables (private: keras.src), or None."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:
        return None
    return global_state.get_global_attribute("uninitialized_variables", [], set_to_default=True)


# ------------------------------------------------------- communication time
def bucket_shapes(variables, *, bucket_elements=DEFAULT_BUCKET_ELEMENTS, replicate=("embeddings",),
                  row_sparse=("embeddings",), min_shard_elements=0, split_first=False) -> list:
    """The buckets ShardedAdam lays ``variables`` out in, as
    ``cost_model.BucketShape``s (which buckets exist does not depend on G;
    their padding does, and the cost model adds it).

    ``split_first``: the first variable stands for a whole model given by
    ``--params``; it is cut into buckets of ``bucket_elements`` as a model
    of many variables smaller than the cap would be. (A model whose
    variables exceed the cap gets fewer, larger buckets, each its own:
    fewer latency terms; ``--model`` plans the real ones.)"""
    names = [v.name for v in variables]
    replicated = [i for i, name in enumerate(names) if any(p in name for p in replicate)]
    separate = [i for i, name in enumerate(names) if any(p in name for p in row_sparse)]
    # Two shards: min_shard_elements replicates small buckets only when
    # there is more than one shard; any count above one decides alike.
    layout = plan_layout(list(variables), num_shards=2, bucket_elements=bucket_elements,
                         replicated=replicated, separate=separate, min_shard_elements=min_shard_elements)
    shapes = []
    for bucket in layout.buckets:
        itemsize = _itemsize(bucket.dtype)
        if split_first and bucket_elements and [s.variable_index for s in bucket.segments] == [0] \
                and not bucket.replicated:
            full, rest = divmod(bucket.num_elements, bucket_elements)
            for count, elements in ((full, bucket_elements), (1 if rest else 0, rest)):
                if count:
                    shapes.append(cost_model.BucketShape(count, elements, itemsize,
                                                         replicated=elements < min_shard_elements))
            continue
        shapes.append(cost_model.BucketShape(1, bucket.num_elements, itemsize, replicated=bucket.replicated))
    return shapes


def comm_plan(variables, workers, network, *, base=None, group_size=None, memory_budget=None,
              tolerance=cost_model.DEFAULT_TOLERANCE, split_first=False, **plan_kwargs) -> dict:
    """Predicted communication time per optimizer update and model states per
    worker for Keras Adam and for ShardedAdam with every shard group size G
    dividing ``workers`` (alpha-beta model, distadam/cost_model.py), and the
    recommended G. ``memory_budget``: bytes per device for the model states
    (parameters, gradients, optimizer state)."""
    cost_model.check_workers(workers, network)
    if group_size is not None:
        cost_model.check_group_size(workers, group_size)
    base = base or plan(variables, workers, **plan_kwargs)
    shapes = bucket_shapes(variables, bucket_elements=plan_kwargs.get("bucket_elements", DEFAULT_BUCKET_ELEMENTS),
                           replicate=plan_kwargs.get("replicate", ("embeddings",)),
                           row_sparse=plan_kwargs.get("row_sparse", ("embeddings",)),
                           min_shard_elements=plan_kwargs.get("min_shard_elements", 0), split_first=split_first)
    micro = plan_kwargs.get("accumulation_steps") or 1
    alignment = plan_kwargs.get("shard_alignment", 1)
    options = []
    for g in cost_model.divisors(workers):
        # The state of the hybrid layout is the layout of G shards: the same
        # code as the optimizer's, with num_shards=G.
        hybrid = base if g == workers else plan(variables, g, **plan_kwargs)
        timing = cost_model.sharded_time(shapes, workers, g, network, shard_alignment=alignment, micro_steps=micro)
        options.append({"group_size": g, "seconds": timing["seconds"], "phases": timing["phases"],
                        "collectives": timing["collectives"], "bytes_sent": timing["bytes_sent"],
                        "links": timing["links"], "state_bytes": hybrid.sharded_state_bytes,
                        "total_bytes": hybrid.sharded_total,
                        "fits": None if memory_budget is None else hybrid.sharded_total <= memory_budget})
    keras = cost_model.keras_adam_time(base.param_bytes, workers, network)
    keras.update(state_bytes=base.adam_state_bytes, total_bytes=base.adam_total,
                 fits=None if memory_budget is None else base.adam_total <= memory_budget)
    nodes = max(1, workers // network.gpus_per_node)
    return {
        "network": network.to_dict(), "workers": workers, "nodes": nodes,
        "buckets": sum(s.count for s in shapes), "bucket_elements": plan_kwargs.get("bucket_elements",
                                                                                    DEFAULT_BUCKET_ELEMENTS),
        "keras_adam": keras, "sharded": options, "memory_budget": memory_budget, "tolerance": tolerance,
        "shard_group_size": group_size,
        "recommended": cost_model.recommend(options, memory_budget, tolerance),
    }


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


# Past this many divisors the text lists only the G worth considering.
MAX_LISTED = 24


def _worth_listing(c) -> list:
    """Every G when there are few; else those no other G beats on both time
    and memory, plus G=N and the selected and recommended G."""
    options = c["sharded"]
    if len(options) <= MAX_LISTED:
        return options
    keep = {c["workers"], c["shard_group_size"], c["recommended"]["group_size"]}
    for o in options:
        dominated = any(p["seconds"] <= o["seconds"] and p["total_bytes"] <= o["total_bytes"] and
                        (p["seconds"], p["total_bytes"]) != (o["seconds"], o["total_bytes"]) for p in options)
        if not dominated:
            keep.add(o["group_size"])
    return [o for o in options if o["group_size"] in keep]


def render_comm(c: dict) -> str:
    net = c["network"]
    lines = [
        f"predicted communication time per optimizer update (alpha-beta model, distadam/cost_model.py; "
        f"nothing overlapped): node type {net['name']}, {c['workers']} workers on {c['nodes']} node(s) of "
        f"{net['gpus_per_node']}",
        f"  intra-node {net['intra_bandwidth'] / 1e9:g} GB/s per worker, {net['intra_latency'] * 1e6:g} us per step; "
        f"inter-node {net['inter_bandwidth'] / 1e9:g} GB/s per node, {net['inter_latency'] * 1e6:g} us per step; "
        f"{c['buckets']:,} bucket(s) of up to {c['bucket_elements'] or 'all'} elements",
        f"  {'optimizer':<34}{'comm/update':>13}{'collectives':>13}{'state/worker':>14}{'model states':>14}",
    ]
    k = c["keras_adam"]
    lines.append(f"  {'keras Adam (one all-reduce over N)':<34}{_fmt_time(k['seconds']):>13}{k['collectives']:>13,}"
                 f"{_fmt(k['state_bytes']):>14}{_fmt(k['total_bytes']):>14}")
    listed = _worth_listing(c)
    for o in listed:
        g = o["group_size"]
        label = f"ShardedAdam G=N={g}" if g == c["workers"] else f"ShardedAdam hybrid G={g}"
        marks = []
        if g == c["recommended"]["group_size"]:
            marks.append("recommended")
        if g == c["shard_group_size"]:
            marks.append("--shard-group-size")
        if o["fits"] is False:
            marks.append("does not fit")
        lines.append(f"  {label:<34}{_fmt_time(o['seconds']):>13}{o['collectives']:>13,}{_fmt(o['state_bytes']):>14}"
                     f"{_fmt(o['total_bytes']):>14}" + (f"   <- {', '.join(marks)}" if marks else ""))
    if len(listed) < len(c["sharded"]):
        lines.append(f"  ({len(c['sharded']) - len(listed)} more G, each slower and larger than a listed one: "
                     "--json lists all)")
    rec = c["recommended"]
    why = rec["reason"]
    if rec["group_size"]:
        full = next(o for o in c["sharded"] if o["group_size"] == c["workers"])
        why += (f" ({_fmt_time(rec['seconds'])} per update against {_fmt_time(full['seconds'])} for G=N and "
                f"{_fmt_time(k['seconds'])} for Keras Adam's single all-reduce)")
    lines.append(f"recommended shard_group_size: {rec['group_size'] if rec['group_size'] else 'none'} -- {why}")
    if c["memory_budget"] is not None:
        lines.append(f"  (memory budget {_fmt(c['memory_budget'])} per device for parameters, gradients and "
                     "optimizer state; activations not counted)")
    return "\n".join(lines)


# ------------------------------------------------------------------ printing
def _fmt(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


LABELS = {
    "params": "parameters", "grads": "gradients", "master": "fp32 master copy", "m": "m (1st moment)",
    "v": "v (2nd moment)", "v_hat": "v_hat (amsgrad)", "ema": "EMA weights", "accumulator": "grad accumulator",
}


def render(p: Plan) -> str:
    o = p.options
    flags = [f"dtype {'/'.join(o['dtypes'])}"]
    if o["master_weights"]:
        flags.append("fp32 master weights (paper's mixed precision)")
    for name in ("amsgrad", "ema"):
        if o[name]:
            flags.append(name)
    if o["accumulation_steps"]:
        flags.append(f"accumulation {o['accumulation_steps']} steps")
    lines = [
        f"Ψ = {p.params:,} parameters ({_fmt(p.param_bytes)}), N = {p.workers} workers, {', '.join(flags)}",
        f"K = {p.k_bytes_per_param:g} bytes of optimizer state per parameter "
        f"(ZeRO accounting: DP holds (p+g+K)Ψ per worker, stage 1 holds (p+g)Ψ + KΨ/N)",
        "",
        f"{'per worker':<22}{'keras Adam (DP)':>18}{'ShardedAdam':>18}",
    ]
    for kind in p.adam:
        lines.append(f"{LABELS[kind]:<22}{_fmt(p.adam[kind]):>18}{_fmt(p.sharded[kind]):>18}")
    lines.append(f"{'total model states':<22}{_fmt(p.adam_total):>18}{_fmt(p.sharded_total):>18}")
    lines.append(f"{'optimizer state':<22}{_fmt(p.adam_state_bytes):>18}{_fmt(p.sharded_state_bytes):>18}"
                 f"   ({p.sharded_state_bytes / p.adam_state_bytes:.4f}x; padding {p.padding_elements} "
                 f"elements in {o['buckets']} bucket(s))")
    c = p.comm
    steps = f" (A = {o['accumulation_steps']} micro-steps per update)" if o["accumulation_steps"] else ""
    lines += [
        "",
        f"bytes sent per worker per optimizer update{steps}:",
        f"  ring all-reduce bound 2Ψ(N-1)/N            {_fmt(c['allreduce_bound']):>12}",
        f"  keras Adam (DP all-reduce)                  {_fmt(c['adam_allreduce']):>12}",
        f"  ShardedAdam, native reduce-scatter (ZeRO-1) {_fmt(c['zero1_reduce_scatter_all_gather']):>12}"
        "   (tf.distribute CollectiveAllReduce: all-to-all; Horovod)",
        f"  ShardedAdam, all-reduce + slice             {_fmt(c['sharded_allreduce_slice']):>12}"
        "   (tf.distribute portable path: NCCL/TPU cross-device ops)",
    ]
    if o["rows_per_step"] or o["replicated_buckets"]:
        lines += [
            f"  as configured: keras Adam {_fmt(c['adam_as_configured'])}, ShardedAdam "
            f"{_fmt(c['sharded_as_configured'])} (placements and sparse rows below; replicated buckets: "
            f"{o['replicated_buckets']})",
        ]
    if p.placements:
        rows = o["rows_per_step"]
        lines += ["", "row-sparse variables (ShardedAdam(row_sparse=...), each in a bucket of its own): state and "
                  "bytes per worker per update" + (f", {rows:,} rows per worker per step" if rows else
                                                   ", gradients counted dense (give --rows-per-step)"),
                  f"  {'variable':<30}{'placement':<32}{'state':>12}{'bytes/update':>14}"]
        for r in p.placements:
            for label, state, nbytes in (
                    ("sharded (default)", r["state_sharded"], r["bytes_sharded"]),
                    ("replicated (replicate=[...])", r["state_replicated"], r["bytes_replicated"]),
                    ("keras Adam", r["state_adam"], r["bytes_adam"])):
                lines.append(f"  {r['name'][:29]:<30}{label:<32}{_fmt(state):>12}{_fmt(nbytes):>14}")
        lines.append("  sharded: 1/N of the table's state, but its updated rows are all-gathered every step "
                     "(Adam moves every row); replicated: the sparse rows only, but the full state on every worker.")
    return "\n".join(lines)


_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]\+?[0-9]{1,3})?")


def _table(text: str) -> tuple:
    """'1e7x64' -> (10000000, 64)."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected ROWSxDIM such as 1e7x64, got {text[:50]!r}")
    rows, dim = (_params(part) for part in parts)
    if rows * dim > MAX_PARAMS:
        raise argparse.ArgumentTypeError(f"a {text[:50]!r} table has more than {MAX_PARAMS:.0e} elements")
    return int(rows), int(dim)


def _params(text: str) -> float:
    """'7e9', '7500000000', '7.5e9': ASCII, finite, whole, 1 .. MAX_PARAMS."""
    if not _NUMBER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a positive whole number such as 7e9, got {text[:50]!r}")
    value = float(text)
    if not 1 <= value <= MAX_PARAMS or value != int(value):  # range first: int(inf) raises
        raise argparse.ArgumentTypeError(f"expected a positive whole number up to {MAX_PARAMS:.0e}, "
                                         f"got {text[:50]!r}")
    return value


def _bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,12}", text) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text[:50]!r}")
        return int(text)

    return parse


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--params", type=_params, help="number of trainable parameters, e.g. 7e9")
    source.add_argument("--model", help="read the trainable variables' shapes from a saved Keras model "
                                        "(.keras/.h5; no weights are loaded)")
    parser.add_argument("--workers", type=_bounded_int(1, MAX_WORKERS), required=True,
                        help="data-parallel workers N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES),
                        help="parameter dtype with --params (default float32; Keras mixed_* policies keep float32 "
                             "variables)")
    parser.add_argument("--amsgrad", action="store_true", help="add v_hat")
    parser.add_argument("--ema", action="store_true", help="add the EMA weights (use_ema=True)")
    parser.add_argument("--accumulation", type=_bounded_int(2, 10**6), metavar="A", default=None,
                        help="gradient_accumulation_steps (adds an accumulator; ShardedAdam reduce-scatters "
                             "every micro-step)")
    parser.add_argument("--master-weights", action="store_true",
                        help="the ZeRO paper's mixed precision: 16-bit params/grads + fp32 master, m, v (K=12)")
    parser.add_argument("--bucket-elements", type=_bounded_int(1, MAX_PARAMS), default=DEFAULT_BUCKET_ELEMENTS,
                        help=f"ShardedAdam(bucket_elements=...) (default {DEFAULT_BUCKET_ELEMENTS})")
    parser.add_argument("--shard-alignment", type=_bounded_int(1, 1 << 20), default=1,
                        help="ShardedAdam(shard_alignment=...)")
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument("--replicate", action="append", default=None, metavar="PATTERN",
                           help="ShardedAdam(replicate=[...]): variables whose state stays whole on every worker "
                                "(repeatable; default: embeddings, as the optimizer's)")
    placement.add_argument("--no-replicate", action="store_true",
                           help="ShardedAdam(replicate=[]): shard every variable's state, embedding tables too")
    parser.add_argument("--min-shard-elements", type=_bounded_int(0, MAX_PARAMS), default=0, metavar="E",
                        help="ShardedAdam(min_shard_elements=...): buckets smaller than E keep their state whole")
    parser.add_argument("--row-sparse", action="append", default=None, metavar="PATTERN",
                        help="ShardedAdam(row_sparse=[...]) (repeatable; default: embeddings)")
    parser.add_argument("--rows-per-step", type=_bounded_int(1, MAX_PARAMS), default=None, metavar="R",
                        help="rows of each row-sparse variable one worker's gradient holds per step "
                             "(e.g. batch x ids per example)")
    parser.add_argument("--table", action="append", default=[], type=_table, metavar="ROWSxDIM",
                        help="add an embedding table (named table<i>/embeddings) to the model, e.g. 1e7x64 "
                             "(repeatable)")
    network = parser.add_argument_group(
        "communication time (alpha-beta model, distadam/cost_model.py)",
        "Predicted time per optimizer update for Keras Adam, ShardedAdam and every hybrid shard group size G; "
        "a node type's figures can each be overridden.")
    network.add_argument("--node-type", choices=sorted(cost_model.PRESETS), default="a100-ib",
                         help="preset network (default a100-ib); "
                              + "; ".join(f"{k}: {v.description}" for k, v in cost_model.PRESETS.items()))
    network.add_argument("--gpus-per-node", type=_bounded_int(1, cost_model.MAX_GPUS_PER_NODE), default=None,
                         metavar="P", help="workers per node (--workers must be a multiple when larger)")
    network.add_argument("--intra-bandwidth", type=_decimal(1e-6, 1e6), default=None, metavar="GB/s",
                         help="inside a node, per worker and direction (GB = 1e9 bytes)")
    network.add_argument("--intra-latency", type=_decimal(0, 1e7), default=None, metavar="US",
                         help="inside a node, microseconds per ring step")
    network.add_argument("--inter-bandwidth", type=_decimal(1e-6, 1e6), default=None, metavar="GB/s",
                         help="between nodes, per node (all its NICs) and direction")
    network.add_argument("--inter-latency", type=_decimal(0, 1e7), default=None, metavar="US",
                         help="between nodes, microseconds per ring step")
    network.add_argument("--shard-group-size", type=_bounded_int(1, MAX_WORKERS), default=None, metavar="G",
                         help="ShardedAdam(shard_group_size=G): state sharded over G workers, replicated across "
                              "the N/G groups (G must divide --workers)")
    network.add_argument("--memory-per-device", type=_decimal(1e-9, 1e9), default=None, metavar="GB",
                         help="recommend the fastest G whose model states (parameters, gradients, optimizer state) "
                              "fit in this many GB per device")
    network.add_argument("--tolerance", type=_decimal(0, 1), default=cost_model.DEFAULT_TOLERANCE, metavar="FRACTION",
                         help="predicted times within this fraction of the fastest count as equal; the largest such G "
                              f"is recommended (default {cost_model.DEFAULT_TOLERANCE})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _decimal(low: float, high: float):
    """A plain decimal (ASCII digits, optional fraction and exponent, no sign,
    no inf/nan) from low to high."""
    def parse(text: str) -> float:
        if not _NUMBER.fullmatch(text) or not low <= float(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}, got {text[:50]!r}")
        return float(text)

    return parse


def network_from_args(args) -> cost_model.Network:
    base = cost_model.PRESETS[args.node_type]
    scale = lambda value, unit: None if value is None else value * unit  # noqa: E731
    return base.replace(gpus_per_node=args.gpus_per_node,
                        intra_bandwidth=scale(args.intra_bandwidth, cost_model.GB),
                        inter_bandwidth=scale(args.inter_bandwidth, cost_model.GB),
                        intra_latency=scale(args.intra_latency, cost_model.US),
                        inter_latency=scale(args.inter_latency, cost_model.US))


def run(args) -> int:
    import json

    if args.model:
        variables = variables_from_model(args.model)
    else:
        variables = variables_from_count(args.params, args.dtype)
    dtype = variables[0].dtype
    variables += [VariableSpec(f"table{i}/embeddings", shape, dtype) for i, shape in enumerate(args.table)]
    network = network_from_args(args)
    # Before any layout is built: a bad G or a partial node fails at once.
    cost_model.check_workers(args.workers, network)
    if args.shard_group_size is not None:
        cost_model.check_group_size(args.workers, args.shard_group_size)
    kwargs = dict(amsgrad=args.amsgrad, ema=args.ema,
                  accumulation_steps=args.accumulation, master_weights=args.master_weights,
                  bucket_elements=args.bucket_elements, shard_alignment=args.shard_alignment,
                  replicate=[] if args.no_replicate else
                  ("embeddings",) if args.replicate is None else args.replicate,
                  min_shard_elements=args.min_shard_elements,
                  row_sparse=("embeddings",) if args.row_sparse is None else args.row_sparse,
                  rows_per_step=args.rows_per_step)
    result = plan(variables, args.workers, **kwargs)
    budget = None if args.memory_per_device is None else args.memory_per_device * cost_model.GB
    comm = comm_plan(variables, args.workers, network, base=result, group_size=args.shard_group_size,
                     memory_budget=budget, tolerance=args.tolerance, split_first=args.model is None, **kwargs)
    if args.json:
        out = result.to_dict()
        out["comm_time"] = comm
        print(json.dumps(out, indent=1))
    else:
        print(render(result) + "\n\n" + render_comm(comm))
    return 0
