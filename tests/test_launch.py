"""distadam-launch: real multi-worker training of the main job, and the
failure paths (failed rank, timeout, signals, restarts) leave no process behind."""

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import max_relative_difference
from conftest import kill_group, run_process, start_process
from distadam import launch
from distadam.cluster import resolve_cluster

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "examples" / "train_digits.py"
PROBE = ROOT / "tests" / "workers" / "launch_probe.py"

# Few steps keep the runs short; a global batch divisible by 2 and 3 workers.
TRAIN_ARGS = ["--epochs", "1", "--max-steps", "12", "--batch-size", "96", "--seed", "3"]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "DISTADAM_LOGICAL_DEVICES")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def console_script():
    script = Path(sys.executable).with_name("distadam-launch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "distadam.launch"]


def probe(*options, nproc=2, network="private", pid_dir):
    """The launcher running launch_probe.py workers."""
    return [*console_script(), "--nproc", str(nproc), "--network", network, "--grace-period", "1",
            "--no-python", sys.executable, str(PROBE), "--pid-dir", str(pid_dir), *options]


def start(command):
    return start_process(command, cwd=ROOT, env=clean_env(), separate_stderr=True)


def run(command, timeout):
    """Run to completion with a hard timeout; never leaves the process group behind."""
    finished = run_process(command, timeout, cwd=ROOT, env=clean_env(), separate_stderr=True)
    return finished.code, finished.out, finished.err


def is_alive(pid):
    """Alive and not a zombie (a reparented zombie may wait for a lazy init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def recorded_pids(pid_dir):
    pids = []
    for path in Path(pid_dir).glob("*.pids"):
        pids.extend(int(p) for p in path.read_text().split())
    return pids


def assert_no_survivors(pids, within=10.0):
    assert pids, "the workers recorded no PIDs: the test would prove nothing"
    deadline = time.monotonic() + within
    alive = [p for p in pids if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if is_alive(p)]
    for pid in alive:  # clean up before failing
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not alive, f"processes left behind: {alive}"


def wait_for_files(directory, pattern, count, timeout=60.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(Path(directory).glob(pattern))) >= count:
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the launcher exited ({proc.returncode}) early:\n{out[-6000:]}\n{(err or '')[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"only {len(list(Path(directory).glob(pattern)))} of {count} {pattern} files appeared")


def load_weights(path):
    with np.load(path) as data:
        return [data[f"w{i}"] for i in range(sum(k.startswith("w") for k in data.files))]


# ------------------------------------------------------------- training
@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory):
    """The same global batches on one device with plain keras.optimizers.Adam."""
    out = tmp_path_factory.mktemp("reference") / "weights.npz"
    code, stdout, stderr = run([sys.executable, str(MAIN_JOB), *TRAIN_ARGS, "--replicas", "1",
                                "--optimizer", "keras", "--out", str(out)], timeout=180)
    assert code == 0, stderr[-3000:]
    return load_weights(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("nproc, launcher", [(2, "console script"), (3, "python -m")])
def test_launcher_trains_main_job_like_one_process(nproc, launcher, tmp_path, single_process_reference):
    command = console_script() if launcher == "console script" else [sys.executable, "-m", "distadam.launch"]
    code, stdout, stderr = run(
        [*command, "--nproc", str(nproc), "--timeout", "240", str(MAIN_JOB), *TRAIN_ARGS,
         "--out", str(tmp_path / "rank{rank}.npz")],
        timeout=270,
    )
    assert code == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"

    # Every line the workers printed carries its rank; the job really ran
    # on `nproc` workers with one replica each.
    lines = stdout.splitlines()
    assert lines and all(line.startswith(("[rank 0] ", "[rank 1] ", "[rank 2] ")[:nproc]) for line in lines)
    result = json.loads(next(line for line in lines if "RESULT " in line).split("RESULT ", 1)[1])
    assert (result["world_size"], result["replicas"], result["steps"]) == (nproc, nproc, 12)
    assert result["per_replica_bytes"] < result["keras_adam_bytes"]
    assert f"all {nproc} worker(s) finished successfully" in stderr

    per_rank = [load_weights(tmp_path / f"rank{r}.npz") for r in range(nproc)]
    for rank in range(1, nproc):
        for a, b in zip(per_rank[0], per_rank[rank], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"rank {rank} weights differ from rank 0")
    initial = load_weights_of_untrained_model()
    assert max_relative_difference(initial, single_process_reference) > 1e-3, "reference did not train"
    assert max_relative_difference(per_rank[0], single_process_reference) <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_worker_with_logical_devices(tmp_path, single_process_reference):
    """--nproc 1 --devices-per-worker 3: MirroredStrategy over 3 logical CPUs."""
    code, stdout, stderr = run(
        [*console_script(), "--nproc", "1", "--devices-per-worker", "3", "--timeout", "240", str(MAIN_JOB),
         *TRAIN_ARGS, "--out", str(tmp_path / "weights.npz")],
        timeout=270,
    )
    assert code == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    assert "[rank 0] cluster: local, 1 worker(s), 3 replica(s) in sync" in stdout
    weights = load_weights(tmp_path / "weights.npz")
    assert max_relative_difference(weights, single_process_reference) <= 1e-5


def load_weights_of_untrained_model():
    code = ("import sys, numpy as np; sys.path.insert(0, 'examples'); import train_digits; "
            "m = train_digits.build_model(128, 3); "
            "np.savez(sys.stdout.buffer, *m.get_weights())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import io

    with np.load(io.BytesIO(proc.stdout)) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


# The main job's data, stored with the example (examples/data/README.md).
DIGITS_SHA256 = "af104d81e7cd419be5f343d23c6ca2e4e4ff847b06636260802df8e903c6183f"


def test_the_main_jobs_data_is_the_recorded_digits_set_and_is_checked(tmp_path):
    import hashlib

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_digits
    finally:
        sys.path.remove(str(ROOT / "examples"))
    assert hashlib.sha256(train_digits.DIGITS.read_bytes()).hexdigest() == DIGITS_SHA256
    (x_train, y_train), (x_test, y_test) = train_digits.load_data(seed=3)
    assert x_train.shape == (1437, 64) and x_test.shape == (360, 64) and 0 <= x_train.min() <= x_train.max() <= 1
    labels = np.concatenate([y_train, y_test])
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # A crafted file is refused (no pickles, wrong shapes or values).
    crafted = tmp_path / "digits.npz"
    np.savez(crafted, images=np.full((1797, 64), 255, np.uint8), labels=np.zeros(1797, np.uint8))
    with pytest.raises(ValueError, match="not the digits data set"):
        train_digits.load_data(3, path=crafted)
    np.savez(crafted, images=np.array([object()]), labels=np.zeros(1797, np.uint8))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        train_digits.load_data(3, path=crafted)


# -------------------------------------------------------- failure paths
@pytest.mark.timeout(120)
def test_failed_worker_stops_the_job_and_is_named(tmp_path):
    # Rank 2 ignores SIGTERM, so stopping it needs the SIGKILL escalation;
    # every worker has a child of its own, reachable only through its group.
    code, stdout, stderr = run(
        [*console_script(), "--nproc", "3", "--grace-period", "2", "--no-python", sys.executable, str(PROBE),
         "--pid-dir", str(tmp_path), "--fail-rank", "1", "--exit-code", "3", "--fail-after", "2",
         "--ignore-sigterm-rank", "2", "--spawn-child"],
        timeout=90,
    )
    exited_at = time.time()
    assert code == 3, stderr
    assert "rank 1 (pid" in stderr and "exited with code 3" in stderr
    assert "stopping the other 2 running worker(s)" in stderr
    # The healthy workers would sleep for 600 s: the launcher stopped them
    # (grace period 2 s, then SIGKILL for the one ignoring SIGTERM).
    reaction = exited_at - float((tmp_path / "1.failed_at").read_text())
    assert reaction < 20, f"the launcher took {reaction:.0f}s to give up after rank 1 failed"
    assert len(recorded_pids(tmp_path)) == 6
    assert_no_survivors(recorded_pids(tmp_path))
    assert (tmp_path / "0.signal").read_text() == "SIGTERM"
    assert not (tmp_path / "2.signal").exists()  # it ignored SIGTERM and was killed


@pytest.mark.timeout(120)
def test_worker_killed_by_signal_is_reported(tmp_path):
    code, _, stderr = run(
        [*console_script(), "--nproc", "2", "--grace-period", "1", "--no-python", sys.executable, str(PROBE),
         "--pid-dir", str(tmp_path), "--fail-rank", "0", "--exit-code", "-9"],
        timeout=90,
    )
    assert code == 1, stderr
    assert "rank 0 (pid" in stderr and "was killed by SIGKILL (exit code -9)" in stderr
    assert_no_survivors(recorded_pids(tmp_path))


@pytest.mark.timeout(120)
def test_timeout_kills_everything(tmp_path):
    code, _, stderr = run(
        [*console_script(), "--nproc", "2", "--timeout", "10", "--grace-period", "1", "--no-python",
         sys.executable, str(PROBE), "--pid-dir", str(tmp_path), "--spawn-child"],
        timeout=90,
    )
    assert code == launch.EXIT_TIMEOUT, stderr
    assert "timeout: the job did not finish within 10s" in stderr
    assert len(recorded_pids(tmp_path)) == 4
    assert_no_survivors(recorded_pids(tmp_path))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_every_worker(tmp_path, signum):
    proc = start([*console_script(), "--nproc", "2", "--grace-period", "5", "--no-python", sys.executable,
                  str(PROBE), "--pid-dir", str(tmp_path), "--spawn-child"])
    try:
        wait_for_files(tmp_path, "*.pids", 2)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == 128 + signum, stderr
    assert f"received {signal.Signals(signum).name}" in stderr
    for rank in range(2):
        assert (tmp_path / f"{rank}.signal").read_text() == signal.Signals(signum).name
    assert_no_survivors(recorded_pids(tmp_path))


@pytest.mark.timeout(120)
def test_every_descendant_dies_with_a_sigkilled_launcher(tmp_path):
    """Workers, their children and a setsid double-forked daemon: the PID
    namespace's init dies with the launcher, and the kernel kills the rest."""
    proc = start(probe("--spawn-child", "--daemon", pid_dir=tmp_path))
    try:
        wait_for_files(tmp_path, "*.pids", 2)
        pids = recorded_pids(tmp_path)
        assert len(pids) == 6  # per rank: worker, child, daemon
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only, not its group
        proc.wait(timeout=10)
        assert_no_survivors(pids)
    finally:
        kill_group(proc)
        for pid in recorded_pids(tmp_path):
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_restarts_rerun_the_whole_job(tmp_path):
    code, _, stderr = run(
        [*console_script(), "--nproc", "2", "--restarts", "2", "--grace-period", "1", "--no-python",
         sys.executable, str(PROBE), "--pid-dir", str(tmp_path), "--fail-rank", "1",
         "--fail-only-first-attempt"],
        timeout=90,
    )
    assert code == 0, stderr
    assert "rank 1 (pid" in stderr and "restarting the job (restart 1 of 2)" in stderr
    assert sorted(p.name for p in tmp_path.glob("*.pids")) == ["0.0.pids", "0.1.pids", "1.0.pids", "1.1.pids"]
    assert_no_survivors(recorded_pids(tmp_path))


@pytest.mark.timeout(120)
def test_output_lines_are_prefixed_per_stream(tmp_path):
    # Through the launch/local.sh wrapper, which the README shows.
    code, stdout, stderr = run(
        ["env", f"DISTADAM_PYTHON={sys.executable}", "NPROC=2", str(ROOT / "launch" / "local.sh"),
         "--grace-period", "1", "--no-python", sys.executable, str(PROBE), "--pid-dir", str(tmp_path),
         "--sleep", "0"],
        timeout=90,
    )
    assert code == 0, stderr
    assert stdout.endswith("\n")  # the unterminated last line was completed
    for rank in range(2):
        prefix = f"[rank {rank}] "
        own = [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]
        assert own == [f"hello from rank {rank} of 2", "first line", "second line without newline"]
        assert f"{prefix}rank {rank} stderr line\n" in stderr
    assert all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in stdout.splitlines())
    assert_no_survivors(recorded_pids(tmp_path))


# --------------------------------------------------- every descendant
EXIT_PATHS = {
    "success": (["--sleep", "0"], 0),
    "failure": (["--fail-rank", "1", "--exit-code", "3"], 3),
    "timeout": (["--timeout-marker"], launch.EXIT_TIMEOUT),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("network", ["private", "host"])
@pytest.mark.parametrize("path", EXIT_PATHS)
def test_detached_descendants_die_on_every_exit_path(tmp_path, path, network):
    """A worker's daemon (fork, setsid, fork) is in no worker process group:
    the PID namespace (private) or the subreaper (host) still catches it."""
    options, expected = EXIT_PATHS[path]
    command = probe("--daemon", *options, network=network, pid_dir=tmp_path)
    if path == "timeout":
        command.remove("--timeout-marker")
        command[1:1] = ["--timeout", "8"]
    code, _, stderr = run(command, timeout=90)
    assert code == expected, stderr
    pids = recorded_pids(tmp_path)
    assert len(pids) == 4, pids  # per rank: worker and daemon
    assert_no_survivors(pids, within=5)


@pytest.mark.timeout(120)
def test_signal_stops_detached_descendants(tmp_path):
    proc = start(probe("--daemon", pid_dir=tmp_path))
    try:
        wait_for_files(tmp_path, "*.pids", 2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert_no_survivors(recorded_pids(tmp_path), within=5)


# ------------------------------------------------------------- network
def socket_inodes(pid):
    """Inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def listening_sockets(pid):
    """(address, port) of every TCP socket ``pid`` holds in LISTEN state, from
    its network namespace's /proc/PID/net/tcp and tcp6."""
    inodes = socket_inodes(pid)
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((ipaddress.ip_address(socket.inet_ntop(family, raw)), int(hex_port, 16)))
    return found


def network_namespace(pid="self"):
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def assert_listener_confined(ready: Path, require_private: bool) -> None:
    """The process a probe's ``.ready`` file names ({"pid", "port"}) listens
    on its port, and only on loopback or inside a network namespace other
    than the machine's whose only interface is lo (``require_private``: the
    latter, whatever the address); from the machine's own namespace the port
    is not there (the probe connects to 127.0.0.1 only)."""
    worker = json.loads(ready.read_text())
    sockets = listening_sockets(worker["pid"])
    assert worker["port"] in {port for _, port in sockets}, (worker, sockets)
    private = (network_namespace(worker["pid"]) != network_namespace()
               and launch.network_interfaces(worker["pid"]) == ["lo"])
    exposed = [(str(address), port) for address, port in sockets if not address.is_loopback]
    if require_private:
        assert private, f"{ready.name}: listening in the machine's network namespace on {sockets}"
    assert private or not exposed, f"{ready.name}: listening beyond loopback on {exposed}"
    with socket.socket() as probe_socket, pytest.raises(ConnectionRefusedError):
        probe_socket.settimeout(5)
        probe_socket.connect(("127.0.0.1", worker["port"]))


def probe_listeners(proc, probe_dir: Path, require_private: bool, start_timeout: float) -> str:
    """Check the listeners of a job of two listen probes (tests/workers/*listen_probe.py)
    once both are ready, then let them exit; the job's stderr."""
    try:
        wait_for_files(probe_dir, "*.ready", 2, timeout=start_timeout, proc=proc)
        for ready in sorted(probe_dir.glob("*.ready")):
            assert_listener_confined(ready, require_private=require_private)
        (probe_dir / "stop").write_text("")
        _, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


@pytest.mark.timeout(240)
def test_workers_expose_nothing_beyond_loopback(tmp_path):
    """TensorFlow's gRPC server binds every interface. Read from the socket
    table while a real 2-worker MultiWorkerMirroredStrategy job runs: every
    listening socket of every worker is on a loopback address, or lives in a
    network namespace other than the machine's whose only interface is lo.
    The only traffic sent is to 127.0.0.1."""
    listen_probe = ROOT / "tests" / "workers" / "listen_probe.py"
    proc = start([*console_script(), "--nproc", "2", "--timeout", "200", str(listen_probe), str(tmp_path)])
    stderr = probe_listeners(proc, tmp_path, require_private=False, start_timeout=180)
    assert "ExposedServerWarning" not in stderr  # strategy_from_env knows the namespace confines it


@pytest.mark.timeout(240)
def test_host_network_is_an_explicit_loud_choice(tmp_path):
    """--network host: the launcher says what it costs, and so does every
    worker's strategy_from_env (nothing known confines its server)."""
    listen_probe = ROOT / "tests" / "workers" / "listen_probe.py"
    (tmp_path / "stop").write_text("")  # report, then exit at once
    code, _, stderr = run([*console_script(), "--nproc", "2", "--network", "host", "--timeout", "200",
                           str(listen_probe), str(tmp_path)], timeout=230)
    assert code == 0, stderr[-3000:]
    assert "WARNING: --network host: the workers' TensorFlow gRPC servers listen on EVERY interface" in stderr
    for rank in range(2):
        assert f"[rank {rank}] " in stderr and f"ExposedServerWarning: TensorFlow's gRPC server for worker {rank}" \
            in stderr, stderr[-3000:]


def test_launcher_refuses_when_no_private_network_can_be_made(tmp_path, monkeypatch, capsys):
    (tmp_path / "x.py").write_text("")

    def fail(self, private_network):
        raise launch.SandboxError("unshare() failed: Operation not permitted")

    monkeypatch.setattr(launch.Sandbox, "__init__", fail)
    assert launch.main(["--nproc", "2", str(tmp_path / "x.py")]) == 2
    err = capsys.readouterr().err
    assert "cannot give the workers a private network (unshare() failed" in err
    assert "pass --network host" in err


# -------------------------------------------------------------- output
@pytest.mark.timeout(120)
def test_a_huge_line_does_not_grow_the_launcher(tmp_path):
    """400 MiB without a newline, relayed to /dev/null: the launcher's peak
    RSS (and its workers', all below the wrapper) stays far below it."""
    wrapper = ("import resource, subprocess, sys\n"
               "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True, timeout=100)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    code, stdout, stderr = run([sys.executable, "-c", wrapper,
                                *probe("--sleep", "0", "--long-line-mib", "400", nproc=1, pid_dir=tmp_path)],
                               timeout=110)
    assert code == 0, stderr[-3000:]
    peak_mib = int(stdout.split()[-1]) / 1024
    assert peak_mib < 150, f"the launcher peaked at {peak_mib:.0f} MiB relaying one 400 MiB line"


@pytest.mark.timeout(60)
def test_long_lines_are_split_and_progress_bars_keep_their_prefix(tmp_path):
    # Bytes, not text: universal newlines would turn every \r into \n.
    proc = subprocess.Popen(probe("--sleep", "0", "--long-line-mib", "1", "--progress", nproc=1,
                                  pid_dir=tmp_path), cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=50)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    stdout = out.decode()
    pieces = [p for p in re.split(r"\r\n|\r|\n", stdout) if p]
    assert all(p.startswith("[rank 0] ") for p in pieces), [p[:40] for p in pieces if not p.startswith("[rank")]
    # Redrawn in place, the prefix on every update; "\r\n" ends the bar's line.
    assert "[rank 0] 1/3 [=  ]\r[rank 0] 2/3 [== ]\r[rank 0] 3/3 [===]\n" in stdout
    long = [p[len("[rank 0] "):] for p in pieces if p.endswith("x" * 100)]
    assert "".join(long).endswith("x" * (1 << 20))
    assert max(len(p) for p in long) <= launch.MAX_LINE_BYTES


def test_split_output_keeps_characters_and_crlf_whole():
    text = ("é" * launch.MAX_LINE_BYTES).encode()  # 2 bytes each: the cut falls inside one
    buffer = bytearray(text)
    pieces = launch.split_output(buffer, final=True)
    assert b"".join(raw for raw, _ in pieces) == text
    assert all(raw.decode() for raw, _ in pieces)  # every piece is valid UTF-8
    buffer = bytearray(b"a\r")
    assert launch.split_output(buffer) == []  # may be the first half of "\r\n"
    buffer += b"\nb\rc"
    assert launch.split_output(buffer) == [(b"a", "\n"), (b"b", "\r")]
    assert launch.split_output(buffer, final=True) == [(b"c", "\n")]


# ------------------------------------------------------ no TensorFlow
NO_TENSORFLOW = r"""
import sys
import distadam, distadam.launch, distadam.cluster
from distadam.__main__ import main
distadam.resolve_cluster({})
assert main(["plan", "--params", "7e9", "--workers", "64"]) == 0
try:
    main(["launch", "--help"])
except SystemExit:
    pass
loaded = sorted(m for m in ("tensorflow", "keras", "numpy") if m in sys.modules)
print("LOADED", loaded, "VmHWM", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


@pytest.mark.timeout(60)
def test_launcher_cluster_and_plan_never_import_tensorflow():
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("LOADED"))
    assert line.startswith("LOADED []"), line


def test_package_names_load_on_first_use():
    import distadam

    assert distadam.ShardedAdam.__name__ == "ShardedAdam"
    assert distadam.strategy_from_env is __import__("distadam.cluster").cluster.strategy_from_env
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        distadam.Nope  # noqa: B018


@pytest.mark.timeout(60)
def test_missing_tensorflow_is_named():
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "import distadam\n"
            "try:\n    distadam.ShardedAdam\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True,
                            text=True, timeout=50)
    assert "distadam needs TensorFlow 2.21" in result.stdout, result.stderr


@pytest.mark.timeout(60)
def test_distadam_launch_subcommand(tmp_path):
    script = Path(sys.executable).with_name("distadam")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "distadam"]
    code, stdout, stderr = run([*command, "launch", "--nproc", "2", "--no-python", sys.executable,
                                str(PROBE), "--pid-dir", str(tmp_path), "--sleep", "0"], timeout=50)
    assert code == 0, stderr
    assert "[rank 1] hello from rank 1 of 2" in stdout
    code, stdout, _ = run([*command, "--help"], timeout=50)
    assert code == 0 and "launch" in stdout and "plan" in stdout


# ------------------------------------------------------- launch scripts
LAUNCH_SCRIPTS = ["local.sh", "horovodrun_local.sh", "mpirun_local.sh", "slurm.sbatch"]


@pytest.mark.parametrize("name", LAUNCH_SCRIPTS)
def test_launch_scripts_share_names_venv_and_port(name):
    text = (ROOT / "launch" / name).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert ". launch/common.sh" in code, "finds the venv its own way"
    assert not re.search(r"\bNP\b", code), "NP instead of NPROC"
    assert "29500" not in text and "DISTADAM_PORT=" not in code, "a default port other than distadam's 2222"
    assert not re.search(r"(^|\s)python3?\s", code), "a bare python instead of the venv's"


def fake_bin(directory, name, body):
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return directory


@pytest.mark.timeout(60)
def test_slurm_script_runs_the_venv_python_on_distadams_port(tmp_path):
    bin_dir = fake_bin(tmp_path / "bin", "srun", 'echo "PORT=${DISTADAM_PORT:-unset}"; printf "%s\\n" "$@"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(ROOT), "DISTADAM_PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--epochs", "3"], env=env,
                            capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["PORT=unset", "--distribution=block", sys.executable,
                                          "examples/train_digits.py", "--epochs", "3"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script, tool", [("horovodrun_local.sh", "horovodrun"), ("mpirun_local.sh", "mpirun")])
def test_horovod_scripts_say_how_to_get_horovod(tmp_path, script, tool):
    python_dir = tmp_path / "venv" / "bin"  # a venv without Horovod / Open MPI
    python_dir.mkdir(parents=True)
    (python_dir / "python").symlink_to(sys.executable)
    result = subprocess.run(["bash", str(ROOT / "launch" / script)], capture_output=True, text=True, timeout=50,
                            env={"PATH": "/usr/bin:/bin", "DISTADAM_PYTHON": str(python_dir / "python")})
    assert result.returncode == 1, result.stderr
    assert f"{tool} not found" in result.stderr and "run ./dev setup horovod" in result.stderr


def mpi_tool(name):
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else None


@pytest.mark.timeout(90)
@pytest.mark.skipif(mpi_tool("mpirun") is None, reason="no mpirun in the venv (./dev setup horovod)")
def test_mpirun_local_ranks_expose_nothing_beyond_loopback(tmp_path):
    """launch/mpirun_local.sh, read from the socket table while 2 real mpirun
    ranks listen the way TensorFlow's gRPC server does (0.0.0.0): each rank's
    listening socket lives in a network namespace other than the machine's
    whose only interface is lo, and the machine's 127.0.0.1 does not answer on
    it. (Before, the ranks listened on 0.0.0.0 in the machine's namespace.)"""
    listen_probe = ROOT / "tests" / "workers" / "mpi_listen_probe.py"
    env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DISTADAM_PYTHON": sys.executable, "NPROC": "2"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = start_process(["bash", ROOT / "launch" / "mpirun_local.sh", listen_probe, tmp_path], cwd=ROOT, env=env,
                         separate_stderr=True)
    probe_listeners(proc, tmp_path, require_private=True, start_timeout=60)


@pytest.mark.timeout(60)
def test_mpirun_local_needs_an_explicit_choice_to_use_the_machines_network(tmp_path):
    """A HOSTFILE run cannot share one private namespace: refused unless
    DISTADAM_NETWORK=host says so, and then run plainly, with a warning."""
    # A venv whose mpirun only records its arguments: the script puts the
    # venv's bin first on PATH, so nothing here can start a real mpirun.
    (tmp_path / "venv").mkdir()
    bin_dir = fake_bin(tmp_path / "venv" / "bin", "mpirun", 'printf "%s\\n" "$@" > "$MPIRUN_ARGS_FILE"\n')
    (bin_dir / "python").symlink_to(sys.executable)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=2\n")
    env = {"PATH": "/usr/bin:/bin", "DISTADAM_PYTHON": str(bin_dir / "python"), "HOSTFILE": str(hostfile),
           "MPIRUN_ARGS_FILE": str(tmp_path / "args")}
    script = ["bash", str(ROOT / "launch" / "mpirun_local.sh"), "train.py"]
    refused = subprocess.run(script, env=env, capture_output=True, text=True, timeout=50)
    assert refused.returncode == 2 and "Set DISTADAM_NETWORK=host to run anyway" in refused.stderr
    assert not (tmp_path / "args").exists(), "mpirun ran anyway"
    ran = subprocess.run(script, env={**env, "DISTADAM_NETWORK": "host"}, capture_output=True, text=True,
                         timeout=50)
    assert ran.returncode == 0, ran.stderr
    assert "WARNING: DISTADAM_NETWORK=host" in ran.stderr
    assert (tmp_path / "args").read_text().split()[-2:] == [str(bin_dir / "python"), "train.py"]
    bad = subprocess.run(script, env={**env, "DISTADAM_NETWORK": "bridge"}, capture_output=True, text=True,
                         timeout=50)
    assert bad.returncode == 2 and "DISTADAM_NETWORK must be private or host" in bad.stderr


# ------------------------------------------------------------ pure parts
def test_worker_environments_describe_one_local_cluster():
    inherited = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "SLURM_PROCID": "3",
                 "JOB_COMPLETION_INDEX": "1", "TF_CONFIG": "{}", "PATH": "/bin"}
    envs = launch.worker_environments(3, 1, restart=0, base=inherited)
    specs = [resolve_cluster(env) for env in envs]
    assert [s.rank for s in specs] == [0, 1, 2]
    assert {s.peers for s in specs} == {specs[0].peers}
    hosts = {p.rsplit(":", 1)[0] for p in specs[0].peers}
    ports = {p.rsplit(":", 1)[1] for p in specs[0].peers}
    assert hosts == {"127.0.0.1"} and len(ports) == 3
    assert all("OMPI_COMM_WORLD_RANK" not in env and env["PATH"] == "/bin" for env in envs)


def test_single_worker_gets_logical_devices_and_no_tf_config():
    (env,) = launch.worker_environments(1, 4, restart=0, base={"DISTADAM_LOGICAL_DEVICES": "9"})
    assert "TF_CONFIG" not in env and env["DISTADAM_LOGICAL_DEVICES"] == "4"
    assert resolve_cluster(env).world_size == 1
    (env,) = launch.worker_environments(1, 1, restart=0, base={})
    assert env["DISTADAM_LOGICAL_DEVICES"] == "1"  # so the script's own default cannot apply


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2", "--devices-per-worker", "2", "x.py"], "needs --nproc 1"),
    (["--nproc", "0", "x.py"], "at least 1"),
    (["--nproc", "10000", "x.py"], "--nproc 10000 is more than 256 local worker processes"),
    (["--nproc", "1_0", "x.py"], "expected a whole number in ASCII digits, got '1_0'"),
    (["--nproc", "\uff11", "x.py"], "expected a whole number in ASCII digits"),
    (["--nproc", "\u0662", "x.py"], "expected a whole number in ASCII digits"),
    (["--nproc", "9" * 5000, "x.py"], "out of range"),
    (["--nproc", "1", "--devices-per-worker", "20000", "x.py"], "--devices-per-worker 20000 is more than 64"),
    (["--restarts", "1000000", "x.py"], "--restarts 1000000 is more than 100"),
    (["--timeout", "0", "x.py"], "--timeout must be positive"),
    (["--timeout", "nan", "x.py"], "expected a finite number of seconds >= 0, got 'nan'"),
    (["--timeout", "inf", "x.py"], "got 'inf'"),
    (["--timeout", "-5", "x.py"], "got '-5'"),
    (["--grace-period", "-1", "x.py"], "got '-1'"),
    (["--grace-period", "nan", "x.py"], "got 'nan'"),
    (["--grace-period", "inf", "x.py"], "got 'inf'"),
    (["--grace-period", "1e300", "x.py"], "--grace-period 1e+300 is more than 3600 seconds"),
    (["--network", "bridge", "x.py"], "invalid choice: 'bridge'"),
    (["-m", "--no-python", "x"], "exclude each other"),
    (["--nproc", "2", "no/such/train.py"], "no such script: 'no/such/train.py'"),
    (["--no-python", "no-such-program-xyz"], "not an executable on PATH"),
])
def test_invalid_arguments_are_rejected(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "x.py" must exist for the other checks to be reached
    (tmp_path / "x.py").write_text("")
    with pytest.raises(SystemExit) as raised:
        launch.parse_args(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_default_grace_period_fits_a_preemption_save(capsys):
    """SIGINT/SIGTERM to the launcher (a preemption): by default the workers
    get the Kubernetes manifests' terminationGracePeriodSeconds to save
    (before, 5 s cut a save of any size); after a failure, when no save can
    happen, still 5 s. An explicit --grace-period applies to both."""
    import yaml

    job = yaml.safe_load((ROOT / "k8s" / "indexed-job" / "job.yaml").read_text())
    k8s_grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    args = launch.parse_args([str(PROBE)])
    assert launch.grace_period(args, signalled=True) == k8s_grace == 60
    assert launch.grace_period(args, signalled=False) == 5
    args = launch.parse_args(["--grace-period", "7", str(PROBE)])
    assert launch.grace_period(args, signalled=True) == launch.grace_period(args, signalled=False) == 7
    with pytest.raises(SystemExit):
        launch.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Default: 60 after SIGINT/SIGTERM to the launcher, time for a preemption save" in help_text


def test_script_arguments_pass_through_untouched():
    args = launch.parse_args(["--nproc", "3", str(MAIN_JOB), "--nproc", "7", "--timeout", "x"])
    assert launch.worker_command(args)[-4:] == ["--nproc", "7", "--timeout", "x"]
    assert args.nproc == 3
