"""The planner's text output: the memory/bytes table (:func:`render`) and the
communication-time table (:func:`render_comm`), from what
:mod:`distadam.planner_math` computes. Formatting and the choice of rows
only: the numbers are the ones ``--json`` prints."""

from __future__ import annotations

from distadam import cost_model
from distadam.planner_math import Plan


def fmt_bytes(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def fmt_time(seconds: float) -> str:
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


# Row labels by component key; the optimizer's state kinds by the planner's
# short key for them (cost_model.STATE_KINDS names each kind once).
LABELS = {
    "params": "parameters", "grads": "gradients", "master": "fp32 master copy",
    **{cost_model.STATE_KINDS[kind]: label for kind, label in (
        ("momentum", "m (1st moment)"), ("velocity", "v (2nd moment)"), ("velocity_hat", "v_hat (amsgrad)"),
        ("average", "EMA weights"), ("accumulator", "grad accumulator"))},
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
        f"Ψ = {p.params:,} parameters ({fmt_bytes(p.param_bytes)}), N = {p.workers} workers, {', '.join(flags)}",
        f"K = {p.k_bytes_per_param:g} bytes of optimizer state per parameter "
        f"(ZeRO accounting: DP holds (p+g+K)Ψ per worker, stage 1 holds (p+g)Ψ + KΨ/N)",
        "",
        f"{'per worker':<22}{'keras Adam (DP)':>18}{'ShardedAdam':>18}",
    ]
    for kind in p.adam:
        lines.append(f"{LABELS[kind]:<22}{fmt_bytes(p.adam[kind]):>18}{fmt_bytes(p.sharded[kind]):>18}")
    lines.append(f"{'total model states':<22}{fmt_bytes(p.adam_total):>18}{fmt_bytes(p.sharded_total):>18}")
    lines.append(f"{'optimizer state':<22}{fmt_bytes(p.adam_state_bytes):>18}{fmt_bytes(p.sharded_state_bytes):>18}"
                 f"   ({p.sharded_state_bytes / p.adam_state_bytes:.4f}x; padding {p.padding_elements} "
                 f"elements in {o['buckets']} bucket(s))")
    c = p.comm
    steps = f" (A = {o['accumulation_steps']} micro-steps per update)" if o["accumulation_steps"] else ""
    lines += [
        "",
        f"bytes sent per worker per optimizer update{steps}:",
        f"  ring all-reduce bound 2Ψ(N-1)/N            {fmt_bytes(c['allreduce_bound']):>12}",
        f"  keras Adam (DP all-reduce)                  {fmt_bytes(c['adam_allreduce']):>12}",
        f"  ShardedAdam, native reduce-scatter (ZeRO-1) {fmt_bytes(c['zero1_reduce_scatter_all_gather']):>12}"
        "   (tf.distribute CollectiveAllReduce: all-to-all; Horovod)",
        f"  ShardedAdam, all-reduce + slice             {fmt_bytes(c['sharded_allreduce_slice']):>12}"
        "   (tf.distribute portable path: NCCL/TPU cross-device ops)",
    ]
    if o["rows_per_step"] or o["replicated_buckets"]:
        lines += [
            f"  as configured: keras Adam {fmt_bytes(c['adam_as_configured'])}, ShardedAdam "
            f"{fmt_bytes(c['sharded_as_configured'])} (placements and sparse rows below; replicated buckets: "
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
                lines.append(f"  {r['name'][:29]:<30}{label:<32}{fmt_bytes(state):>12}{fmt_bytes(nbytes):>14}")
        lines.append("  sharded: 1/N of the table's state, but its updated rows are all-gathered every step "
                     "(Adam moves every row); replicated: the sparse rows only, but the full state on every worker.")
    return "\n".join(lines)


def render_comm(c: dict) -> str:
    net = c["network"]
    lines = [
        f"predicted communication time per optimizer update (alpha-beta model, distadam/cost_model.py; "
        f"nothing overlapped): node type {net['name']}, {c['workers']} workers on {c['nodes']} node(s) of "
        f"{net['gpus_per_node']}",
        f"  intra-node {net['intra_bandwidth'] / 1e9:g} GB/s per worker, {net['intra_latency'] * 1e6:g} us per step; "
        f"inter-node {net['inter_bandwidth'] / 1e9:g} GB/s per node, {net['inter_latency'] * 1e6:g} us per step; "
        f"{c['buckets']:,} bucket(s) of up to {c['bucket_elements'] or 'all'} elements"
        + (" (bucket_elements=auto)" if c.get("bucket_elements_requested") == "auto" else ""),
        f"  {'optimizer':<34}{'comm/update':>13}{'collectives':>13}{'state/worker':>14}{'model states':>14}",
    ]
    k = c["keras_adam"]
    lines.append(f"  {'keras Adam (one all-reduce over N)':<34}{fmt_time(k['seconds']):>13}{k['collectives']:>13,}"
                 f"{fmt_bytes(k['state_bytes']):>14}{fmt_bytes(k['total_bytes']):>14}")
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
        lines.append(f"  {label:<34}{fmt_time(o['seconds']):>13}{o['collectives']:>13,}{fmt_bytes(o['state_bytes']):>14}"
                     f"{fmt_bytes(o['total_bytes']):>14}" + (f"   <- {', '.join(marks)}" if marks else ""))
    if len(listed) < len(c["sharded"]):
        lines.append(f"  ({len(c['sharded']) - len(listed)} more G, each slower and larger than a listed one: "
                     "--json lists all)")
    rec = c["recommended"]
    why = rec["reason"]
    if rec["group_size"]:
        full = next(o for o in c["sharded"] if o["group_size"] == c["workers"])
        why += (f" ({fmt_time(rec['seconds'])} per update against {fmt_time(full['seconds'])} for G=N and "
                f"{fmt_time(k['seconds'])} for Keras Adam's single all-reduce)")
    lines.append(f"recommended shard_group_size: {rec['group_size'] if rec['group_size'] else 'none'} -- {why}")
    if c["memory_budget"] is not None:
        lines.append(f"  (memory budget {fmt_bytes(c['memory_budget'])} per device for parameters, gradients and "
                     "optimizer state; activations not counted)")
    return "\n".join(lines)
