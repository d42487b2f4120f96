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


def timing_rows(results):
    rows = []
    sources = [(f"MirroredStrategy N={n}", run.get("timing"), "keras Adam") for n, run in _by_replicas(results)]
    for key in ("horovod", "horovod_mpi"):
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
            f"{results['elapsed_s']:.0f} s. Logical CPU devices share the cores, so N>1 on this machine "
            f"measures overheads and ratios, not scaling.{load}")


def markdown(results) -> str:
    lines = [machine_line(results), ""]

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

    timing = timing_rows(results)
    if timing:
        lines += ["**Step time, ShardedAdam / baseline** (same strategy, model and data; median over "
                  "interleaved A/B repetitions of the per-repetition ratio of median step times, [q25, q75])", "",
                  "| set-up | model | baseline | ShardedAdam ms | baseline ms | ratio [IQR] |",
                  "|---|---|---|---|---|---|"]
        for r in timing:
            lines.append(f"| {r['setup']} | {r['model']} ({r['params']/1e6:.2f}M params, batch "
                         f"{r['batch_per_replica']}/replica) | {r['baseline']} | {r['sharded_ms']:.1f} | "
                         f"{r['adam_ms']:.1f} | **{r['ratio']:.3f}** [{r['q25']:.3f}, {r['q75']:.3f}] |")
        lines.append("")
    hvd = results.get("horovod", {})
    if hvd.get("not_measured"):
        lines += [f"Horovod column: {hvd['not_measured']}.", ""]

    coll = collective_rows(results)
    if coll:
        lines += ["**Collective launches per step and worker** (traced graph ops; ShardedAdam's own "
                  "backend calls in parentheses)", "",
                  "| set-up | variables | ShardedAdam | baseline |", "|---|---|---|---|"]
        for r in coll:
            kinds = ", ".join(f"{v} {k}" for k, v in r["sharded_graph_by_kind"].items())
            adam = r["adam_graph"] if r["adam_graph"] is not None else "not traced"
            lines.append(f"| {r['setup']} | {r['variables']} | {r['sharded_graph']} ({kinds}) "
                         f"[backend: {r['sharded_backend']}] | {adam} |")
        lines.append("")

    comm = bytes_rows(results)
    if comm:
        lines += ["**Bytes sent per worker per step** (update-bound model; traced collective sizes × ring "
                  "cost model, see benchmarks/README.md) vs the ring all-reduce bound 2Ψ(N−1)/N", "",
                  "| set-up | Ψ | bound | ShardedAdam | ratio | baseline ratio |", "|---|---|---|---|---|---|"]
        for r in comm:
            lines.append(f"| {r['setup']} | {_mb(r['param_bytes'])} | {_mb(r['bound'])} | "
                         f"{_mb(r['sharded_bytes'])} | {r['sharded_ratio']:.3f} | {r['adam_ratio']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def profile_markdown(profile) -> str:
    """Table of profile_step.py's variants: time ratios, launches and bytes."""
    n = profile["replicas"]
    lines = [f"**Hot-path prototypes, N={n}, {profile['model']}** (`benchmarks/profile_step.py`; ratios are "
             "median [q25, q75] over interleaved repetitions; prototypes verified against ShardedAdam's weights)", "",
             "| variant | step ms | / keras Adam | / ShardedAdam | launches/step | bytes / bound |",
             "|---|---|---|---|---|---|"]
    for name, times in profile["times"].items():
        to_adam, to_sharded = profile["ratio_to_keras_adam"][name], profile["ratio_to_sharded"][name]
        comm = profile.get("collectives", {}).get(name)
        launches = comm["total_launches_per_step"] if comm else "-"
        nbytes = f"{comm['ratio_to_bound']:.3f}" if comm else "-"
        lines.append(f"| {name} | {1e3 * times['median_s']:.1f} | {to_adam['median']:.3f} "
                     f"[{to_adam['q25']:.3f}, {to_adam['q75']:.3f}] | {to_sharded['median']:.3f} "
                     f"[{to_sharded['q25']:.3f}, {to_sharded['q75']:.3f}] | {launches} | {nbytes} |")
    busy = []
    for name, prof in profile.get("profile", {}).items():
        if "by_op_type" in prof:
            top = ", ".join(f"{r['op']} {100 * r['share_of_busy']:.0f}%" for r in prof["by_op_type"][:4])
            busy.append(f"{name}: {prof['busy_ms_per_step']:.0f} ms busy op time per step over all replica "
                        f"threads ({top})")
    if busy:
        lines += ["", "tf.profiler op self time: " + "; ".join(busy) + "."]
    return "\n".join(lines) + "\n"


def load_profiles(results_dir) -> list:
    return [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("profile_n*.json"),
                                                       key=lambda p: -int(p.stem.split("_n")[-1]))]


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

    timing = timing_rows(results)
    if timing:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{r['setup'].replace('MirroredStrategy ', '')}\n{r['model']}" for r in timing]
        medians = [r["ratio"] for r in timing]
        lower = [r["ratio"] - r["q25"] for r in timing]
        upper = [r["q75"] - r["ratio"] for r in timing]
        ax.bar(range(len(timing)), medians, yerr=[lower, upper], capsize=4,
               color=["tab:blue" if "update" in r["model"] else "tab:orange" for r in timing])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(timing)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("step time ShardedAdam / baseline")
        ax.set_title("Step-time ratio (median, error bars = IQR)")
        path = Path(out_dir) / "step_time_ratio.png"
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
