"""A light worker for the launcher's failure tests (no TensorFlow: they test
the launcher, not training).

Each worker records its PID (and its child's, with --spawn-child) in
``--pid-dir`` so the test can check that nothing survives the launcher, then
behaves as asked: exit with a code, ignore SIGTERM, or sleep until killed.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--pid-dir", required=True)
parser.add_argument("--fail-rank", type=int, default=None)
parser.add_argument("--exit-code", type=int, default=3, help="negative: die by that signal")
parser.add_argument("--fail-after", type=float, default=0.5)
parser.add_argument("--fail-only-first-attempt", action="store_true")
parser.add_argument("--ignore-sigterm-rank", type=int, default=None)
parser.add_argument("--spawn-child", action="store_true")
parser.add_argument("--sleep", type=float, default=600.0)
parser.add_argument("--daemon", action="store_true",
                    help="double-fork a setsid process that sleeps (outside the worker's process group)")
parser.add_argument("--long-line-mib", type=int, default=0,
                    help="write this many MiB of 'x' without a newline, in 1 MiB writes")
parser.add_argument("--progress", action="store_true", help="draw a \\r progress bar")
args = parser.parse_args()


def host_pid():
    # /proc is the machine's: inside the launcher's PID namespace os.getpid()
    # is the namespace's number, /proc/self names the process as the test sees it.
    return int(os.readlink("/proc/self"))


def host_children():
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids.extend(int(p) for p in f.read().split())
    return pids

rank = int(os.environ["DISTADAM_RANK"])
attempt = int(os.environ["DISTADAM_RESTART_COUNT"])

if rank == args.ignore_sigterm_rank:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def on_term(signum, frame):
        with open(os.path.join(args.pid_dir, f"{rank}.signal"), "w") as f:
            f.write(signal.Signals(signum).name)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

pids = [host_pid()]
if args.spawn_child:
    # A grandchild of the launcher: only a process-group kill reaches it.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    pids.extend(host_children())
if args.daemon:
    # The classic daemon: fork, setsid (a new session and process group, so
    # killpg of the worker's group misses it), fork again, parent exits.
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(write_end, str(host_pid()).encode())
            os.close(write_end)
            time.sleep(600)
            os._exit(0)
        os._exit(0)
    os.close(write_end)
    pids.append(int(os.read(read_end, 32)))
    os.wait()

with open(os.path.join(args.pid_dir, f"{rank}.{attempt}.pids.tmp"), "w") as f:
    f.write(" ".join(map(str, pids)))
os.replace(os.path.join(args.pid_dir, f"{rank}.{attempt}.pids.tmp"),
           os.path.join(args.pid_dir, f"{rank}.{attempt}.pids"))

print(f"hello from rank {rank} of {os.environ['DISTADAM_WORLD_SIZE']}", flush=True)
print(f"rank {rank} stderr line", file=sys.stderr, flush=True)
sys.stdout.write("first line\nsecond line without newline")
sys.stdout.flush()
if args.progress:
    sys.stdout.write("\n")
    for step in range(1, 4):
        sys.stdout.write(f"\r{step}/3 [{'=' * step}{' ' * (3 - step)}]")
        sys.stdout.flush()
    sys.stdout.write("\r\n")
    sys.stdout.flush()
if args.long_line_mib:
    block = b"x" * (1 << 20)
    for _ in range(args.long_line_mib):
        sys.stdout.buffer.write(block)
    sys.stdout.buffer.flush()

fails = rank == args.fail_rank and not (args.fail_only_first_attempt and attempt > 0)
if fails:
    # Fail only once every worker of this attempt is up and recorded, so the
    # test knows exactly which processes the launcher had to stop.
    world = int(os.environ["DISTADAM_WORLD_SIZE"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        os.path.exists(os.path.join(args.pid_dir, f"{r}.{attempt}.pids")) for r in range(world)
    ):
        time.sleep(0.05)
    time.sleep(args.fail_after)
    with open(os.path.join(args.pid_dir, f"{rank}.failed_at"), "w") as f:
        f.write(repr(time.time()))
    if args.exit_code < 0:
        os.kill(os.getpid(), -args.exit_code)  # die by that signal
    os._exit(args.exit_code)
if args.fail_only_first_attempt and attempt > 0:
    sys.exit(0)  # the restarted job succeeds
time.sleep(args.sleep)
