"""What fits: the largest dense model that trains with keras.optimizers.Adam
and with distadam.ShardedAdam, N worker processes, each under a memory cap.

    python benchmarks/capacity.py                      # N = 2 and 4, 1.5 GiB per worker
    python benchmarks/capacity.py --quick              # smoke run: N = 2, coarse, ~5 min
    python benchmarks/capacity.py --workers 2 --cap-gib 2 --optimizers adam,sharded,sharded_unfused

ZeRO-1 keeps the parameters and gradients whole on every worker and shards
Adam's ``m`` and ``v``: float32 model states cost 4 + 4 + 8 bytes per
parameter with Keras Adam and 4 + 4 + 8/N with ShardedAdam, so the same
memory holds (4+4+8)/(4+4+8/N) times the parameters (1.33x at N=2, 1.6x at
N=4). This measures it.

Each trial launches N workers (``python -m distadam launch``, one process per
worker, MultiWorkerMirroredStrategy; benchmarks/capacity_worker.py) that
train an MLP of ``--depth`` square float32 Dense layers of one width on a
batch of ``--batch`` examples per worker for ``--steps`` steps. Every worker
runs in a memory cgroup of its own, made by this runner under the runner's
own cgroup (so the caller's limits and accounting still hold): limit
``--cap-gib``, no swap. A worker the kernel kills for memory (or one that
reports TensorFlow's ResourceExhausted) makes the trial "does not fit"; so does
a trial that exceeds ``--trial-timeout`` (a worker thrashing at its cap), on
which every process of the trial is killed. The launcher stops the other
workers when one fails.

Per (optimizer, N) the width is searched: from an estimate, grow (or shrink)
until the answer changes, then bisect to ``--resolution``. Also per N:
TensorFlow's own baseline (``none``: forward/backward only, no optimizer,
width ``--baseline-width``) and, at the largest width found for each
optimizer, the same model without an optimizer, so that what the optimizer
itself holds can be read off (``peak(optimizer) - peak(none)``).

Writes ``--out`` (default benchmarks/results/capacity.json): every trial
(optimizer, N, width, params, fits, verdict, peak RSS (VmHWM) and cgroup
peak per worker) and the summary table. Needs root and the cgroup memory
controller (v1 or v2).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("capacity_worker.py")
OPTIMIZERS = ("adam", "sharded", "sharded_unfused", "sharded_4m")
GIB = 1 << 30
MIN_CAP_GIB, MAX_CAP_GIB = 0.75, 64.0
MAX_WORKERS = 8
MAX_WIDTH = 1 << 16
MEMORY_MARGIN = 1 * GIB  # left free beyond the trial's N caps
OOM_PATTERNS = re.compile(r"ResourceExhausted|MemoryError|std::bad_alloc|OOM when allocating|Cannot allocate memory")


# ----------------------------------------------------------------- arithmetic
def predicted_ratio(workers: int) -> float:
    """Parameters that fit with ShardedAdam over Keras Adam in the same
    memory, float32 model states only: (4+4+8)/(4+4+8/N)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return 16.0 / (8.0 + 8.0 / workers)


def state_bytes_per_param(optimizer: str, workers: int) -> float:
    """Model-state bytes per parameter (params + grads + m + v, float32)."""
    if optimizer == "none":
        return 8.0
    if optimizer == "adam":
        return 16.0
    return 8.0 + 8.0 / workers


def params_for(width: int, depth: int) -> int:
    """Trainable parameters of the benchmark MLP: ``depth`` Dense(width) on a
    ``width``-wide input, kernel and bias each."""
    return depth * (width * width + width)


def width_for(params: float, depth: int, resolution: int) -> int:
    """The width (a multiple of ``resolution``, at least one step) whose MLP
    has about ``params`` parameters."""
    width = math.sqrt(max(params, 0.0) / depth)
    return max(resolution, int(round(width / resolution)) * resolution)


def search_largest(fits, start: int, *, low: int, high: int, resolution: int, grow: float = 1.15):
    """The largest width in [low, high], on the grid of ``resolution``, for
    which ``fits(width)`` is true, assuming it is monotone (true below some
    width, false above). Starts at ``start``; grows (or shrinks) by ``grow``
    until the answer flips, then bisects until the fitting and the failing
    width are one ``resolution`` apart. Returns (largest fitting width or None,
    smallest failing width or None): None for the second means even ``high``
    fitted."""
    if not (resolution >= 1 and 1 <= low <= high and grow > 1):
        raise ValueError(f"bad search bounds: low={low} high={high} resolution={resolution} grow={grow}")

    def snap(width):
        return min(high, max(low, int(round(width / resolution)) * resolution))

    low, high = snap(low), snap(high)
    width = snap(start)
    good = bad = None
    if fits(width):
        good = width
        while bad is None and good < high:
            width = snap(max(good * grow, good + resolution))
            if fits(width):
                good = width
            else:
                bad = width
    else:
        bad = width
        while good is None and bad > low:
            width = snap(min(bad / grow, bad - resolution))
            if fits(width):
                good = width
            else:
                bad = width
    if good is None or bad is None:
        return good, bad
    while bad - good > resolution:
        width = snap((good + bad) / 2)
        if width in (good, bad):
            break
        if fits(width):
            good = width
        else:
            bad = width
    return good, bad


# -------------------------------------------------------------------- cgroups
class MemoryCgroups:
    """Per-worker memory cgroups under this process's own memory cgroup
    (v1 ``memory`` controller or v2 unified), made and removed by the runner:
    a worker cannot remove the cgroup it is in, and a worker killed for
    memory cannot clean up."""

    def __init__(self):
        self.version, self.base = self._find_base()
        self.made = []  # trial directories, removed by cleanup()
        self._sweep_stale()

    @staticmethod
    def _find_base():
        with open("/proc/self/cgroup") as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
        for _, controllers, path in entries:
            if "memory" in controllers.split(","):
                root = Path("/sys/fs/cgroup/memory")
                if (root / path.lstrip("/") / "memory.limit_in_bytes").exists():
                    return 1, root / path.lstrip("/")
        for hierarchy, _, path in entries:
            if hierarchy == "0":
                root = Path("/sys/fs/cgroup")
                if (root / "cgroup.controllers").exists() and "memory" in (root / "cgroup.controllers").read_text().split():
                    return 2, root / path.lstrip("/")
        raise SystemExit("capacity.py: no cgroup memory controller found (need cgroup v1 'memory' or v2 with memory)")

    def _sweep_stale(self):
        """Trial cgroups a killed earlier runner left behind (its pid gone, no process inside)."""
        for stale in self.base.glob("distadam-capacity-*"):
            match = re.fullmatch(r"distadam-capacity-(\d+)-\d+", stale.name)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                self._remove(stale)

    def make(self, trial: str, workers: int, cap_bytes: int) -> Path:
        trial_dir = self.base / f"distadam-capacity-{os.getpid()}-{trial}"
        trial_dir.mkdir()
        self.made.append(trial_dir)
        if self.version == 2:
            (trial_dir / "cgroup.subtree_control").write_text("+memory")
        for rank in range(workers):
            rank_dir = trial_dir / f"rank{rank}"
            rank_dir.mkdir()
            if self.version == 1:
                (rank_dir / "memory.limit_in_bytes").write_text(str(cap_bytes))
                # Swap is off here; this keeps a cap a cap where it is not.
                if (rank_dir / "memory.memsw.limit_in_bytes").exists():
                    (rank_dir / "memory.memsw.limit_in_bytes").write_text(str(cap_bytes))
            else:
                (rank_dir / "memory.max").write_text(str(cap_bytes))
                (rank_dir / "memory.swap.max").write_text("0")
        return trial_dir

    def stats(self, trial_dir: Path, workers: int) -> list:
        out = []
        for rank in range(workers):
            rank_dir = trial_dir / f"rank{rank}"
            if self.version == 1:
                peak = int((rank_dir / "memory.max_usage_in_bytes").read_text())
                oom = _field(rank_dir / "memory.oom_control", "oom_kill")
            else:
                peak_file = rank_dir / "memory.peak"
                peak = int(peak_file.read_text()) if peak_file.exists() else None
                oom = _field(rank_dir / "memory.events", "oom_kill")
            out.append({"cgroup_peak_bytes": peak, "oom_kills": oom})
        return out

    def remove(self, trial_dir: Path):
        self._remove(trial_dir)
        if trial_dir in self.made:
            self.made.remove(trial_dir)

    @staticmethod
    def _remove(trial_dir: Path):
        """Kill what is left inside (processes this runner started), then rmdir."""
        for rank_dir in sorted(trial_dir.glob("rank*")) + [trial_dir]:
            procs = rank_dir / "cgroup.procs"
            for _ in range(50):
                try:
                    pids = [int(p) for p in procs.read_text().split()]
                except FileNotFoundError:
                    break
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
        for rank_dir in sorted(trial_dir.glob("rank*")) + [trial_dir]:
            for _ in range(50):
                try:
                    rank_dir.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last charges drain
                    time.sleep(0.1)

    def cleanup(self):
        for trial_dir in list(self.made):
            self.remove(trial_dir)


def _field(path: Path, key: str):
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except FileNotFoundError:
        return None
    return None


def mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# --------------------------------------------------------------------- trials
class Runner:
    def __init__(self, args):
        self.args = args
        self.cap_bytes = int(args.cap_gib * GIB)
        self.cgroups = MemoryCgroups()
        self.trials = []
        self.count = 0
        self.started = time.monotonic()

    def trial(self, optimizer: str, workers: int, width: int, purpose: str) -> dict:
        args = self.args
        self.count += 1
        need = workers * self.cap_bytes + MEMORY_MARGIN
        waited = 0.0
        while mem_available() < need:
            if waited >= args.memory_wait:
                raise SystemExit(f"capacity.py: {need / GIB:.1f} GiB needed for {workers} workers at "
                                 f"{args.cap_gib} GiB each plus margin, only {mem_available() / GIB:.1f} GiB "
                                 f"available after waiting {waited:.0f} s")
            time.sleep(5)
            waited += 5
        out_dir = Path(tempfile.mkdtemp(prefix="distadam-capacity-"))
        trial_dir = self.cgroups.make(str(self.count), workers, self.cap_bytes)
        command = [sys.executable, "-m", "distadam", "launch", "--nproc", str(workers),
                   "--timeout", str(args.trial_timeout), str(WORKER),
                   "--optimizer", optimizer, "--width", str(width), "--depth", str(args.depth),
                   "--batch", str(args.batch), "--steps", str(args.steps),
                   "--cgroup-dir", str(trial_dir), "--out-dir", str(out_dir)]
        began = time.monotonic()
        timed_out = False
        log_path = out_dir / "launcher.log"
        try:
            with open(log_path, "w") as log:
                env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
                process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)
                try:
                    returncode = process.wait(timeout=args.trial_timeout + 30)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(process)
                    returncode = process.wait()
                except BaseException:
                    _kill_group(process)
                    process.wait()
                    raise
            seconds = time.monotonic() - began
            cgroup_stats = self.cgroups.stats(trial_dir, workers)
        finally:
            self.cgroups.remove(trial_dir)
        record = self._record(optimizer, workers, width, purpose, returncode, timed_out, seconds,
                              out_dir, cgroup_stats)
        shutil.rmtree(out_dir, ignore_errors=True)
        self.trials.append(record)
        peaks = ", ".join(f"{(w['vm_hwm_bytes'] or 0) / GIB:.2f}" for w in record["per_worker"])
        print(f"[{time.monotonic() - self.started:6.0f} s] trial {self.count}: {optimizer:>15} N={workers} "
              f"width={width} params={record['params'] / 1e6:.1f}M -> {record['verdict']} "
              f"({seconds:.0f} s; VmHWM GiB per worker: {peaks})", flush=True)
        if record["verdict"] == "error":
            print(record["log_tail"], flush=True)
            raise SystemExit(f"capacity.py: trial {self.count} failed for a reason other than memory; "
                             "not a capacity result (log above)")
        return record

    def _record(self, optimizer, workers, width, purpose, returncode, timed_out, seconds, out_dir, cgroup_stats):
        args = self.args
        log = (out_dir / "launcher.log").read_text(errors="replace")
        per_worker = []
        for rank in range(workers):
            result_file, phases_file = out_dir / f"rank{rank}.json", out_dir / f"rank{rank}.phases"
            result = json.loads(result_file.read_text()) if result_file.exists() else None
            phases = [json.loads(line) for line in phases_file.read_text().splitlines()] if phases_file.exists() else []
            last = phases[-1] if phases else {}
            per_worker.append({
                "rank": rank,
                "trained_steps": result["steps_done"] if result else 0,
                "last_phase": last.get("phase"),
                "vm_hwm_bytes": (result or last).get("VmHWM"),
                "rss_anon_bytes_at_end": (result or last).get("RssAnon"),
                "rss_file_bytes_at_end": (result or last).get("RssFile"),
                "state_bytes": next((p.get("state_bytes") for p in phases if "state_bytes" in p), None),
                "step_seconds": result["step_seconds"] if result else None,
                "layout": next((p.get("layout") for p in phases if p.get("layout")), None),
                **cgroup_stats[rank],
            })
        fits = (returncode == 0 and not timed_out
                and all(w["trained_steps"] == args.steps for w in per_worker))
        oom = any(w["oom_kills"] for w in per_worker) or bool(OOM_PATTERNS.search(log))
        verdict = "fits" if fits else "oom" if oom else "timeout" if timed_out else "error"
        return {"optimizer": optimizer, "workers": workers, "width": width, "depth": args.depth,
                "batch": args.batch, "params": params_for(width, args.depth), "purpose": purpose,
                "fits": fits, "verdict": verdict, "cap_bytes": self.cap_bytes, "seconds": round(seconds, 1),
                "launcher_exit": returncode, "per_worker": per_worker,
                "log_tail": "" if fits else "\n".join(log.splitlines()[-12:])}

    def fits(self, optimizer, workers, purpose):
        return lambda width: self.trial(optimizer, workers, width, purpose)["fits"]


def _kill_group(process):
    """Stop the launcher (its private PID namespace takes every worker with it)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="2,4", help="comma-separated worker counts (default 2,4)")
    parser.add_argument("--optimizers", default="adam,sharded",
                        help=f"comma-separated, of {','.join(OPTIMIZERS)} (sharded_unfused: fused_update=False, "
                             "no XLA; sharded_4m: bucket_elements=2**22)")
    parser.add_argument("--cap-gib", type=float, default=1.5,
                        help=f"memory cap per worker process, GiB (default 1.5; {MIN_CAP_GIB}-{MAX_CAP_GIB})")
    parser.add_argument("--depth", type=int, default=8, help="square Dense layers (default 8)")
    parser.add_argument("--batch", type=int, default=2, help="examples per worker (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="training steps a model must complete (default 3)")
    parser.add_argument("--resolution", type=int, default=64, help="width resolution of the search (default 64)")
    parser.add_argument("--min-width", type=int, default=64)
    parser.add_argument("--max-width", type=int, default=16384)
    parser.add_argument("--baseline-width", type=int, default=128,
                        help="width of the no-optimizer baseline trial (default 128)")
    parser.add_argument("--trial-timeout", type=float, default=300.0, help="seconds per trial (default 300)")
    parser.add_argument("--memory-wait", type=float, default=300.0,
                        help="seconds to wait for enough free memory before a trial (default 300)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the no-optimizer trials at each largest width")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=2, cap 1 GiB, depth 4, resolution 256, 2 steps, no breakdown")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capacity.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.cap_gib, args.depth, args.resolution, args.steps, args.breakdown = "2", 1.0, 4, 256, 2, False
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    if not args.worker_counts or any(not 1 <= w <= MAX_WORKERS for w in args.worker_counts):
        parser.error(f"--workers: each count must be 1..{MAX_WORKERS}, got {args.workers!r}")
    args.optimizer_list = [o for o in args.optimizers.split(",") if o]
    if not args.optimizer_list or any(o not in OPTIMIZERS for o in args.optimizer_list):
        parser.error(f"--optimizers: choose from {','.join(OPTIMIZERS)}, got {args.optimizers!r}")
    if not (math.isfinite(args.cap_gib) and MIN_CAP_GIB <= args.cap_gib <= MAX_CAP_GIB):
        parser.error(f"--cap-gib must be between {MIN_CAP_GIB} and {MAX_CAP_GIB}, got {args.cap_gib}")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if max(args.worker_counts) * args.cap_gib * GIB + MEMORY_MARGIN > total:
        parser.error(f"{max(args.worker_counts)} workers x {args.cap_gib} GiB is more than this machine's "
                     f"{total / GIB:.1f} GiB")
    for name, low, high in (("depth", 1, 64), ("batch", 1, 4096), ("steps", 1, 100), ("resolution", 1, 4096),
                            ("min_width", 1, MAX_WIDTH), ("max_width", 1, MAX_WIDTH),
                            ("baseline_width", 1, MAX_WIDTH)):
        value = getattr(args, name)
        if not low <= value <= high:
            parser.error(f"--{name.replace('_', '-')} must be {low}..{high}, got {value}")
    if args.min_width > args.max_width:
        parser.error(f"--min-width {args.min_width} is above --max-width {args.max_width}")
    for name in ("trial_timeout", "memory_wait"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 10 <= value <= 7200):
            parser.error(f"--{name.replace('_', '-')} must be 10..7200 seconds, got {value}")
    return args


def baseline_peak(record) -> int:
    """The highest peak RSS (VmHWM) of a trial's workers."""
    return max(w["vm_hwm_bytes"] or 0 for w in record["per_worker"])


def charged_peak(record) -> int:
    """The highest cgroup peak of a trial's workers: what the cap limits
    (anonymous memory and page cache this worker brought in; shared library
    pages already cached elsewhere count in VmHWM but not here)."""
    return max(w["cgroup_peak_bytes"] or 0 for w in record["per_worker"])


def summarize(trials, args) -> list:
    rows = []
    for workers in args.worker_counts:
        at_n = [t for t in trials if t["workers"] == workers]
        baseline = next((t for t in at_n if t["purpose"] == "baseline" and t["fits"]), None)
        base_peak = baseline_peak(baseline) if baseline else None
        base_charged = charged_peak(baseline) if baseline else None
        largest = {}
        for optimizer in args.optimizer_list:
            searched = [t for t in at_n if t["optimizer"] == optimizer and t["purpose"] == "search"]
            good = max((t for t in searched if t["fits"]), key=lambda t: t["width"], default=None)
            bad = min((t for t in searched if not t["fits"] and (good is None or t["width"] > good["width"])),
                      key=lambda t: t["width"], default=None)
            largest[optimizer] = good
            row = {"workers": workers, "optimizer": optimizer, "cap_bytes": int(args.cap_gib * GIB),
                   "largest_width": good and good["width"], "largest_params": good and good["params"],
                   "smallest_failing_width": bad and bad["width"], "smallest_failing_params": bad and bad["params"],
                   "peak_rss_bytes": good and max(w["vm_hwm_bytes"] for w in good["per_worker"]),
                   "cgroup_peak_bytes": good and max(w["cgroup_peak_bytes"] or 0 for w in good["per_worker"]),
                   "baseline_peak_rss_bytes": base_peak, "baseline_cgroup_peak_bytes": base_charged,
                   "predicted_state_bytes_per_param": state_bytes_per_param(optimizer, workers)}
            if good and base_charged:
                # What a parameter really costs under the cap: the charged
                # peak above TensorFlow's baseline over the parameters that fit.
                row["measured_bytes_per_param"] = round((row["cgroup_peak_bytes"] - base_charged) / good["params"], 2)
            grads_only = next((t for t in at_n if t["purpose"] == f"breakdown:{optimizer}" and t["fits"]), None)
            if good and grads_only:
                row["no_optimizer_peak_rss_bytes"] = baseline_peak(grads_only)
                row["no_optimizer_cgroup_peak_bytes"] = charged_peak(grads_only)
                row["no_optimizer_bytes_per_param"] = round((charged_peak(grads_only) - base_charged) / good["params"], 2)
                row["optimizer_bytes_per_param"] = round(
                    (row["cgroup_peak_bytes"] - row["no_optimizer_cgroup_peak_bytes"]) / good["params"], 2)
            if good:
                row["layout"] = good["per_worker"][0].get("layout")
            rows.append(row)
        adam = largest.get("adam")
        for row in rows:
            if row["workers"] != workers or row["optimizer"] == "adam":
                continue
            row["predicted_ratio"] = round(predicted_ratio(workers), 3)
            if adam and row["largest_params"]:
                adam_row = next(r for r in rows if r["workers"] == workers and r["optimizer"] == "adam")
                row["measured_ratio"] = round(row["largest_params"] / adam["params"], 3)
                # Bounds from the search brackets: sharded's true limit is in
                # [largest, smallest failing), Adam's likewise.
                if row["smallest_failing_params"] and adam_row["smallest_failing_params"]:
                    row["measured_ratio_bounds"] = [
                        round(row["largest_params"] / adam_row["smallest_failing_params"], 3),
                        round(row["smallest_failing_params"] / adam["params"], 3)]
    return rows


def print_table(rows):
    print("\n  N  optimizer          largest params   width  cgroup peak  VmHWM     bytes/param (pred state)  ratio (pred)")
    for r in rows:
        params = f"{r['largest_params'] / 1e6:8.1f}M" if r["largest_params"] else "     none"
        peak = (f"{r['cgroup_peak_bytes'] / GIB:6.2f} GiB   {r['peak_rss_bytes'] / GIB:5.2f} GiB"
                if r["peak_rss_bytes"] else "        -")
        bpp = f"{r['measured_bytes_per_param']:6.1f}" if "measured_bytes_per_param" in r else "     -"
        ratio = (f"{r['measured_ratio']:.2f}x ({r['predicted_ratio']:.2f}x)" if "measured_ratio" in r
                 else "")
        print(f"  {r['workers']}  {r['optimizer']:<16} {params:>12}   {r['largest_width'] or '-':>5}  {peak}  "
              f"{bpp} ({r['predicted_state_bytes_per_param']:.1f})          {ratio}")


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("capacity.py: needs root (it makes memory cgroups for the workers)")
    runner = Runner(args)
    atexit.register(runner.cgroups.cleanup)
    # Both end the search early but still kill the trial, remove its cgroups
    # and write what was measured (SIGINT explicitly: a background job
    # starts with it ignored).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    print(f"capacity: cgroup v{runner.cgroups.version} under {runner.cgroups.base}, cap {args.cap_gib} GiB per "
          f"worker, depth {args.depth}, batch {args.batch}, {args.steps} steps, workers {args.worker_counts}, "
          f"optimizers {args.optimizer_list}", flush=True)
    started = time.monotonic()
    interrupted = None
    try:
        for workers in args.worker_counts:
            base = runner.trial("none", workers, args.baseline_width, "baseline")
            base_peak = charged_peak(base) if base["fits"] else int(0.6 * GIB)
            for optimizer in args.optimizer_list:
                budget = max(runner.cap_bytes * 0.9 - base_peak, 0.05 * GIB)
                # A first guess: the model states and about 24 bytes a
                # parameter of gradient buffers and temporaries (measured at
                # N=2, depth 4); the search corrects it.
                start = width_for(budget / (state_bytes_per_param(optimizer, workers) + 24), args.depth,
                                  args.resolution)
                good, bad = search_largest(runner.fits(optimizer, workers, "search"), start,
                                           low=args.min_width, high=args.max_width, resolution=args.resolution)
                print(f"  {optimizer} N={workers}: largest width {good}, smallest failing {bad}", flush=True)
                if args.breakdown and good:
                    runner.trial("none", workers, good, f"breakdown:{optimizer}")
    except KeyboardInterrupt:
        interrupted = "interrupted"
    except SystemExit as stop:  # a trial that failed for another reason, or no memory to run one
        interrupted = str(stop.code)
    finally:
        runner.cgroups.cleanup()
    rows = summarize(runner.trials, args)
    print_table(rows)
    result = {
        "command": "python benchmarks/capacity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_head": _git("rev-parse", "HEAD"), "git_dirty_files": _git("status", "--porcelain", "--", "distadam"),
        "cgroup_version": runner.cgroups.version, "cap_bytes": runner.cap_bytes, "depth": args.depth,
        "batch_per_worker": args.batch, "steps": args.steps, "resolution": args.resolution,
        "seconds": round(time.monotonic() - started, 1), "interrupted": interrupted,
        "summary": rows, "trials": runner.trials,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({len(runner.trials)} trials, {result['seconds']:.0f} s)")
    return 1 if interrupted else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _git(*command):
    try:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
