"""An mpirun rank standing in for a training process under
distadam.preemption.PreemptionGuard, for the MPIJob preemption test: no
TensorFlow (what is under test is whether the kubelet's SIGTERM reaches the
rank in its pod, not the save itself, which test_preemption.py covers).

usage: mpi_preempted_rank.py DIR SAVE_SECONDS
Writes DIR/<rank>.started (its PID as the machine's /proc names it). On
SIGTERM it writes DIR/<rank>.sigterm, "saves" for SAVE_SECONDS, writes
DIR/<rank>.saved, waits (at most 30 s) until every rank has saved, as the
guard's collective save does, and exits 42 (distadam's EXIT_PREEMPTED).
Without SIGTERM it exits 0 after 60 s.
"""

import os
import signal
import sys
import time

directory, save_seconds = sys.argv[1], float(sys.argv[2])
rank, world = int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])
terminated = []
signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(time.time()))


def mark(name, text=""):
    path = os.path.join(directory, f"{rank}.{name}")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


mark("started", os.readlink("/proc/self"))
deadline = time.monotonic() + 60
while not terminated and time.monotonic() < deadline:
    time.sleep(0.05)
if not terminated:
    sys.exit(0)
mark("sigterm", repr(terminated[0]))
time.sleep(save_seconds)
mark("saved")
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not all(
        os.path.exists(os.path.join(directory, f"{r}.saved")) for r in range(world)):
    time.sleep(0.05)
sys.exit(42)
