import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
# Tests share the workers' model, data and reference optimizer (common.py).
sys.path.insert(0, str(WORKERS))


def worker_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKERS), str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_worker(args, **env):
    """Start a Python worker in its own process group (so a kill reaches its children)."""
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=WORKERS,
        env=worker_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_group(proc):
    """SIGKILL the process group even if its leader already exited: children
    the leader started may still be running."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def free_ports(count):
    """``count`` distinct free TCP ports on 127.0.0.1 (all bound at once, so
    none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def finish(proc, timeout):
    """Wait for ``proc`` with a hard timeout; always leaves no process behind."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        pytest.fail(f"worker {proc.args} timed out after {timeout}s; output:\n{out[-4000:]}")
    finally:
        kill_group(proc)
    return out


@pytest.fixture
def run_worker():
    procs = []

    def run(args, timeout=300, **env):
        proc = start_worker(args, **env)
        procs.append(proc)
        return finish(proc, timeout), proc.returncode

    yield run
    for proc in procs:
        kill_group(proc)
