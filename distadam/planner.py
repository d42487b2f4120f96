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

# The planner in four modules, each with public functions between them:
#   planner_input   what to plan for: shapes from --params or a model file
#   planner_math    memory, bytes and predicted time (plan, comm_plan)
#   planner_render  the text tables
#   planner (here)  the `distadam plan` command line, whose help is this
#                   module's docstring
# The names below stay importable from distadam.planner, the planner's
# public entry point (tests, benchmarks/plan_table.py, users' scripts).

from __future__ import annotations

import argparse
import json
import re

from distadam import cost_model
from distadam.partition import AUTO, DEFAULT_BUCKET_ELEMENTS
from distadam.planner_input import MAX_PARAMS, read_model_config, variables_from_count, variables_from_model
from distadam.planner_math import (DTYPE_BYTES, EMBEDDINGS, Plan, VariableSpec, bucket_shapes, comm_plan, plan,
                                   state_kinds)
from distadam.planner_render import fmt_bytes, fmt_time, render, render_comm

__all__ = ["DTYPE_BYTES", "EMBEDDINGS", "MAX_PARAMS", "Plan", "VariableSpec", "add_arguments", "bucket_shapes",
           "comm_plan", "fmt_bytes", "fmt_time", "network_from_args", "plan", "read_model_config", "render",
           "render_comm", "run", "state_kinds", "variables_from_count", "variables_from_model"]


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


def _bucket_elements(text: str):
    return AUTO if text == AUTO else _bounded_int(1, MAX_PARAMS)(text)


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
    parser.add_argument("--workers", type=_bounded_int(1, cost_model.MAX_WORKERS), required=True,
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
    parser.add_argument("--bucket-elements", type=_bucket_elements, default=DEFAULT_BUCKET_ELEMENTS,
                        help=f"ShardedAdam(bucket_elements=...): a whole number (default {DEFAULT_BUCKET_ELEMENTS}), "
                             "or auto (sized from --workers, see distadam.partition.auto_bucket_elements)")
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
    network.add_argument("--shard-group-size", type=_bounded_int(1, cost_model.MAX_WORKERS), default=None,
                         metavar="G",
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
                  # --replicate/--row-sparse append, so they default to None
                  # (an appended-to default list would keep the default).
                  replicate=[] if args.no_replicate else args.replicate or EMBEDDINGS,
                  min_shard_elements=args.min_shard_elements,
                  row_sparse=args.row_sparse or EMBEDDINGS,
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
