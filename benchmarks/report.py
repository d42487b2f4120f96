"""Markdown tables and PNG plots from benchmarks/results/results.json.

    python benchmarks/report.py [results.json]      # prints the README table
    python benchmarks/report.py --plots [results.json]

Everything printed is read from the JSON; nothing here measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This checkout's distadam, not whichever one the environment installed.
sys.path.insert(0, str(HERE.parent))

from distadam import cost_model  # noqa: E402  (pure Python: no TensorFlow)

DEFAULT_RESULTS = HERE / "results" / "results.json"


# ------------------------------------------------------------ derived numbers
def _by_replicas(results):
    return sorted(results["mirrored"].items(), key=lambda kv: int(kv[0]))


def memory_rows(results, config="default"):
    """Per-N state bytes per replica (worst replica) for ShardedAdam and Adam,
    and the ratio's target: 1/N plus the padding ShardedAdam may add (at most
    N-1 elements per bucket and state kind)."""
    rows = []
    for n_key, run in sorted(results["mirrored"].items(), key=lambda kv: int(kv[0])):
        row = run.get("memory", {}).get(config)
        if not row:
            continue
        n = int(n_key)
        sharded = max(row["sharded_bytes_per_replica"].values())
        adam = max(row["adam_bytes_per_replica"].values())
        itemsize = row["model"]["param_bytes"] // row["model"]["params"]
        kinds = len(row["state_kinds"])
        allowance = kinds * row["num_buckets"] * (n - 1) * itemsize
        rows.append({
            "replicas": n, "config": config, "sharded_bytes": sharded, "adam_bytes": adam,
            "reported_bytes": max(row["sharded_reported_bytes_per_replica"].values()),
            "ratio": sharded / adam, "ideal": 1.0 / n,
            "target": (adam / n + allowance) / adam,
            "params": row["model"]["params"], "padding_elements": row["padding_elements"],
            "model_variables_in_optimizer_variables": row.get("model_variables_in_optimizer_variables", {}),
        })
    return rows


def collective_rows(results):
    rows = []
    sources = [(f"MirroredStrategy N={n}", run.get("collectives")) for n, run in _by_replicas(results)]
    hvd = results.get("horovod", {})
    if hvd.get("collectives"):
        sources.append((f"horovodrun -np {hvd['replicas']}", hvd["collectives"]))
    for label, by_size in sources:
        if not by_size:
            continue
        for size, entry in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            sharded, adam = entry["sharded"], entry.get("adam", {})
            rows.append({
                "setup": label, "variables": int(size),
                "sharded_graph": sharded["total_launches_per_step"],
                "sharded_graph_by_kind": sharded["launches_per_step"],
                "sharded_backend": sum(sharded.get("backend_launches_per_step", {}).values()),
                "sharded_backend_by_kind": sharded.get("backend_launches_per_step", {}),
                "adam_graph": adam.get("total_launches_per_step"),
                "adam_note": adam.get("not_measured"),
            })
    return rows


def bytes_rows(results):
    rows = []
    sources = [(f"MirroredStrategy N={n}", int(n), run.get("bytes")) for n, run in results["mirrored"].items()]
    hvd = results.get("horovod", {})
    if hvd.get("bytes"):
        sources.append((f"horovodrun -np {hvd['replicas']} ({hvd['bytes']['sharded'].get('reduce_scatter_mode')})",
                        hvd["replicas"], hvd["bytes"]))
    for label, n, entry in sorted((s for s in sources if s[2]), key=lambda s: (s[0].startswith("horovod"), s[1])):
        rows.append({
            "setup": label, "replicas": n, "param_bytes": entry["param_bytes"],
            "bound": entry["ring_allreduce_bound"],
            "sharded_bytes": entry["sharded"]["bytes_sent_per_worker"],
            "sharded_ratio": entry["sharded"]["ratio_to_bound"],
            # A real reduce-scatter (all-to-all, or Horovod's reducescatter/alltoall)
            # moves half of what the all-reduce + slice stand-in moves.
            "native_reduce_scatter": bool(
                entry["sharded"].get("launches_per_step", {}).get("all_to_all")
                or entry["sharded"].get("reduce_scatter_mode") in ("reducescatter", "alltoall")
            ),
            "adam_bytes": entry["adam"]["bytes_sent_per_worker"],
            "adam_ratio": entry["adam"]["ratio_to_bound"],
        })
    return rows


def timing_rows(results, setups=("mirrored", "horovod")):
    """Step-time rows of the logical-device runs ("mirrored": one host, N
    replicas sharing its cores) and of horovodrun ("horovod": one process per
    rank), in that order, for the ``setups`` asked for."""
    rows = []
    sources = []
    if "mirrored" in setups:
        sources += [(f"MirroredStrategy N={n}", run.get("timing"), "keras Adam") for n, run in _by_replicas(results)]
    for key in ("horovod", "horovod_mpi") if "horovod" in setups else ():
        hvd = results.get(key, {})
        if hvd.get("timing"):
            sources.append((f"horovodrun -np {hvd['replicas']} ({hvd.get('controller', 'gloo')})",
                            hvd["timing"], "allreduce + Adam"))
    for label, timing, baseline in sources:
        for model, entry in (timing or {}).items():
            ratio = entry["ratio_sharded_over_adam"]
            rows.append({
                "setup": label, "model": model, "baseline": baseline, "params": entry["params"],
                "batch_per_replica": entry["batch_per_replica"],
                "sharded_ms": 1e3 * entry["sharded"]["median_s"], "adam_ms": 1e3 * entry["adam"]["median_s"],
                "ratio": ratio["median"], "q25": ratio["q25"], "q75": ratio["q75"],
                "repetitions": ratio["repetitions"],
            })
    return rows


MODEL_LABELS = {
    "dense_update_bound": "dense, update-bound (MLP 2.4M params, batch 2)",
    "dense_compute_bound": "dense, compute-bound (MLP 0.23M params, batch 256)",
    "embedding": "embedding, sparse gradients (200k x 32 table, batch 32 x 16 ids)",
    "transformer": "Transformer block (attention + MLP + LayerNorm, 0.2M params, batch 8 x 64)",
}
VARIANT_LABELS = {"default": "default", "table_sharded": "table sharded (`replicate=[]`)",
                  "small_buckets_whole": "kept whole (`min_shard_elements=2**20`)"}


def multiprocess_rows(results):
    """One row per (model, ShardedAdam variant): the step-time ratio to Keras
    Adam for each process count, state bytes and bytes per step."""
    runs = results.get("multiprocess") or {}
    rows = {}
    for n_key, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        for model, entry in run["models"].items():
            adam = entry["optimizers"]["adam"]
            for variant, ratio in entry["ratios"].items():
                info = entry["optimizers"][variant]
                row = rows.setdefault((model, variant), {
                    "model": model, "variant": variant, "params": info["params"], "by_workers": {}})
                row["by_workers"][int(n_key)] = {
                    "ratio": ratio["median"], "q25": ratio["q25"], "q75": ratio["q75"],
                    "sharded_ms": 1e3 * entry["times"][variant]["median_s"],
                    "adam_ms": 1e3 * entry["times"]["adam"]["median_s"],
                    "state_ratio": info["state_bytes"] / adam["state_bytes"],
                    "state_bytes": info["state_bytes"], "adam_state_bytes": adam["state_bytes"],
                    "bytes_sent": info["bytes_sent_per_step"], "adam_bytes_sent": adam["bytes_sent_per_step"],
                    "launches": info.get("launches_per_step"),
                    "floors": _floors(entry) if variant == "default" else None,
                }
    return list(rows.values())


def _floors(entry):
    """The communication floors measured next to a model's steps (see
    mwms_worker.FLOORS), as ratios to Keras Adam's step and as the time each
    optimizer spends beyond its own collectives; None if not measured."""
    floors = entry.get("floors")
    if not floors:
        return None
    times = {k: 1e3 * v["median_s"] for k, v in {**entry["times"], **floors["times"]}.items()}
    ratios = floors["ratios"]
    return {
        "grads_only": ratios["grads_only"]["median"],
        "keras_collectives": ratios["keras_collectives"]["median"],
        "sharded_collectives": ratios["sharded_collectives"]["median"],
        "sharded_collectives_q25": ratios["sharded_collectives"]["q25"],
        "sharded_collectives_q75": ratios["sharded_collectives"]["q75"],
        "keras_beyond_ms": times["adam"] - times["keras_collectives"],
        "sharded_beyond_ms": times["default"] - times["sharded_collectives"],
        "grads_ms": times["grads_only"],
        "keras_collectives_ms": times["keras_collectives"] - times["grads_only"],
        "sharded_collectives_ms": times["sharded_collectives"] - times["grads_only"],
        "launches": floors.get("sharded_collectives_launches"),
    }


def multiprocess_markdown(results) -> list:
    rows = multiprocess_rows(results)
    if not rows:
        return []
    workers = sorted({n for r in rows for n in r["by_workers"]})
    head = " | ".join(f"{n} processes" for n in workers)
    lines = ["**Step time ShardedAdam / Keras Adam, one process per worker** (MultiWorkerMirroredStrategy "
             "through `distadam launch`, one compute thread per worker, both optimizers on the same strategy, "
             "model and data; median of the per-repetition ratio of interleaved blocks [q25, q75])", "",
             f"| model | ShardedAdam | {head} |", "|---|---|" + "---|" * len(workers)]
    for r in rows:
        cells = []
        for n in workers:
            w = r["by_workers"].get(n)
            cells.append(f"**{w['ratio']:.3f}** [{w['q25']:.3f}, {w['q75']:.3f}]" if w else "-")
        lines.append(f"| {MODEL_LABELS.get(r['model'], r['model'])} | {VARIANT_LABELS.get(r['variant'], r['variant'])} "
                     f"| {' | '.join(cells)} |")
    lines += ["", "Memory and communication per worker for the same runs (optimizer state read from the "
              "variables; bytes sent per step from the collectives traced in one step, ring cost model):", "",
              "| model | ShardedAdam | processes | state ShardedAdam / Adam | bytes sent / step: ShardedAdam | Keras Adam |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        for n, w in sorted(r["by_workers"].items()):
            lines.append(f"| {r['model']} | {VARIANT_LABELS.get(r['variant'], r['variant'])} | {n} | "
                         f"{_mb(w['state_bytes'])} / {_mb(w['adam_state_bytes'])} = {w['state_ratio']:.3f} | "
                         f"{_mb(w['bytes_sent'])} | {_mb(w['adam_bytes_sent'])} |")
    floor_rows = [(r, n, w["floors"]) for r in rows for n, w in sorted(r["by_workers"].items()) if w.get("floors")]
    if floor_rows:
        lines += ["", "Where the step goes (defaults; steps timed interleaved with the two above: forward/backward "
                  "alone, and forward/backward + each optimizer's collectives without its math). *ZeRO-1 floor* is "
                  "ShardedAdam's collectives alone over Keras Adam's whole step: the best ratio any update could reach "
                  "with these collectives on this transport.", "",
                  "| model | processes | forward/backward | + Keras' collectives | + ShardedAdam's collectives "
                  "| ZeRO-1 floor [q25, q75] | Keras: update beyond its collectives | ShardedAdam: beyond its collectives |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, n, f in floor_rows:
            lines.append(f"| {r['model']} | {n} | {f['grads_ms']:.1f} ms | +{f['keras_collectives_ms']:.1f} ms "
                         f"| +{f['sharded_collectives_ms']:.1f} ms | {f['sharded_collectives']:.3f} "
                         f"[{f['sharded_collectives_q25']:.3f}, {f['sharded_collectives_q75']:.3f}] "
                         f"| {f['keras_beyond_ms']:.1f} ms | {f['sharded_beyond_ms']:.1f} ms |")
    lines.append("")
    return lines


# ------------------------------------------------- collective cost model fit
# The bar for the local predictions.
COLLECTIVE_BAR = 0.25


def collective_model(section) -> dict:
    """Fit the alpha-beta model (distadam/cost_model.py) to the measured
    collectives of every process count at once (one alpha, one beta: the
    local-cpu preset), then predict each measurement back: (n, kind, size,
    measured, predicted, relative error)."""
    measured = [(row["kind"], int(n), row["bytes"], row["median_s"], row["requested_elements"])
                for n, run in section["runs"].items() for row in run["rows"]]
    alpha, beta = cost_model.fit_alpha_beta([m[:4] for m in measured])
    rows = []
    for kind, n, nbytes, seconds, requested in measured:
        predicted = cost_model.predict(kind, n, nbytes, alpha, beta)
        rows.append({"workers": n, "kind": kind, "bytes": nbytes, "requested_elements": requested,
                     "measured_s": seconds, "predicted_s": predicted,
                     "relative_error": (predicted - seconds) / seconds})
    rows.sort(key=lambda r: (r["workers"], r["kind"], r["bytes"]))
    within = [r for r in rows if abs(r["relative_error"]) <= COLLECTIVE_BAR]
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "bandwidth_bytes_per_s": 1 / beta if beta else None,
            "rows": rows, "bar": COLLECTIVE_BAR, "within_bar": len(within), "total": len(rows),
            "max_abs_relative_error": max(abs(r["relative_error"]) for r in rows)}


def collective_markdown(results) -> list:
    section = results.get("collectives")
    if not section:
        return []
    fit = section["model"]
    kinds = ["all_reduce", "reduce_scatter", "all_gather"]
    workers = sorted({r["workers"] for r in fit["rows"]})
    sizes = sorted({r["requested_elements"] for r in fit["rows"]})
    by_key = {(r["workers"], r["kind"], r["requested_elements"]): r for r in fit["rows"]}
    bandwidth = f"{fit['bandwidth_bytes_per_s'] / 1e6:.0f} MB/s" if fit["bandwidth_bytes_per_s"] else "unbounded"
    m = section["machine"]
    lines = [f"**Collective times: alpha-beta model vs measurement** (`collective_worker.py` under `distadam launch`, "
             f"one process per worker, ShardedAdam's tf.distribute backend in `strategy.run` in a `tf.function`; "
             f"median of {_repetitions(section)} calls; float32; measured {m['date_utc']}, commit "
             f"{m.get('git_commit') or '?'}, load {m.get('loadavg_1min_start')}). Fitted over all rows at once "
             f"(least squares on relative error, `cost_model.fit_alpha_beta`): "
             f"**α = {fit['alpha_s'] * 1e3:.3f} ms per step, β = 1/({bandwidth})**, the planner's `local-cpu` preset. "
             f"{fit['within_bar']} of {fit['total']} predictions are within {fit['bar']:.0%} of the measurement "
             f"(largest error {fit['max_abs_relative_error']:.0%}).", "",
             "| processes | collective | " + " | ".join(_elements(s) for s in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for n in workers:
        for kind in kinds:
            cells = []
            for s in sizes:
                r = by_key.get((n, kind, s))
                cells.append("-" if r is None else
                             f"{r['measured_s'] * 1e3:.1f} / {r['predicted_s'] * 1e3:.1f} ({r['relative_error']:+.0%})"
                             + ("" if abs(r["relative_error"]) <= fit["bar"] else " ✗"))
            lines.append(f"| {n} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: measured ms / predicted ms (relative error of the prediction); ✗ marks errors over "
              f"{fit['bar']:.0%}. Columns: the buffer S in float32 elements (rounded up to a multiple of N).", ""]
    misses = [r for r in fit["rows"] if abs(r["relative_error"]) > fit["bar"]]
    if misses:
        # Latency-bound: the model's latency terms exceed its byte terms.
        def latency_bound(r):
            return (cost_model.latency_steps(r["kind"], r["workers"]) * fit["alpha_s"]
                    > cost_model.bytes_factor(r["kind"], r["workers"]) * r["bytes"] * fit["beta_s_per_byte"])
        lines += [f"Where the model misses the {fit['bar']:.0%} bar: {sum(map(latency_bound, misses))} of the "
                  f"{len(misses)} misses are latency-bound buffers (the model's α terms exceed its β term); by "
                  "process count " + ", ".join(f"N={n}: {sum(r['workers'] == n for r in misses)}" for n in workers)
                  + ". Why: benchmarks/README.md, \"Collective cost model\".", ""]
    return lines


def _repetitions(section):
    counts = sorted({run.get("repetitions") for run in section["runs"].values()})
    return "/".join(str(c) for c in counts)


def _elements(count):
    for shift, unit in ((20, "M"), (10, "k")):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift}{unit}"
    return str(count)


# -------------------------------------------------------------------- tables
def _mb(nbytes):
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def machine_line(results):
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load = ""
    if m.get("loadavg_1min_start") is not None:
        load = (f" Load average {m['loadavg_1min_start']:.1f} at the start and "
                f"{m.get('loadavg_1min_end', float('nan')):.1f} at the end (other jobs share the machine).")
    return (f"Measured {m['date_utc']} on {m['nproc']} CPU cores ({m['cpu_model']}), {versions}, "
            f"Python {m['python']}, commit {m.get('git_commit') or '?'}; run mode `{results['mode']}`, "
            f"{results['elapsed_s']:.0f} s.{load}")


def horovod_markdown(results) -> list:
    """The horovodrun -np 2 rows (what ``run_all.py --only-horovod``
    re-measures): one process per rank, so unlike the logical-device rows
    they transfer to a cluster."""
    rows = timing_rows(results, setups=("horovod",))
    if not rows:
        hvd = results.get("horovod", {})
        return [f"Horovod column: {hvd.get('not_measured', 'not measured')}."]
    m = results.get("horovod_machine") or results.get("machine", {})
    lines = [f"**horovodrun -np 2** (commit {m.get('git_commit') or '?'}): step time ShardedAdam / "
             "hvd.grouped_allreduce + Keras Adam, median over interleaved A/B repetitions [q25, q75]", "",
             "| controller | model | ShardedAdam ms | baseline ms | ratio [IQR] |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['model']} ({r['params']/1e6:.2f}M params, batch "
                     f"{r['batch_per_replica']}/rank) | {r['sharded_ms']:.1f} | {r['adam_ms']:.1f} | "
                     f"**{r['ratio']:.3f}** [{r['q25']:.3f}, {r['q75']:.3f}] |")
    return lines


ONE_HOST_CAPTION = (
    "**The cost of redundant updates on one host** (MirroredStrategy over N logical CPU devices "
    "sharing 2 cores: step time ShardedAdam / baseline; median over interleaved A/B "
    "repetitions [q25, q75]). With logical devices Keras Adam's N redundant updates run one after "
    "another on the same cores, which a cluster of N devices would not do: these rows show what "
    "sharding saves in work, not cluster speed.")


def _timing_line(r) -> str:
    return (f"| {r['setup']} | {r['model']} ({r['params']/1e6:.2f}M params, batch "
            f"{r['batch_per_replica']}/replica) | {r['baseline']} | {r['sharded_ms']:.1f} | "
            f"{r['adam_ms']:.1f} | **{r['ratio']:.3f}** [{r['q25']:.3f}, {r['q75']:.3f}] |")


def _launches_line(r) -> str:
    kinds = ", ".join(f"{v} {k}" for k, v in r["sharded_graph_by_kind"].items())
    adam = r["adam_graph"] if r["adam_graph"] is not None else "not traced"
    return (f"| {r['setup']} | {r['variables']} | {r['sharded_graph']} ({kinds}) "
            f"[backend: {r['sharded_backend']}] | {adam} |")


def _bytes_line(r) -> str:
    return (f"| {r['setup']} | {_mb(r['param_bytes'])} | {_mb(r['bound'])} | "
            f"{_mb(r['sharded_bytes'])} | {r['sharded_ratio']:.3f} | {r['adam_ratio']:.3f} |")


def _captioned_table(caption, columns, rows) -> list:
    """One section of :func:`markdown`: caption, header, rows, blank line."""
    return [caption, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", *rows, ""]


def markdown(results) -> str:
    lines = [machine_line(results), ""]
    lines += multiprocess_markdown(results)
    lines += horovod_markdown(results) + [""]
    lines += collective_markdown(results)

    mem = memory_rows(results)
    if mem:
        params = mem[0]["params"]
        lines += [f"**Optimizer state per replica** (MLP, {params:,} float32 parameters, default Adam; "
                  "bytes read from the optimizers' real variables)", "",
                  "| N | keras Adam | ShardedAdam | ratio | 1/N | target (1/N + padding) |",
                  "|---|---|---|---|---|---|"]
        for r in mem:
            lines.append(f"| {r['replicas']} | {_mb(r['adam_bytes'])} | {_mb(r['sharded_bytes'])} | "
                         f"{r['ratio']:.4f} | {r['ideal']:.4f} | {r['target']:.4f} |")
        hvd_mem = results.get("horovod", {}).get("memory", {}).get("default")
        if hvd_mem:
            lines += ["", f"Under `horovodrun -np {results['horovod']['replicas']}` (Horovod backend, one replica per "
                      f"process): ShardedAdam {_mb(hvd_mem['sharded_bytes_per_replica'])} vs Adam "
                      f"{_mb(hvd_mem['adam_bytes_per_replica'])} per rank, ratio "
                      f"{hvd_mem['sharded_bytes_per_replica'] / hvd_mem['adam_bytes_per_replica']:.4f}."]
        full = memory_rows(results, "amsgrad_ema_accumulation")
        if full:
            lines += ["", "With `amsgrad=True, use_ema=True, gradient_accumulation_steps=2` (m, v, v_hat, EMA and "
                      "accumulator all sharded): ratio " + ", ".join(
                          f"N={r['replicas']}: {r['ratio']:.4f}" for r in full) + "."]
        lines.append("")

    for rows, caption, columns, line in (
            (timing_rows(results, setups=("mirrored",)), ONE_HOST_CAPTION,
             ("set-up", "model", "baseline", "ShardedAdam ms", "baseline ms", "ratio [IQR]"), _timing_line),
            (collective_rows(results), "**Collective launches per step and worker** (traced graph ops; ShardedAdam's "
             "own backend calls in parentheses)", ("set-up", "variables", "ShardedAdam", "baseline"), _launches_line),
            (bytes_rows(results), "**Bytes sent per worker per step** (update-bound model; traced collective sizes × "
             "ring cost model, see benchmarks/README.md) vs the ring all-reduce bound 2Ψ(N−1)/N",
             ("set-up", "Ψ", "bound", "ShardedAdam", "ratio", "baseline ratio"), _bytes_line)):
        if rows:
            lines += _captioned_table(caption, columns, [line(r) for r in rows])
    return "\n".join(lines)


def profile_markdown(profile) -> str:
    """profile_step.py's output: step times and where one worker's time goes."""
    baseline = next(k for k in profile if k.startswith("ratio_to_"))
    lines = [f"**Profile, {profile['workers']} processes, {profile['model']}** (`benchmarks/profile_step.py`; "
             f"{baseline.replace('_', ' ')}, median [q25, q75])", "",
             "| variant | step ms | ratio | busy ms/step | top ops (self time, ms/step) |", "|---|---|---|---|---|"]
    for name, times in profile["times"].items():
        r = profile[baseline][name]
        prof = profile.get("profile", {}).get(name, {})
        top = ", ".join(f"{row['op']} {row['ms_per_step']:.1f}" for row in prof.get("by_op_type", [])[:4])
        busy = f"{prof['busy_ms_per_step']:.1f}" if "busy_ms_per_step" in prof else "-"
        lines.append(f"| {name} | {1e3 * times['median_s']:.1f} | {r['median']:.3f} [{r['q25']:.3f}, "
                     f"{r['q75']:.3f}] | {busy} | {top} |")
    return "\n".join(lines) + "\n"


def load_profiles(results_dir) -> list:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("profile_mwms_*.json"))]


# --------------------------------------------------------------------- plots
def plots(results, out_dir) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    mem = memory_rows(results)
    if mem:
        ns = [r["replicas"] for r in mem]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ns, [r["adam_bytes"] / 1e3 for r in mem], "o-", label="keras Adam")
        ax.plot(ns, [r["sharded_bytes"] / 1e3 for r in mem], "s-", label="ShardedAdam (measured)")
        ax.plot(ns, [r["adam_bytes"] / r["replicas"] / 1e3 for r in mem], "k:", label="Adam / N")
        ax.set_xlabel("replicas N")
        ax.set_ylabel("optimizer state per replica (kB)")
        ax.set_title(f"Optimizer state per replica ({mem[0]['params']:,} params)")
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
        ax.legend()
        path = Path(out_dir) / "memory_per_replica.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    multi = multiprocess_rows(results)
    if multi:
        # Horizontal bars, labels on the y axis: long labels never overlap.
        workers = sorted({n for r in multi for n in r["by_workers"]})
        labels = [f"{r['model']} ({VARIANT_LABELS.get(r['variant'], r['variant']).split(' (')[0]})" for r in multi]
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.55 * len(multi) * len(workers)))
        height = 0.8 / len(workers)
        for k, n in enumerate(workers):
            ys = [i + k * height for i in range(len(multi))]
            ws = [r["by_workers"].get(n) for r in multi]
            ax.barh(ys, [w["ratio"] if w else 0 for w in ws], height=height,
                    xerr=[[w["ratio"] - w["q25"] if w else 0 for w in ws], [w["q75"] - w["ratio"] if w else 0 for w in ws]],
                    capsize=3, label=f"{n} processes")
        ax.set_yticks([i + height * (len(workers) - 1) / 2 for i in range(len(multi))])
        ax.set_yticklabels(labels, fontsize=9)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("step time ShardedAdam / Keras Adam (median, bars: IQR)")
        ax.set_title("One process per worker (MultiWorkerMirroredStrategy)")
        ax.legend(loc="lower right", fontsize=8)
        path = Path(out_dir) / "step_time_ratio.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    timing = timing_rows(results, setups=("mirrored",))
    if timing:
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.5 * len(timing)))
        labels = [f"{r['setup']}, {r['model']}" for r in timing]
        medians = [r["ratio"] for r in timing]
        lower = [r["ratio"] - r["q25"] for r in timing]
        upper = [r["q75"] - r["ratio"] for r in timing]
        ax.barh(range(len(timing)), medians, xerr=[lower, upper], capsize=3,
                color=["tab:blue" if "update" in r["model"] else "tab:orange" for r in timing])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(timing)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("step time ShardedAdam / baseline (median, bars: IQR)")
        ax.set_title("Redundant-update cost on one host (logical CPU devices)")
        path = Path(out_dir) / "step_time_ratio_one_host.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(DEFAULT_RESULTS))
    parser.add_argument("--plots", action="store_true", help="also (re)write the PNG plots next to the JSON")
    parser.add_argument("--update-readme", action="store_true",
                        help="also replace the results section of benchmarks/README.md")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.exists():
        sys.exit(f"{path} does not exist: run `python benchmarks/run_all.py` first")
    results = json.loads(path.read_text())
    if args.plots:
        for plot in plots(results, path.parent):
            print(f"wrote {plot}", file=sys.stderr)
    table = markdown(results)
    for profile in load_profiles(path.parent):
        table += "\n" + profile_markdown(profile)
    if args.update_readme:
        update_readme(table)
    print(table)


README = HERE / "README.md"
BEGIN, END = "<!-- results:begin", "<!-- results:end -->"


def update_readme(table, readme=README):
    text = readme.read_text()
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"{readme} has no '{BEGIN} ... {END}' section to replace")
    head_end = text.index("\n", start) + 1
    readme.write_text(text[:head_end] + table.rstrip() + "\n" + text[stop:])


if __name__ == "__main__":
    main()
