"""PID 1 of an MPIJob worker pod: runs the pod's command (sshd) and forwards
the kubelet's SIGTERM to the training ranks running in the pod.

    python scripts/mpijob_worker_init.py bash scripts/mpijob_worker_sshd.sh

Why. On eviction, drain or preemption the kubelet sends SIGTERM to the
container's PID 1 only, and SIGKILLs everything terminationGracePeriodSeconds
later. A worker whose PID 1 is sshd loses the signal: sshd exits, the
container stops, and the ranks (sshd -> session -> orted -> rank, started by
the launcher's mpirun) die by SIGKILL without ever seeing SIGTERM, so
distadam.preemption.PreemptionGuard never saves. Here PID 1 is this process:

* it starts COMMAND as its child and reaps every process orphaned to it
  (as PID 1 the kernel hands it orphans; elsewhere it asks to be the child
  subreaper, so the same holds when it runs outside a container);
* on SIGTERM (or SIGINT) it sends SIGTERM to each rank among its descendants:
  a process whose environment carries an MPI rank (OMPI_COMM_WORLD_RANK,
  PMIX_RANK or PMI_RANK) and whose parent does not (the rank itself, not
  what the rank started, as a kubelet signals one process). Not to orted
  (which would kill its ranks after one second) and not to sshd: the ranks'
  connections to the launcher stay up while they save. The guard then agrees
  on the flag across all ranks, every rank saves, and each exits 42;
* once no rank is left it stops COMMAND (SIGTERM) and exits with 143
  (128 + SIGTERM); if COMMAND exits on its own, it exits with its code.

It needs no privileges: the ranks run as the pod's user, whose /proc entries
(environ included) that user may read.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

RANK_VARIABLES = (b"OMPI_COMM_WORLD_RANK=", b"PMIX_RANK=", b"PMI_RANK=")
PR_SET_CHILD_SUBREAPER = 36
POLL_SECONDS = 0.1


def log(message):
    print(f"[mpijob_worker_init] {message}", file=sys.stderr, flush=True)


def parents():
    """{pid: parent pid} of every process this one can see."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name may hold spaces and ')': split after the last ')'.
                table[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return table


def is_rank(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = environ.read().split(b"\0")
    except OSError:
        return False  # exited, or not ours to read
    return any(variable.startswith(RANK_VARIABLES) for variable in variables)


def ranks_below(root):
    """The ranks among ``root``'s descendants (outermost rank processes only)."""
    table = parents()
    children = {}
    for pid, parent in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = [], [(root, False)]
    while stack:
        pid, inside_rank = stack.pop()
        for child in children.get(pid, []):
            rank = not inside_rank and is_rank(child)
            if rank:
                found.append(child)
            stack.append((child, inside_rank or rank))
    return sorted(found)


def reap():
    """Collect every exited child (orphans included); the command's status or None."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def main(argv):
    if not argv:
        print("usage: mpijob_worker_init.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    if os.getpid() != 1 and sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stopping = []
    # A handler (not SIG_DFL) also makes the kernel deliver the kubelet's
    # signal to a PID 1, which it otherwise drops.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stopping.append(number))
    command = subprocess.Popen(argv)
    signalled = set()
    while True:
        for pid, status in reap():
            if pid == command.pid:
                command.returncode = os.waitstatus_to_exitcode(status)
        if not stopping:
            if command.returncode is not None:
                return command.returncode if command.returncode >= 0 else 128 - command.returncode
        else:
            ranks = ranks_below(os.getpid())
            for pid in ranks:
                if pid not in signalled:
                    signalled.add(pid)
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        continue
                    log(f"{signal.Signals(stopping[0]).name}: forwarded SIGTERM to rank process {pid}")
            if not ranks:
                if not signalled:
                    log(f"{signal.Signals(stopping[0]).name}: no rank process is running")
                if command.returncode is None:
                    command.terminate()
                    try:
                        command.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        command.kill()
                return 128 + signal.SIGTERM
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
