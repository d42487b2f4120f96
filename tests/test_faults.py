"""Worker failure: bounded exit, launcher restart, resume from the last checkpoint."""

import json
import os
import re
import sys
import time

import numpy as np
import pytest

from conftest import finish, free_ports, kill_group, run_process, start_worker
from distadam.watchdog import EXIT_STALLED

pytestmark = pytest.mark.slow  # multi-process jobs that wait out failure bounds

# The bound this project promises for noticing a dead peer (the fault
# worker's stall bound is 20 s, by its watchdog or TF's collective timeout;
# heartbeats are faster), with room for a loaded machine.
FAILURE_BOUND_SECONDS = 50


def launch(args, timeout):
    """Run distadam-launch; returns (exit code, output, wall seconds)."""
    finished = run_process([sys.executable, "-m", "distadam.launch", *args], timeout)
    return finished.code, finished.out, finished.seconds


def worker_pids(output):
    return [int(p) for p in re.findall(r"pids? ([\d, ]+)", output) for p in p.replace(",", " ").split()]


def assert_no_survivors(output):
    pids = worker_pids(output)
    # No pids parsed would make this check vacuous: the launcher always names them.
    assert pids, f"no worker pids in the launcher's output:\n{output[-3000:]}"
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"worker pid {pid} outlived the launcher")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("workers", [2, 3])
def test_killed_worker_stops_the_job_in_bounded_time(tmp_path, workers):
    victim = workers - 1
    code, out, _ = launch(["--nproc", workers, "fault_train.py", tmp_path / "ckpt", tmp_path / "out",
                           victim, 7], timeout=300)
    assert code != 0
    assert f"rank {victim}" in out and "SIGKILL" in out, out[-3000:]
    # From the kill to the launcher's exit: bounded, not a hang.
    killed_at = float(re.search(r"SIGKILL at step 7 at t=([\d.]+)", out).group(1))
    waited = time.time() - killed_at
    assert waited <= FAILURE_BOUND_SECONDS, f"launcher took {waited:.0f}s after the kill"
    assert f"rank {victim} (pid" in out and "killed by SIGKILL" in out, out[-3000:]
    assert_no_survivors(out)
    assert not list(tmp_path.glob("out-rank*.npz"))  # nobody finished


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fault,bound", [("kill", "watchdog"), ("stall", "watchdog"),
                                         ("stall", "collective-timeout")])
def test_survivor_exits_on_its_own_within_the_bound(tmp_path, fault, bound):
    """Without a launcher (e.g. on Kubernetes) the surviving worker must not hang,
    whether its peer died or stalls mid-training (the stall watchdog, or
    TensorFlow's collective timeout)."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for rank in range(2):
            procs.append(start_worker(
                ["fault_train.py", tmp_path / "ckpt", tmp_path / "out", 1, 7, fault],
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}}),
                DISTADAM_RANK=rank, DISTADAM_FAULT_BOUND=bound))
        if fault == "kill":
            victim_out = finish(procs[1], timeout=240)
            assert procs[1].returncode == -9, victim_out[-3000:]
        survivor_out = finish(procs[0], timeout=240 + FAILURE_BOUND_SECONDS)
        assert procs[0].returncode != 0
        marker = tmp_path / "ckpt" / "killed-rank1"
        waited = time.time() - marker.stat().st_mtime
        assert waited <= FAILURE_BOUND_SECONDS, f"survivor took {waited:.0f}s to notice"
        # Case-insensitive: TF's own timeout may abort the process from C++
        # ("DEADLINE_EXCEEDED: Collective has timed out") before Python raises.
        assert re.search(r"Unavailable|DeadlineExceeded|Deadline|Connection reset|aborted|stalled", survivor_out,
                         re.IGNORECASE), survivor_out[-3000:]
        if fault == "stall" and bound == "watchdog":
            assert procs[0].returncode == EXIT_STALLED and "distadam: stalled" in survivor_out, survivor_out[-3000:]
    finally:
        for proc in procs:
            kill_group(proc)


@pytest.mark.timeout(600)
def test_restart_resumes_from_last_checkpoint_and_matches_uninterrupted(tmp_path):
    code, out, _ = launch(["--nproc", 2, "--restarts", 1, "--timeout", 400, "fault_train.py",
                           tmp_path / "faulty", tmp_path / "faulty", 1, 7], timeout=450)
    assert code == 0, out[-4000:]
    assert "restarting the job" in out
    assert "starting at step 5 from" in out  # the checkpoint before the kill
    assert_no_survivors(out)

    code, clean_out, _ = launch(["--nproc", 2, "fault_train.py", tmp_path / "clean", tmp_path / "clean"],
                                timeout=300)
    assert code == 0, clean_out[-4000:]
    for rank in range(2):
        faulty = np.load(tmp_path / f"faulty-rank{rank}.npz")
        clean = np.load(tmp_path / f"clean-rank{rank}.npz")
        assert int(faulty["iterations"]) == int(clean["iterations"]) == 16
        for key in (k for k in clean.files if k.startswith("arr_")):
            np.testing.assert_allclose(faulty[key], clean[key], rtol=1e-6, atol=1e-7)
