"""Run every benchmark and write benchmarks/results/results.json, the PNG plots
and the markdown table.

    python benchmarks/run_all.py            # full run, ~13 minutes on 2 cores
    python benchmarks/run_all.py --quick    # memory + collectives only (CI-sized)

The headline is the multi-process section: 2 and 3 worker processes under
MultiWorkerMirroredStrategy started by the local launcher, one compute thread
each (benchmarks/mwms_worker.py), the set-up whose speed transfers to a
cluster where every worker has its own device.

Each MirroredStrategy set-up (N = 1, 2, 3, 4, 8 logical CPUs) runs in its own
process, because TensorFlow allows one MirroredStrategy per process. The
structural measurements (memory, collective launches, bytes) do not depend on
timing, so they run two processes at a time; timing runs alone, one process
after another, so the two measured optimizers compete only with each other.
The Horovod column runs under ``horovodrun -np 2`` when Horovod is importable.
Every child gets a hard timeout and is killed with its whole process group.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)
    return env


def run_child(args, timeout, label):
    """Run ``args`` in its own process group; kill the group on every exit path."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        raise RuntimeError(f"{label}: timed out after {timeout}s\n{out[-3000:]}") from None
    finally:
        _kill_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: exit code {proc.returncode}\n{out[-5000:]}")
    print(f"[bench] {label}: {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return out


def _kill_group(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def mirrored(replicas, tasks, workdir, timeout, extra=()):
    out = Path(workdir) / f"mirrored_{replicas}_{'_'.join(tasks)}.json"
    run_child([sys.executable, str(HERE / "mirrored_worker.py"), "--replicas", str(replicas),
               "--tasks", ",".join(tasks), "--out", str(out), *extra],
              timeout, f"MirroredStrategy N={replicas} [{','.join(tasks)}]")
    return json.loads(out.read_text())


def multiprocess(workers, workdir, timeout, extra=()):
    """The headline: one process per worker under MultiWorkerMirroredStrategy,
    started by the local launcher (benchmarks/mwms_worker.py)."""
    out = Path(workdir) / f"multiprocess_{workers}.json"
    run_child([sys.executable, "-m", "distadam.launch", "--nproc", str(workers), "--timeout", str(int(timeout)),
               str(HERE / "mwms_worker.py"), "--out", str(out), *extra],
              timeout + 60, f"MultiWorkerMirroredStrategy, {workers} processes")
    return json.loads(out.read_text())


def collectives(workers, workdir, timeout, extra=()):
    """Times of the collectives ShardedAdam issues, one process per worker
    (benchmarks/collective_worker.py): what the planner's local-cpu
    alpha-beta parameters are fitted to."""
    out = Path(workdir) / f"collectives_{workers}.json"
    run_child([sys.executable, "-m", "distadam.launch", "--nproc", str(workers), "--timeout", str(int(timeout)),
               str(HERE / "collective_worker.py"), "--out", str(out), *extra],
              timeout + 60, f"collectives, {workers} processes")
    return json.loads(out.read_text())


def run_collectives(quick, workdir, timeout):
    """The collective section: 2-4 processes in full, 2 processes and three
    small sizes in quick mode (CI), with the fit and predicted-vs-measured
    table (report.collective_model) stored next to the measurements."""
    import report

    if quick:
        runs = {"2": collectives(2, workdir, timeout, ["--sizes", "1024,16384,262144", "--repetitions", "3"])}
    else:
        runs = {str(n): collectives(n, workdir, timeout) for n in COLLECTIVE_WORKERS}
    section = {"runs": runs, "machine": machine()}
    section["model"] = report.collective_model(section)
    return section


def horovod_available():
    if importlib.util.find_spec("horovod") is None:
        return "not measured: horovod not installed"
    if importlib.util.find_spec("horovod.tensorflow") is None:
        return "not measured: horovod has no TensorFlow support"
    if shutil.which("horovodrun", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")) is None:
        return "not measured: horovodrun not found"
    return None


def run_horovod(workdir, timeout, extra=(), controller="gloo"):
    out = Path(workdir) / f"horovod_{controller}.json"
    bindir = str(Path(sys.executable).parent)
    horovodrun = shutil.which("horovodrun", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    # horovodrun starts `python` from PATH: put this interpreter's bin first.
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    run_child([horovodrun, "-np", "2", "-H", "localhost:2", f"--{controller}", sys.executable,
               str(HERE / "horovod_worker.py"), "--out", str(out), *extra],
              timeout, f"horovodrun -np 2 --{controller}")
    return json.loads(out.read_text())


def machine():
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("tensorflow", "keras", "horovod", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package if package != "tensorflow" else _tf_dist())
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    # An exported tree (`git archive`) is not a repository: let the caller say
    # which commit it is.
    commit = commit or os.environ.get("DISTADAM_BENCH_COMMIT")
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "versions": versions,
        "platform": platform.platform(),
        "git_commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # Other jobs on the machine are the main source of timing noise.
        "loadavg_1min_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _tf_dist():
    import importlib.metadata as md

    for name in ("tensorflow-cpu", "tensorflow", "tensorflow-gpu"):
        try:
            md.version(name)
            return name
        except md.PackageNotFoundError:
            continue
    return "tensorflow"


PLAN = {
    # replicas -> structural tasks
    "full": {1: ["memory"], 2: ["memory", "collectives", "bytes"], 3: ["memory", "bytes"],
             4: ["memory", "collectives", "bytes"], 8: ["memory", "bytes"]},
    "quick": {1: ["memory"], 2: ["memory", "collectives", "bytes"], 3: ["memory"]},
}
TIMED_REPLICAS = (2, 4)
MULTIPROCESS_WORKERS = (2, 3)
QUICK_MULTIPROCESS = ["--models", "dense_compute_bound", "--repetitions", "2", "--steps", "1", "--warmup", "1"]
COLLECTIVE_WORKERS = (2, 3, 4)


def _bounded(low, high):
    def parse(text):
        if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text[:40]!r}")
        return int(text)
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="memory and collective counts only, small sizes (what CI runs)")
    parser.add_argument("--out", default=str(RESULTS), help="directory for results.json and plots")
    parser.add_argument("--repetitions", type=_bounded(1, 1000), default=11, help="interleaved A/B timing repetitions")
    parser.add_argument("--steps", type=_bounded(1, 1000), default=5, help="timed steps per repetition and optimizer")
    parser.add_argument("--no-horovod", action="store_true", help="skip the horovodrun column")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--timeout", type=float, default=600, help="hard limit per child process, seconds")
    parser.add_argument("--only-collectives", action="store_true",
                        help="run only the collective timing and fit (2-4 processes, ~2 min) and replace that "
                             "section of an existing results.json in --out, keeping the rest")
    parser.add_argument("--only-multiprocess", action="store_true",
                        help="run only the one-process-per-worker step timing (2 and 3 processes, ~5 min) and "
                             "replace that section of an existing results.json in --out, keeping the rest")
    parser.add_argument("--only-horovod", action="store_true",
                        help="run only the horovodrun -np 2 columns (Gloo and MPI, ~3 min) and replace those "
                             "sections of an existing results.json in --out, keeping the rest")
    args = parser.parse_args(argv)
    if not 1 <= args.timeout <= 24 * 3600:
        parser.error("--timeout must be from 1 to 86400 seconds")
    only = [flag for flag in ("only_collectives", "only_multiprocess", "only_horovod") if getattr(args, flag)]
    if len(only) > 1 or (only and args.quick):
        chosen = ["--" + flag.replace("_", "-") for flag in only] + (["--quick"] if args.quick else [])
        parser.error(f"choose one of {', '.join(chosen)}: each replaces its own sections of results.json")
    if args.only_collectives:
        return only_collectives(args)
    if args.only_multiprocess:
        return only_multiprocess(args)
    if args.only_horovod:
        return only_horovod(args)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = PLAN["quick" if args.quick else "full"]
    collective_sizes = "10,100" if args.quick else "10,100,1000"
    started = time.perf_counter()
    results = {"machine": machine(), "mode": "quick" if args.quick else "full", "mirrored": {}}
    with tempfile.TemporaryDirectory(prefix="distadam-bench-") as workdir:
        extra = ["--collective-sizes", collective_sizes]
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {n: pool.submit(mirrored, n, tasks, workdir, args.timeout, extra) for n, tasks in plan.items()}
            for n, future in futures.items():
                results["mirrored"][str(n)] = future.result()

        results["collectives"] = run_collectives(args.quick, workdir, args.timeout)

        if args.quick:
            # The headline's pipeline (both optimizers, the floors, the
            # report) on one small model: checks it runs, not its numbers.
            results["multiprocess"] = {"2": multiprocess(2, workdir, args.timeout, QUICK_MULTIPROCESS)}
        else:
            results["multiprocess"] = run_multiprocess(args, workdir)
            for n in TIMED_REPLICAS:
                timed = mirrored(n, ["timing"], workdir, args.timeout, timing_args(args))
                results["mirrored"][str(n)]["timing"] = timed["timing"]

        if args.no_horovod or args.quick:
            results["horovod"] = {"not_measured": "skipped (--quick / --no-horovod)"}
        else:
            results.update(run_horovod_sections(args, workdir, collective_sizes))

    results["elapsed_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        results["machine"]["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"[bench] wrote {path} ({results['elapsed_s']:.0f}s)", file=sys.stderr)

    import report

    if not args.no_plots:
        for plot in report.plots(results, out_dir):
            print(f"[bench] wrote {plot}", file=sys.stderr)
    print(report.markdown(results))


def run_horovod_sections(args, workdir, collective_sizes="10,100,1000"):
    """The horovodrun -np 2 columns: Gloo (structure and timing) and, when
    Horovod was built with MPI (as ./dev builds it), MPI (timing)."""
    missing = horovod_available()
    if missing:
        return {"horovod": {"not_measured": missing}}
    return {
        "horovod": run_horovod(workdir, args.timeout, ["--collective-sizes", collective_sizes, *timing_args(args)]),
        # Plain `horovodrun` picks MPI when Horovod was built with it: time
        # that controller too.
        "horovod_mpi": run_horovod(workdir, args.timeout, ["--tasks", "timing", *timing_args(args)],
                                   controller="mpi"),
    }


def timing_args(args):
    """The timed workers' repetition arguments."""
    return ["--repetitions", str(args.repetitions), "--steps", str(args.steps)]


def run_multiprocess(args, workdir):
    """The headline section: 2 and 3 worker processes (mwms_worker.py)."""
    return {str(n): multiprocess(n, workdir, args.timeout * 2, timing_args(args)) for n in MULTIPROCESS_WORKERS}


def replace_sections(args, measure, machine_key=None):
    """Re-measure part of an existing results.json in --out, keeping the rest:
    ``measure(workdir)`` returns the sections to replace. With
    ``machine_key``, the sections may come from a later commit than the rest:
    a machine line of their own (commit, load at start and end) says which.
    Returns the results."""
    path = Path(args.out) / "results.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the whole benchmark first")
    results = json.loads(path.read_text())
    info = machine() if machine_key else None
    with tempfile.TemporaryDirectory(prefix="distadam-bench-") as workdir:
        sections = measure(workdir)
    if machine_key:
        if hasattr(os, "getloadavg"):
            info["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
        sections[machine_key] = info
    results.update(sections)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"[bench] replaced the {', '.join(sections)} section(s) of {path}", file=sys.stderr)
    return results


def only_multiprocess(args):
    results = replace_sections(args, lambda workdir: {"multiprocess": run_multiprocess(args, workdir)},
                               machine_key="multiprocess_machine")
    import report

    if not args.no_plots:
        for plot in report.plots(results, Path(args.out)):
            print(f"[bench] wrote {plot}", file=sys.stderr)
    print("\n".join(report.multiprocess_markdown(results)))


def only_horovod(args):
    def measure(workdir):
        sections = run_horovod_sections(args, workdir)
        if "not_measured" in sections["horovod"]:
            raise SystemExit(f"horovod {sections['horovod']['not_measured']}")
        return sections

    results = replace_sections(args, measure, machine_key="horovod_machine")
    import report

    print("\n".join(report.horovod_markdown(results)))


def only_collectives(args):
    results = replace_sections(args, lambda workdir: {"collectives": run_collectives(False, workdir, args.timeout)})
    import report

    print("\n".join(report.collective_markdown(results)))


if __name__ == "__main__":
    main()
