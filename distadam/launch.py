"""distadam-launch: run one training script as N local worker processes.

    distadam-launch --nproc 2 examples/train_digits.py --epochs 5
    python -m distadam.launch --nproc 3 -m my_package.train

Each worker gets ``TF_CONFIG`` for a cluster of free ports on 127.0.0.1 (plus
``DISTADAM_RANK``/``DISTADAM_WORLD_SIZE``), so an unchanged script that calls
``distadam.strategy_from_env()`` trains with MultiWorkerMirroredStrategy.

Guarantees, because a stuck or orphaned worker is the worst outcome on a
shared machine:

* every output line is prefixed with ``[rank k]``;
* SIGINT/SIGTERM are forwarded to every worker's process group;
* the first worker to fail stops the others and the launcher exits non-zero,
  naming the rank and its exit code; ``--timeout`` bounds the whole job;
* each worker runs in its own process group, which is killed on every exit
  path; on Linux workers also die with the launcher (``PR_SET_PDEATHSIG``)
  even if the launcher itself is killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from distadam.cluster import LOGICAL_DEVICES_ENV, tf_config_for

EXIT_TIMEOUT = 124  # what coreutils' timeout(1) uses
PROG = "distadam-launch"

# Variables through which an enclosing launcher (mpirun, srun, a Kubernetes
# Job) would describe *its* job. The local job replaces them, otherwise
# distadam.cluster would see two disagreeing descriptions.
_INHERITED_CLUSTER_VARS = (
    "TF_CONFIG", "JOB_COMPLETION_INDEX", "SLURM_PROCID", "SLURM_LOCALID",
    "PMI_RANK", "PMI_SIZE", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE",
)
_INHERITED_CLUSTER_PREFIXES = ("OMPI_COMM_WORLD_",)

# Runs in the forked worker before exec: ask the kernel to SIGKILL it when the
# launcher dies (the setting survives exec), then become the real command.
# A separate tiny interpreter instead of Popen(preexec_fn=...), which is unsafe
# once the launcher's output threads are running.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(70)  # the launcher died before prctl took effect\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a training script as N local worker processes (MultiWorkerMirroredStrategy).",
    )
    parser.add_argument("--nproc", type=int, default=2, help="number of worker processes (default 2)")
    parser.add_argument("--devices-per-worker", type=int, default=1,
                        help="logical CPU devices per worker (sets DISTADAM_LOGICAL_DEVICES); "
                             "only useful with --nproc 1, since MultiWorkerMirroredStrategy "
                             "drives one CPU device per worker")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for the whole job, restarts included; then kill all and exit 124")
    parser.add_argument("--restarts", type=int, default=0,
                        help="re-run the whole job up to this many times after a worker fails")
    parser.add_argument("--grace-period", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL when stopping workers")
    parser.add_argument("--no-python", action="store_true",
                        help="run the command as an executable instead of with this Python")
    parser.add_argument("-m", dest="module", action="store_true",
                        help="treat the command as a Python module, as in python -m")
    parser.add_argument("command", help="training script (or module with -m, executable with --no-python)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the training script")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.devices_per_worker < 1:
        parser.error("--devices-per-worker must be at least 1")
    if args.nproc > 1 and args.devices_per_worker > 1:
        parser.error(
            "--devices-per-worker > 1 needs --nproc 1: TensorFlow's MultiWorkerMirroredStrategy "
            "uses one CPU device per worker (run more workers instead)"
        )
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.restarts < 0:
        parser.error("--restarts must be >= 0")
    if args.module and args.no_python:
        parser.error("-m and --no-python exclude each other")
    # Caught here, one clear line, rather than N identical worker tracebacks.
    if args.no_python and shutil.which(args.command) is None:
        parser.error(f"--no-python: {args.command!r} is not an executable on PATH")
    if not args.module and not args.no_python and not os.path.isfile(args.command):
        parser.error(f"no such script: {args.command!r} (use -m for a module)")
    return args


def worker_command(args) -> list:
    if args.no_python:
        return [args.command, *args.args]
    if args.module:
        return [sys.executable, "-u", "-m", args.command, *args.args]
    return [sys.executable, "-u", args.command, *args.args]


def free_ports(count: int, host: str = "127.0.0.1") -> list:
    """``count`` distinct ports free on ``host`` right now.

    All sockets stay open until every port is chosen so the kernel cannot hand
    out the same port twice; the remaining race (another process grabbing one
    before the worker binds) shows up as a bind error in that worker.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_environments(nproc: int, devices_per_worker: int, restart: int, base=None) -> list:
    """The environment of each worker of one local job."""
    base = dict(os.environ if base is None else base)
    for name in list(base):
        if name in _INHERITED_CLUSTER_VARS or name.startswith(_INHERITED_CLUSTER_PREFIXES):
            del base[name]
    base["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixer as they are printed
    # Always set, so a script's own default (train_digits.py's --replicas)
    # never overrides what the launcher was asked for.
    base[LOGICAL_DEVICES_ENV] = str(devices_per_worker)
    peers = [f"127.0.0.1:{port}" for port in free_ports(nproc)] if nproc > 1 else []
    envs = []
    for rank in range(nproc):
        env = dict(base)
        env.update(
            DISTADAM_RANK=str(rank),
            DISTADAM_WORLD_SIZE=str(nproc),
            DISTADAM_RESTART_COUNT=str(restart),
        )
        if nproc > 1:
            # Like the Kubeflow operator, no TF_CONFIG for a single worker.
            env["TF_CONFIG"] = json.dumps(tf_config_for(peers, rank))
        envs.append(env)
    return envs


class Worker:
    """One worker process, in its own process group, with prefixed output."""

    def __init__(self, rank: int, command: list, env: dict, output_lock: threading.Lock):
        self.rank = rank
        if sys.platform.startswith("linux"):
            command = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *command]
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: signals reach its children too
        )
        self._threads = [
            threading.Thread(target=_relay, args=(self.process.stdout, sys.stdout, rank, output_lock),
                             daemon=True),
            threading.Thread(target=_relay, args=(self.process.stderr, sys.stderr, rank, output_lock),
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self):
        return self.process.poll()

    def signal_group(self, signum) -> None:
        # The group outlives its leader when the worker forked children, so
        # signal it even after the worker itself has exited.
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def finish_output(self, timeout: float = 2.0) -> None:
        for thread in self._threads:
            thread.join(timeout)


def _relay(stream, sink, rank: int, lock: threading.Lock) -> None:
    prefix = f"[rank {rank}] "
    sink_open = True
    for raw in iter(stream.readline, b""):
        if not sink_open:
            continue  # keep draining: a worker blocked on a full pipe would hang the job
        line = raw.decode("utf-8", errors="replace")
        if not line.endswith("\n"):
            line += "\n"
        with lock:
            try:
                sink.write(prefix + line)
                sink.flush()
            except (BrokenPipeError, ValueError):  # e.g. `distadam-launch ... | head`
                sink_open = False
    stream.close()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


class Launcher:
    def __init__(self, args):
        self.args = args
        self.command = worker_command(args)
        self.output_lock = threading.Lock()
        self.workers: list[Worker] = []
        self.received_signal = None
        self.failure_code = 1
        self.deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def say(self, message: str) -> None:
        with self.output_lock:
            print(f"[{PROG}] {message}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- run
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for attempt in range(self.args.restarts + 1):
                if attempt:
                    self.say(f"restarting the job (restart {attempt} of {self.args.restarts})")
                outcome = self._run_once(attempt)
                if outcome is not None:
                    return outcome
            return self.failure_code
        finally:
            self._kill_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_once(self, attempt: int):
        """Exit code to return, or None when the job failed and may restart."""
        envs = worker_environments(self.args.nproc, self.args.devices_per_worker, attempt)
        self.workers = []
        for rank, env in enumerate(envs):
            self.workers.append(Worker(rank, self.command, env, self.output_lock))
        self.say(f"started {len(self.workers)} worker(s): pids "
                 + ", ".join(str(w.pid) for w in self.workers))
        try:
            while True:
                if self.received_signal is not None:
                    return self._stop_for_signal()
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.say(f"timeout: the job did not finish within {self.args.timeout:g}s; "
                             "killing all workers")
                    self._stop_all()
                    return EXIT_TIMEOUT
                failed = next((w for w in self.workers if w.poll() not in (None, 0)), None)
                if failed is not None:
                    code = failed.poll()
                    running = [w for w in self.workers if w.poll() is None]
                    self.say(f"rank {failed.rank} (pid {failed.pid}) {describe_exit(code)}; "
                             f"stopping the other {len(running)} running worker(s)")
                    self._stop_all()
                    self.failure_code = code if 0 < code < 256 else 1
                    return None
                if all(w.poll() == 0 for w in self.workers):
                    self._finish_output()
                    self.say(f"all {len(self.workers)} worker(s) finished successfully")
                    return 0
                time.sleep(0.05)
        finally:
            self._kill_all()

    # ------------------------------------------------------------ stopping
    def _on_signal(self, signum, frame):
        if self.received_signal is not None:
            # A second Ctrl-C: do not wait for the grace period.
            for worker in self.workers:
                worker.signal_group(signal.SIGKILL)
            return
        self.received_signal = signum
        for worker in self.workers:
            worker.signal_group(signum)

    def _stop_for_signal(self) -> int:
        name = signal.Signals(self.received_signal).name
        self.say(f"received {name}: forwarded to all workers; waiting up to "
                 f"{self.args.grace_period:g}s for them to exit")
        self._wait_for_exit(self.args.grace_period)
        self._kill_all()
        return 128 + self.received_signal

    def _stop_all(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.signal_group(signal.SIGTERM)
        self._wait_for_exit(self.args.grace_period)
        self._kill_all()

    def _wait_for_exit(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and any(w.poll() is None for w in self.workers):
            time.sleep(0.05)

    def _kill_all(self) -> None:
        for worker in self.workers:
            worker.signal_group(signal.SIGKILL)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.say(f"rank {worker.rank} (pid {worker.pid}) did not die after SIGKILL")
        self._finish_output()

    def _finish_output(self) -> None:
        for worker in self.workers:
            worker.finish_output()


def main(argv=None) -> int:
    args = parse_args(argv)
    launcher = Launcher(args)
    code = launcher.run()
    if code not in (0, EXIT_TIMEOUT) and launcher.received_signal is None:
        launcher.say(f"job failed (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
