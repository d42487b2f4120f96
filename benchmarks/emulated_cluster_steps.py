"""Step time on the emulated cluster (``distadam launch --nodes``): Keras Adam
(MultiWorkerMirroredStrategy's all-reduce), ShardedAdam G = N and ShardedAdam
G = W (hybrid, W = workers per node), one process per worker, interleaved,
on the comm-bound and the compute-bound MLP, at each link rate; the bytes each
node's ``eth0`` sent per step against the byte model; and the planner's
prediction (its ``emulated-<rate>`` preset, distadam/cost_model.py) against
the measurement.

    sudo .venv/bin/python benchmarks/emulated_cluster_steps.py                # run, save, print
    .venv/bin/python benchmarks/emulated_cluster_steps.py --report            # print the saved results

Each (layout, rate) is one ``python -m distadam launch --nproc N --nodes K
--inter-node-rate R --timeout T benchmarks/mwms_worker.py ...`` (root: the
launcher makes the namespaces); the whole launch is killed past ``--timeout``.
Results: benchmarks/results/emulated_cluster.json.

What is compared with the planner: ``beyond forward/backward`` = the
variant's step minus the forward/backward-only step (``grads_only``, timed
interleaved with the optimizers; the median over rounds of the per-round
difference): the communication the step does not hide plus the optimizer's
own math, against the planner's predicted communication per update (nothing
overlapped). And the step ratio to Keras Adam against the predicted ratio
(floor + predicted communication) / (floor + Keras Adam's predicted
communication), with the measured floor.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from distadam import cost_model, planner_math  # noqa: E402

RESULTS = HERE / "results" / "emulated_cluster.json"
MODELS = ("dense_update_bound", "dense_compute_bound")
FLOOR = "grads_only"


def variants(workers, per_node):
    """label -> ShardedAdam kwargs: G = N and G = W."""
    return {"sharded_g_n": {"shard_group_size": workers}, "sharded_g_w": {"shard_group_size": per_node}}


def launch(nodes, per_node, rate, args, workdir):
    """One launcher run; returns mwms_worker.py's JSON."""
    workers = nodes * per_node
    out = workdir / f"emulated_{nodes}x{per_node}_{rate}.json"
    spec = ";".join(f"{label}={json.dumps(kwargs)}" for label, kwargs in variants(workers, per_node).items())
    cmd = [sys.executable, "-m", "distadam", "launch", "--nproc", str(workers), "--nodes", str(nodes),
           "--inter-node-rate", rate, "--timeout", str(int(args.timeout)), str(HERE / "mwms_worker.py"),
           "--models", ",".join(args.models), "--variants", spec, "--floors", FLOOR,
           "--repetitions", str(args.repetitions), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--net-bytes", "eth0", "--net-bytes-steps", str(args.net_bytes_steps), "--out", str(out)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"$ {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise RuntimeError(f"{nodes}x{per_node} at {rate}: timed out") from None
    for line in output.splitlines():
        if line.startswith("[rank 0] [mwms") or line.startswith("[distadam-launch]"):
            print("   ", line, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{nodes}x{per_node} at {rate}: exit {proc.returncode}\n{output[-4000:]}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    result["command"] = " ".join(["python -m distadam launch"] + cmd[4:])
    return result


# ------------------------------------------------------------ byte model
def node_link_bytes(label, param_bytes, nodes, per_node):
    """Payload bytes one node sends over its link per step (rank order fills
    nodes; TensorFlow's CPU collectives: ring all-reduce and ring all-gather,
    all-to-all sending each peer its slice directly)."""
    n = nodes * per_node
    s = param_bytes
    if label == "adam":  # one ring over N: one hop per node crosses, carrying 2(N-1)/N S
        return 2 * (n - 1) / n * s
    if label == "sharded_g_w":  # W concurrent all-reduces of S/W across the K nodes, one member each
        return per_node * 2 * (nodes - 1) / nodes * s / per_node
    if label == "sharded_g_n":  # all-to-all: each worker sends S/N to each of the N-W off-node peers;
        # then a ring all-gather over N (one crossing hop per node, (N-1)/N S)
        return per_node * (n - per_node) / n * s + (n - 1) / n * s
    if label == FLOOR:
        return 0.0
    raise ValueError(label)


# ----------------------------------------------------------- prediction
def network_for(rate, per_node):
    if rate in cost_model.EMULATED_LINK_MBIT:
        return cost_model.emulated_network(rate, per_node)
    raise ValueError(f"no measured link rate for {rate!r}: add it to cost_model.EMULATED_LINK_MBIT")


def predicted(entry, workers, per_node, rate):
    """Planner's communication per update (comm_plan, the model's own
    variables, the optimizer's default bucket_elements="auto") per label."""
    variables = [planner_math.VariableSpec(v["path"], tuple(v["shape"]), v["dtype"])
                 for v in entry["optimizers"]["adam"]["variables"]]
    plan = planner_math.comm_plan(variables, workers, network_for(rate, per_node))
    by_g = {o["group_size"]: o for o in plan["sharded"]}
    return {"adam": plan["keras_adam"]["seconds"], "sharded_g_n": by_g[workers]["seconds"],
            "sharded_g_w": by_g[per_node]["seconds"], FLOOR: 0.0,
            "_plan": {"network": plan["network"]["name"], "buckets": plan["buckets"],
                      "bucket_elements": plan["bucket_elements"],
                      "phases": {"adam": plan["keras_adam"]["phases"], "sharded_g_n": by_g[workers]["phases"],
                                 "sharded_g_w": by_g[per_node]["phases"]}}}


def quartiles(values):
    import numpy as np

    q = np.percentile(values, [25, 50, 75])
    return [float(x) for x in q]


def rows(results):
    """One row per (layout, rate, model, variant)."""
    out = []
    for run in results["runs"]:
        nodes, per_node, rate = run["nodes"], run["workers_per_node"], run["rate"]
        workers = nodes * per_node
        for model, entry in run["result"]["models"].items():
            params = entry["optimizers"]["adam"]["params"]
            param_bytes = 4 * params
            samples = {**entry["samples"], **entry["floors"]["samples"]}
            floor = samples[FLOOR]
            pred = predicted(entry, workers, per_node, rate)
            net = entry.get("net_bytes_per_step", {}).get("per_variant", {})
            pred_floor = quartiles(floor)[1]
            for label in ("adam", "sharded_g_n", "sharded_g_w", FLOOR):
                step = samples[label]
                ratio = [a / b for a, b in zip(step, samples["adam"])]
                beyond = [a - b for a, b in zip(step, floor)]
                tx = [n["tx"] for n in net.get(label, [])]
                model_bytes = node_link_bytes(label, param_bytes, nodes, per_node)
                out.append({
                    "layout": f"{nodes}x{per_node}", "rate": rate, "model": model, "params": params,
                    "variant": label, "step_ms": [1e3 * x for x in quartiles(step)],
                    "ratio_to_adam": quartiles(ratio), "beyond_floor_ms": [1e3 * x for x in quartiles(beyond)],
                    "tx_bytes_per_node": tx, "model_bytes_per_node": model_bytes,
                    "predicted_comm_ms": 1e3 * pred[label],
                    "predicted_ratio": (pred_floor + pred[label]) / (pred_floor + pred["adam"]),
                    "plan": pred["_plan"],
                })
    return out


# ---------------------------------------------------------------- tables
NAMES = {"adam": "Keras Adam", "sharded_g_n": "ShardedAdam G=N", "sharded_g_w": "ShardedAdam G=W",
         FLOOR: "forward/backward only"}


def fmt_q(q, digits=0):
    return f"{q[1]:.{digits}f} [{q[0]:.{digits}f}, {q[2]:.{digits}f}]"


def step_table(table):
    lines = ["| layout | link | model | optimizer | step ms, median [IQR] | ratio to Keras Adam [IQR] "
             "| eth0 sent per node per step (measured) | byte model | measured / model |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        tx = sum(r["tx_bytes_per_node"]) / len(r["tx_bytes_per_node"]) if r["tx_bytes_per_node"] else None
        ratio = "1" if r["variant"] == "adam" else fmt_q(r["ratio_to_adam"], 3)
        model = r["model_bytes_per_node"]
        lines.append(
            f"| {r['layout']} | {r['rate']} | {r['model']} ({r['params'] / 1e6:.2f}M) | {NAMES[r['variant']]} "
            f"| {fmt_q(r['step_ms'], 1)} | {ratio} | {'' if tx is None else f'{tx / 1e6:.2f} MB'} "
            f"| {model / 1e6:.2f} MB | {'' if tx is None or not model else f'{tx / model:.3f}'} |")
    return "\n".join(lines)


def planner_table(table):
    lines = ["| layout | link | model | optimizer | predicted comm ms | measured beyond fwd/bwd ms [IQR] "
             "| measured / predicted | predicted ratio | measured ratio | miss (ratio) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if r["variant"] == FLOOR:
            continue
        measured, pred = r["beyond_floor_ms"][1], r["predicted_comm_ms"]
        miss = r["ratio_to_adam"][1] / r["predicted_ratio"] - 1
        lines.append(
            f"| {r['layout']} | {r['rate']} | {r['model']} | {NAMES[r['variant']]} | {pred:.1f} "
            f"| {fmt_q(r['beyond_floor_ms'], 1)} | {measured / pred:.2f} | {r['predicted_ratio']:.3f} "
            f"| {r['ratio_to_adam'][1]:.3f} | {'' if r['variant'] == 'adam' else f'{miss:+.1%}'} |")
    return "\n".join(lines)


def report(results):
    table = rows(results)
    print("## Step time and bytes per node\n")
    print(step_table(table))
    print("\n## Planner against measurement\n")
    print(planner_table(table))
    print("\nCommands:")
    for run in results["runs"]:
        print(f"  {run['result']['command']}  ({run['result']['wall_s']:.0f} s)")
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="2x2", help="NODESxWORKERS_PER_NODE, comma-separated (default 2x2)")
    parser.add_argument("--rates", default="200mbit,1gbit",
                        help=f"link rates (measured: {', '.join(cost_model.EMULATED_LINK_MBIT)})")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repetitions", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--steps", type=int, default=3, help="steps per block (median taken)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--net-bytes-steps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launch (the launcher's --timeout)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only print the tables of --out")
    parser.add_argument("--append", action="store_true", help="add the runs to those already in --out")
    args = parser.parse_args()
    args.models = args.models.split(",")
    if args.report:
        report(json.loads(args.out.read_text()))
        return 0
    if args.repetitions < 5:
        parser.error("at least 5 interleaved rounds")
    for rate in args.rates.split(","):
        network_for(rate, 1)
    results = json.loads(args.out.read_text()) if args.append and args.out.exists() else {"runs": []}
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="distadam-emulated-") as tmp:
        for layout in args.layouts.split(","):
            nodes, per_node = (int(x) for x in layout.split("x"))
            for rate in args.rates.split(","):
                result = launch(nodes, per_node, rate, args, Path(tmp))
                results["runs"] = [r for r in results["runs"]
                                   if (r["nodes"], r["workers_per_node"], r["rate"]) != (nodes, per_node, rate)]
                results["runs"].append({"nodes": nodes, "workers_per_node": per_node, "rate": rate,
                                        "result": result})
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every run
    results["elapsed_s"] = time.perf_counter() - started
    results["rows"] = report(results)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
