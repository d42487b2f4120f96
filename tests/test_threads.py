"""A worker's thread count stays bounded however many steps it runs (issue 13, item 13).

TensorFlow implements ``CommunicationOptions(timeout_seconds=T)`` with two
detached threads per collective, each sleeping T seconds; a fast job
accumulates thousands (1,437 per worker after 220 digits steps at T=120).
The main job's defaults must not: it bounds stalls with one watchdog thread
(distadam.watchdog) instead. Measured from /proc/<pid>/status, never timed.
"""

import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, worker_env

STEPS_PER_EPOCH = 22
# Threads a worker may add between the end of its first epoch and the end of
# training: TensorFlow's pools are created by then; with per-collective timer
# threads the growth is ~6.5 per step (about 1,200 over these 198 steps).
GROWTH_BOUND = 24


def threads_of(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return int(re.search(r"^Threads:\s+(\d+)", status.read(), re.M).group(1))
    except (OSError, AttributeError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_main_job_thread_count_does_not_grow_with_steps(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "distadam.launch", "--nproc", "2", "--timeout", "500",
         str(ROOT / "examples" / "train_digits.py"), "--epochs", "10"],
        cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    samples = {}  # pid -> [(epochs logged so far, threads)]
    try:
        while proc.poll() is None:
            text = "".join(lines)
            match = re.search(r"pids ([\d, ]+)", text)
            epochs = len(re.findall(r"\[rank 0\] epoch \d+/", text))
            for pid in ([int(p) for p in match.group(1).replace(",", " ").split()] if match else []):
                count = threads_of(pid)
                if count is not None:
                    samples.setdefault(pid, []).append((epochs, count))
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == 0, output[-4000:]
    assert "after 220 steps" in output
    assert len(samples) == 2, output[-2000:]
    for pid, series in samples.items():
        after_first_epoch = [count for epochs, count in series if epochs >= 1]
        assert after_first_epoch, f"no sample of pid {pid} after the first epoch: {series}"
        baseline, peak = after_first_epoch[0], max(after_first_epoch)
        by_epoch = {epochs: count for epochs, count in series}
        assert peak - baseline <= GROWTH_BOUND, (
            f"worker {pid}: {baseline} threads after epoch 1, up to {peak} later "
            f"(last count per epoch: {by_epoch})")
