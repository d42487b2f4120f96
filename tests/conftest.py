import atexit
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
# Tests share the workers' model, data and reference optimizer (common.py).
sys.path.insert(0, str(WORKERS))

# One directory of single-device Keras Adam references for the whole session
# (tests/workers/reference.py): set here, in the process pytest starts first,
# so xdist's workers and every worker process inherit it; removed at exit.
if "DISTADAM_REFERENCE_CACHE" not in os.environ:
    os.environ["DISTADAM_REFERENCE_CACHE"] = tempfile.mkdtemp(prefix="distadam-references-")
    atexit.register(shutil.rmtree, os.environ["DISTADAM_REFERENCE_CACHE"], True)


def worker_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKERS), str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_process(argv, *, cwd=WORKERS, env=None, separate_stderr=False):
    """Start ``argv`` in its own process group (so a kill reaches every child),
    with its output captured as text (stderr merged unless ``separate_stderr``)."""
    return subprocess.Popen(
        [str(a) for a in argv],
        cwd=cwd,
        env=worker_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def start_worker(args, **env):
    """Start a Python worker of tests/workers in its own process group."""
    return start_process([sys.executable, *args], env=worker_env(**env))


class Finished(typing.NamedTuple):
    code: int
    out: str
    err: str  # "" when stderr was merged into ``out``
    seconds: float


def wait_for(proc, timeout, *, polite=False):
    """Wait for ``proc`` with a hard timeout; on every exit path its process
    group is killed. On timeout the test fails with the output's tail;
    ``polite`` sends SIGTERM first (horovodrun and mpirun then stop their
    ranks themselves) and SIGKILL 10 s later. Returns (stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if polite:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                out, err = proc.communicate(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                kill_group(proc)
                out, err = proc.communicate()
        else:
            kill_group(proc)
            out, err = proc.communicate()
        pytest.fail(f"{proc.args} timed out after {timeout}s; output tail:\n{(out or '')[-6000:]}"
                    + (f"\nstderr tail:\n{err[-3000:]}" if err else ""))
    finally:
        kill_group(proc)
    return out or "", err or ""


def run_process(argv, timeout, *, cwd=WORKERS, env=None, separate_stderr=False, polite=False) -> Finished:
    """Run ``argv`` to completion under a hard timeout (see :func:`wait_for`);
    the one way the tests run a process and wait for it."""
    started = time.monotonic()
    proc = start_process(argv, cwd=cwd, env=env, separate_stderr=separate_stderr)
    out, err = wait_for(proc, timeout, polite=polite)
    return Finished(proc.returncode, out, err, time.monotonic() - started)


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
    """Wait for a started worker with a hard timeout; its (merged) output."""
    return wait_for(proc, timeout)[0]


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


# ------------------------------------------------------------ pytest-xdist
# pyproject.toml runs the suite on three xdist workers. The unit of work handed
# to a worker: a test class (its tests may share a class-scoped run, e.g. one
# N of test_equivalence), a whole module if the module defines a module- or
# session-scoped fixture (its tests share it: run it once), else each test
# alone (independent: tmp_path, its own ports and processes), so a worker
# that is free takes the next test. (xdist's loadgroup would say this with
# marks, but does not group under pytest 9.2: pytest-xdist issue 1386.)
_SHARED_FIXTURE = re.compile(r"""scope\s*=\s*["'](module|session|package)["']""")


@functools.lru_cache(maxsize=None)
def _module_shares_a_fixture(path):
    try:
        return bool(_SHARED_FIXTURE.search((ROOT / path).read_text()))
    except OSError:
        return True  # unknown: keep the module together


def xdist_unit(nodeid):
    path, _, rest = nodeid.partition("::")
    if "::" in rest:
        return f"{path}::{rest.split('::', 1)[0]}"
    return path if _module_shares_a_fixture(path) else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":  # another --dist asked for explicitly
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return xdist_unit(nodeid)

    return Units(config, log)


# xdist units (see xdist_unit) that take a minute or more, longest first,
# with their seconds under ``--durations`` on two workers (2026-12-03, an idle
# machine). They
# are handed out first, so the run ends on short units instead of one worker
# idling while the other finishes a long one. Only the order changes: a stale
# entry costs wall time, never a result.
LONGEST_FIRST = (
    "tests/test_equivalence.py::TestFourWorkers",  # 162
    "tests/test_equivalence.py::TestThreeWorkers",  # 151
    "tests/test_multiworker.py::test_worker_processes_match_single_device_adam[twelve_processes]",  # 114
    "tests/test_horovod.py::TestGlooThreeRanks",  # 107
    "tests/test_checkpoint.py",  # 103 (its resharding fixture)
    "tests/test_equivalence.py::TestTwoWorkers",  # 103
    "tests/test_nonfinite.py",  # 76
    "tests/test_preemption.py::test_sigterm_to_one_worker_checkpoints_the_current_step_everywhere_and_resumes_exactly",  # 75
    "tests/test_multiworker.py::test_thirteen_logical_devices_match_single_device_adam",  # 64
    "tests/test_emulated_cluster.py::test_two_nodes_of_two_workers_match_single_device_adam_and_stay_inside",  # 45-65
    "tests/test_horovod.py::TestGlooTwoRanks",  # 56
    "tests/test_benchmarks.py",  # 55
    "tests/test_multiworker.py::test_worker_processes_match_single_device_adam[four_processes_in_groups]",  # 45
    "tests/test_faults.py::test_survivor_exits_on_its_own_within_the_bound[stall-watchdog]",  # 47
    "tests/test_multiworker_fit.py::test_model_fit_on_worker_processes_matches_single_device_adam[2]",  # 40
    "tests/test_mpi.py::test_mpirun_rendezvous_multiworker_mirrored_matches_keras_adam",  # 39
)


def _longest_first_rank(nodeid):
    unit = xdist_unit(nodeid)
    return LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    _deselect_slow(config, items)
    items.sort(key=lambda item: _longest_first_rank(item.nodeid))  # stable: the rest keeps its order


# ------------------------------------------------------------ tiers and time
# `./dev test --fast`: the development tier (the tests not marked `slow`: the
# math at N = 1 and 2, the API, the planner, the launcher's checks, the
# checkpoint format), a few minutes; CI runs everything.
def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="run only the fast tier (tests not marked slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process job or a long run; left out by --fast")


def _deselect_slow(config, items):
    if not config.getoption("--fast"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)


_MODULE_SECONDS = {}


def pytest_runtest_logreport(report):
    # Under xdist this runs in the controller for every worker's report.
    module = report.nodeid.split("::", 1)[0]
    seconds, tests = _MODULE_SECONDS.get(module, (0.0, 0))
    _MODULE_SECONDS[module] = (seconds + report.duration, tests + (report.when == "call"))


def pytest_terminal_summary(terminalreporter):
    """Where the run's time went: seconds per module, summed over setup,
    call and teardown (the xdist workers run side by side, so the sum is
    about twice the wall time). Every change sees what it costs."""
    if not _MODULE_SECONDS or hasattr(terminalreporter.config, "workerinput"):
        return
    write = terminalreporter.write_line
    terminalreporter.section("seconds per module (summed test durations)")
    total = sum(seconds for seconds, _ in _MODULE_SECONDS.values())
    for module, (seconds, tests) in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1][0]):
        write(f"{seconds:8.1f} s  {tests:4d} tests  {module}")
    write(f"{total:8.1f} s  {sum(t for _, t in _MODULE_SECONDS.values()):4d} tests  in all")
