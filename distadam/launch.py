"""distadam launch: run one training script as N local worker processes.

    distadam launch --nproc 2 examples/train_digits.py --epochs 5
    distadam-launch --nproc 3 -m my_package.train        # the same command
    python -m distadam.launch --nproc 2 train.py          # and again

Each worker gets ``TF_CONFIG`` for a cluster of free ports on 127.0.0.1 (plus
``DISTADAM_RANK``/``DISTADAM_WORLD_SIZE``), so an unchanged script that calls
``distadam.strategy_from_env()`` trains with MultiWorkerMirroredStrategy.

Network. TensorFlow's gRPC server always listens on every interface
(``grpc_server_lib.cc`` binds ``0.0.0.0``/``[::]``; neither ``ServerDef`` nor
``TF_CONFIG`` has a bind address) and its protocol is unauthenticated: whoever
reaches a worker's port can run any op in it. So by default (``--network
private``) the launcher moves itself, and with it every worker, into a new
network namespace whose only interface is loopback (Linux ``unshare``: as
root directly, otherwise inside a user namespace). Nothing outside the job can
reach the workers, and the workers reach nothing outside it. Where that is
impossible the launcher refuses; ``--network host`` runs the workers in the
machine's network instead, with a warning.

Emulated nodes. ``--nodes K`` splits the job over K emulated hosts on this
machine (:mod:`distadam.emulated_cluster`): each node is a network namespace
of its own with one address, ``169.254.1.<k+1>`` (link-local; no default
route), its W = N / K consecutive ranks share it on different ports, and
``TF_CONFIG`` names each worker by its node's address, so TensorFlow's gRPC
between nodes crosses veth links to a bridge in the launcher's private
namespace, and within a node stays on the node's own interface.
``--inter-node-rate 200mbit`` shapes every link, both ways, with ``tc tbf``
(measured: 200mbit carries ~191 Mbit/s of TCP payload). The workers get
``DISTADAM_WORKERS_PER_NODE=W``. It emulates bandwidth only: no added latency
(no ``netem`` in this kernel), and every node shares this machine's CPU and
memory. Needs root and iproute2's ``ip`` and ``tc``; it refuses otherwise.

    distadam launch --nproc 4 --nodes 2 --inter-node-rate 200mbit train.py

Processes. Guarantees, because a stuck or orphaned process is the worst
outcome on a shared machine:

* every output line is prefixed with ``[rank k]``; lines longer than
  ``MAX_LINE_BYTES`` are split, and ``\r``-updated progress bars keep their
  prefix on every update;
* SIGINT/SIGTERM are forwarded to every worker's process group;
* the first worker to fail stops the others and the launcher exits non-zero,
  naming the rank and its exit code; ``--timeout`` bounds the whole job;
* every descendant dies on every exit path, including processes that left the
  worker's process group (``setsid``, double fork) and including ``kill -9``
  of the launcher: the workers run in a private PID namespace whose init
  process dies with the launcher, and the kernel kills everything in a PID
  namespace whose init dies. With ``--network host`` the launcher is a child
  subreaper instead (orphans become its children and are killed on every
  exit path it survives); after ``kill -9`` of the launcher itself only the
  workers die (``PR_SET_PDEATHSIG``), not processes they detached.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import math
import os
import queue
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from distadam import emulated_cluster
from distadam.cluster import CONFINEMENT_ENV, LOGICAL_DEVICES_ENV, network_interfaces, tf_config_for

# distadam.topology's name (not imported: it loads NumPy, the launcher must not).
WORKERS_PER_NODE_ENV = "DISTADAM_WORKERS_PER_NODE"
EXIT_TIMEOUT = 124  # what coreutils' timeout(1) uses
EXIT_USAGE = 2
PROG = "distadam-launch"  # also the prefix of the launcher's own messages

# Upper bounds for the numeric flags: beyond them a typo (--nproc 10000)
# would start thousands of TensorFlow interpreters (~0.5 GB each) until file
# descriptors or memory run out, or hang for ever (--grace-period 1e300).
MAX_NPROC = 256
MAX_DEVICES_PER_WORKER = 64
MAX_RESTARTS = 100
MAX_GRACE_PERIOD = 3600.0
# Seconds between SIGTERM and SIGKILL when --grace-period is not given. After
# SIGINT/SIGTERM to the launcher (a preemption, a scheduler stopping the job)
# the workers may be saving (distadam.preemption saves the current step and
# exits 42): they get what the Kubernetes manifests give a pod
# (terminationGracePeriodSeconds: 60). After a worker failed, or the
# --timeout, the others cannot save without it (a save is collective), so
# they are stopped sooner.
DEFAULT_SIGNAL_GRACE = 60.0
DEFAULT_FAILURE_GRACE = 5.0
# Output is relayed in pieces of at most this many bytes per line: a worker
# printing 400 MiB without a newline must not make the launcher hold it.
MAX_LINE_BYTES = 64 * 1024

# Variables through which an enclosing launcher (mpirun, srun, a Kubernetes
# Job) would describe *its* job. The local job replaces them, otherwise
# distadam.cluster would see two disagreeing descriptions.
_INHERITED_CLUSTER_VARS = (
    "TF_CONFIG", "JOB_COMPLETION_INDEX", "SLURM_PROCID", "SLURM_LOCALID",
    "PMI_RANK", "PMI_SIZE", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE",
    "DISTADAM_WORKERS_PER_NODE",
)
_INHERITED_CLUSTER_PREFIXES = ("OMPI_COMM_WORLD_",)

# Runs in the forked worker before exec: ask the kernel to SIGKILL it when the
# launcher dies (the setting survives exec), then become the real command.
# A separate tiny interpreter instead of Popen(preexec_fn=...), which is unsafe
# once the launcher's output threads are running. The parent is read from
# /proc/self/stat, not getppid(): inside the job's PID namespace getppid()
# is 0 because the launcher lives outside it; /proc (the machine's) shows it.
# argv[2]: a descriptor of the emulated node's network namespace to enter
# (--nodes), or -1.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "with open('/proc/self/stat') as f:\n"
    "    parent = int(f.read().rsplit(')', 1)[1].split()[1])\n"
    "if parent != int(sys.argv[1]):\n"
    "    sys.exit(70)  # the launcher died before prctl took effect\n"
    "netns = int(sys.argv[2])\n"
    "if netns >= 0:\n"
    "    if libc.setns(netns, 0x40000000) != 0:  # CLONE_NEWNET\n"
    "        sys.exit('distadam-launch: cannot enter the node: ' + os.strerror(ctypes.get_errno()))\n"
    "    os.close(netns)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)

# pid 1 of the job's PID namespace. While it lives the namespace accepts new
# processes; when it dies (the launcher killed it, or PR_SET_PDEATHSIG because
# the launcher died) the kernel SIGKILLs every process in the namespace. It
# reaps the orphans the namespace hands it, and on SIGUSR1 kills every other
# process in the namespace (kill(-1) from pid 1 reaches exactly those) and
# answers one byte once its own children are reaped: how the launcher clears
# the namespace between restarts.
_NAMESPACE_INIT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "with open('/proc/self/stat') as f:\n"
    "    if int(f.read().rsplit(')', 1)[1].split()[1]) != int(sys.argv[1]):\n"
    "        sys.exit(70)\n"
    "wanted = {signal.SIGUSR1, signal.SIGCHLD}\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, wanted)\n"
    "def reap(block):\n"
    "    while True:\n"
    "        try:\n"
    "            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)\n"
    "        except ChildProcessError:\n"
    "            return\n"
    "        if pid == 0:\n"
    "            return\n"
    "os.write(1, b'r')\n"
    "while True:\n"
    "    if signal.sigwait(wanted) == signal.SIGUSR1:\n"
    "        for _ in range(2):  # a second sweep for anything forked during the first\n"
    "            try:\n"
    "                os.kill(-1, signal.SIGKILL)\n"
    "            except ProcessLookupError:\n"
    "                pass\n"
    "            reap(block=True)\n"
    "        os.write(1, b'k')\n"
    "    else:\n"
    "        reap(block=False)\n"
)


# ----------------------------------------------------------------- arguments
_UINT = re.compile(r"[0-9]+")
_UFLOAT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


def _count(text: str) -> int:
    """ASCII digits only: int() also takes '1_0', ' 7' and non-ASCII digits."""
    if not _UINT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a whole number in ASCII digits, got {text!r}")
    if len(text) > 12:
        raise argparse.ArgumentTypeError(f"{text[:20]}... is out of range")
    return int(text)


def _rate(text: str) -> int:
    try:
        return emulated_cluster.parse_rate(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds ('nan', 'inf', '-1' rejected)."""
    if not _UFLOAT.fullmatch(text) or not math.isfinite(float(text)):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return float(text)


def parse_args(argv=None, prog: str = PROG):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a training script as N local worker processes (MultiWorkerMirroredStrategy).",
    )
    parser.add_argument("--nproc", type=_count, default=2,
                        help=f"number of worker processes (default 2, at most {MAX_NPROC})")
    parser.add_argument("--devices-per-worker", type=_count, default=1,
                        help="logical CPU devices per worker (sets DISTADAM_LOGICAL_DEVICES); "
                             "only useful with --nproc 1, since MultiWorkerMirroredStrategy "
                             f"drives one CPU device per worker (at most {MAX_DEVICES_PER_WORKER})")
    parser.add_argument("--timeout", type=_seconds, default=None,
                        help="seconds for the whole job, restarts included; then kill all and exit 124")
    parser.add_argument("--restarts", type=_count, default=0,
                        help=f"re-run the whole job up to this many times after a worker fails "
                             f"(at most {MAX_RESTARTS})")
    parser.add_argument("--grace-period", type=_seconds, default=None,
                        help=f"seconds between SIGTERM and SIGKILL when stopping workers, at most "
                             f"{MAX_GRACE_PERIOD:g}. Default: {DEFAULT_SIGNAL_GRACE:g} after SIGINT/SIGTERM "
                             "to the launcher, time for a preemption save (distadam.preemption; make it "
                             "cover check_every steps plus one save of your model; a second Ctrl-C kills "
                             f"at once), {DEFAULT_FAILURE_GRACE:g} after a worker failed or --timeout "
                             "(the others cannot save without it)")
    parser.add_argument("--network", choices=("private", "host"), default="private",
                        help="private (default): the workers share a new network namespace with "
                             "only loopback, so their unauthenticated TensorFlow servers are "
                             "unreachable from outside the job; host: the machine's network, where "
                             "those servers listen on every interface")
    parser.add_argument("--nodes", type=_count, default=None,
                        help="emulate this many hosts on this machine: each a private network "
                             "namespace with its own link-local address (169.254.1.<k+1>) joined to "
                             "the others through a switch; --nproc / --nodes consecutive ranks per "
                             "node, named in TF_CONFIG by their node's address. Bandwidth only (no "
                             f"added latency; the CPU is shared). At most {emulated_cluster.MAX_NODES}; "
                             "needs root and iproute2 (ip, tc)")
    parser.add_argument("--inter-node-rate", type=_rate, default=None, metavar="RATE",
                        help="with --nodes: shape every node's link, both directions, to RATE with "
                             "tc tbf, e.g. 200mbit, 1.5gbit (units bit, kbit, mbit, gbit; between "
                             f"{emulated_cluster.format_rate(emulated_cluster.MIN_RATE)} and "
                             f"{emulated_cluster.format_rate(emulated_cluster.MAX_RATE)}; default: unshaped)")
    parser.add_argument("--no-python", action="store_true",
                        help="run the command as an executable instead of with this Python")
    parser.add_argument("-m", dest="module", action="store_true",
                        help="treat the command as a Python module, as in python -m")
    parser.add_argument("command", help="training script (or module with -m, executable with --no-python)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the training script")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.nproc > MAX_NPROC:
        parser.error(f"--nproc {args.nproc} is more than {MAX_NPROC} local worker processes "
                     "(each one a TensorFlow process of ~0.5 GB); use a cluster launcher for more")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # Two pipes per worker stay open in the launcher, plus headroom for the
    # interpreter, the port probes (one socket per worker) and the namespace.
    if nofile != resource.RLIM_INFINITY and 3 * args.nproc + 64 > nofile:
        parser.error(f"--nproc {args.nproc} needs about {3 * args.nproc + 64} file descriptors, "
                     f"but the limit (ulimit -n) is {nofile}")
    if args.devices_per_worker < 1:
        parser.error("--devices-per-worker must be at least 1")
    if args.devices_per_worker > MAX_DEVICES_PER_WORKER:
        parser.error(f"--devices-per-worker {args.devices_per_worker} is more than "
                     f"{MAX_DEVICES_PER_WORKER} logical devices (they only split the same CPU cores "
                     "further)")
    if args.nproc > 1 and args.devices_per_worker > 1:
        parser.error(
            "--devices-per-worker > 1 needs --nproc 1: TensorFlow's MultiWorkerMirroredStrategy "
            "uses one CPU device per worker (run more workers instead)"
        )
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.restarts > MAX_RESTARTS:
        parser.error(f"--restarts {args.restarts} is more than {MAX_RESTARTS}")
    if args.grace_period is not None and args.grace_period > MAX_GRACE_PERIOD:
        parser.error(f"--grace-period {args.grace_period:g} is more than {MAX_GRACE_PERIOD:g} seconds")
    if args.nodes is not None:
        if not 1 <= args.nodes <= emulated_cluster.MAX_NODES:
            parser.error(f"--nodes must be between 1 and {emulated_cluster.MAX_NODES}")
        if args.nproc % args.nodes:
            parser.error(f"--nodes {args.nodes} must divide --nproc {args.nproc} (every node runs "
                         "as many workers)")
        if args.network == "host":
            parser.error("--nodes needs the private network (the emulated nodes are namespaces "
                         "inside it), not --network host")
    elif args.inter_node_rate is not None:
        parser.error("--inter-node-rate needs --nodes")
    if args.module and args.no_python:
        parser.error("-m and --no-python exclude each other")
    # Caught here, one clear line, rather than N identical worker tracebacks.
    if args.no_python and shutil.which(args.command) is None:
        parser.error(f"--no-python: {args.command!r} is not an executable on PATH")
    if not args.module and not args.no_python and not os.path.isfile(args.command):
        parser.error(f"no such script: {args.command!r} (use -m for a module)")
    return args


def grace_period(args, signalled: bool) -> float:
    """Seconds from SIGTERM to SIGKILL: ``--grace-period``, else the default
    for why the workers are stopped (``signalled``: the launcher got
    SIGINT/SIGTERM, so the workers may be saving)."""
    if args.grace_period is not None:
        return args.grace_period
    return DEFAULT_SIGNAL_GRACE if signalled else DEFAULT_FAILURE_GRACE


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


def worker_environments(nproc: int, devices_per_worker: int, restart: int, base=None, nodes=None) -> list:
    """The environment of each worker of one local job; ``nodes``: an
    :class:`~distadam.emulated_cluster.EmulatedCluster` the job spans."""
    base = dict(os.environ if base is None else base)
    for name in list(base):
        if name in _INHERITED_CLUSTER_VARS or name.startswith(_INHERITED_CLUSTER_PREFIXES):
            del base[name]
    base["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixer as they are printed
    # Always set, so a script's own default (train_digits.py's --replicas)
    # never overrides what the launcher was asked for.
    base[LOGICAL_DEVICES_ENV] = str(devices_per_worker)
    if nodes is not None:
        peers = nodes.peers(nproc) if nproc > 1 else []
        base[WORKERS_PER_NODE_ENV] = str(nproc // nodes.nodes)
        # The servers listen in the job's namespaces (strategy_from_env
        # cannot tell: a node has an interface besides lo).
        base[CONFINEMENT_ENV] = "distadam launch --nodes (the job's private network namespaces)"
    else:
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


# ------------------------------------------------------------------ sandbox
class SandboxError(RuntimeError):
    """The private namespaces cannot be created here; the message says why."""


_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_CHILD_SUBREAPER = 36
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _bring_up_loopback() -> None:
    # A new network namespace starts with `lo` down; ioctl(SIOCSIFFLAGS) is
    # what `ip link set lo up` does, without needing iproute2.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


class Sandbox:
    """The job's private network namespace (unless ``private_network`` is
    false) and PID namespace around every worker.

    Two steps, because of two kernel rules. ``__init__`` unshares the network
    namespace (inside a new user namespace mapping only the caller's own uid
    and gid, when not root: the kernel allows that only to a single-threaded
    process) and so moves the *launcher* itself into it; the workers inherit
    it. :meth:`start_pid_namespace` then unshares the PID namespace the
    launcher's next children are born in and starts its init, before any
    worker; after it the launcher can start no thread.
    """

    def __init__(self, private_network: bool):
        if not sys.platform.startswith("linux"):
            raise SandboxError(f"private namespaces need Linux (this is {sys.platform})")
        flags = _CLONE_NEWNET if private_network else 0
        uid, gid = os.geteuid(), os.getegid()
        if uid != 0:
            flags |= _CLONE_NEWUSER
            # The kernel refuses a new user namespace to a multi-threaded process.
            if threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 1:
                raise SandboxError("the launcher already runs several threads")
        if flags:
            self._unshare(flags)
        try:
            if flags & _CLONE_NEWUSER:
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as file:
                        file.write(text)
            if private_network:
                _bring_up_loopback()
                others = [name for name in network_interfaces() if name != "lo"]
                if others:
                    raise SandboxError(f"the new network namespace has interfaces {others} besides lo")
        except OSError as error:
            raise SandboxError(f"setting up the namespaces failed: {error}") from error
        self.private_network = private_network
        self.init = None

    @staticmethod
    def _unshare(flags: int) -> None:
        if _libc().unshare(flags) != 0:
            code = ctypes.get_errno()
            hint = ("user namespaces may be disabled (sysctl user.max_user_namespaces, "
                    "kernel.unprivileged_userns_clone, AppArmor), or a container forbids unshare"
                    if code in (errno.EPERM, errno.ENOSPC, errno.EINVAL) else "")
            raise SandboxError(f"unshare() failed: {os.strerror(code)}" + (f"; {hint}" if hint else ""))

    def start_pid_namespace(self) -> None:
        """Make the launcher's next children the first processes of a new PID
        namespace and start its init. After this the launcher can start no
        thread (the kernel keeps a process's threads in one PID namespace):
        the output relay threads must exist before."""
        self._unshare(_CLONE_NEWPID)
        self.init = subprocess.Popen(
            [sys.executable, "-c", _NAMESPACE_INIT, str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        if os.read(self.init.stdout.fileno(), 1) != b"r":
            raise SandboxError("the namespace's init process did not start")

    def clear(self, timeout: float = 10.0) -> bool:
        """Kill every process in the namespace except init; True once done."""
        if self.init is None or self.init.poll() is not None:
            return True  # init is gone, and so is everything else in the namespace
        self.init.send_signal(signal.SIGUSR1)
        end = time.monotonic() + timeout
        fd = self.init.stdout.fileno()
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            if ready:
                return os.read(fd, 1) == b"k"
        return False

    def close(self) -> None:
        """Kill init, and so, by the kernel, every process in the namespace."""
        if self.init is None:
            return
        if self.init.poll() is None:
            self.init.kill()
        self.init.wait()
        self.init.stdout.close()


def exec_in_private_network(command: list, prog: str = PROG) -> int:
    """Become ``command`` inside a new network namespace whose only interface
    is loopback: the namespace :class:`Sandbox` makes for ``distadam launch``'s
    workers, for a launcher that starts its ranks itself (``mpirun`` in
    ``launch/mpirun_local.sh``): it and every process it starts inherit the
    namespace, so TensorFlow's servers, which bind every interface, are
    reachable only from inside the job. Unlike ``distadam launch`` there is no
    PID namespace: the command reaps and stops its own processes.

    Does not return on success; prints why and returns 2 where no such
    namespace can be made (call it from a fresh, single-threaded process)."""
    if not command:
        print(f"{prog}: error: no command to run in the private network", file=sys.stderr)
        return EXIT_USAGE
    try:
        Sandbox(private_network=True)
    except SandboxError as error:
        print(f"{prog}: error: cannot make a private network namespace ({error})", file=sys.stderr)
        return EXIT_USAGE
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"{prog}: error: cannot run {command[0]!r}: {error}", file=sys.stderr)
        return 127
    return 127  # not reached: execvp returns only by raising


class Subreaper:
    """Fallback containment (``--network host``): the launcher becomes a child
    subreaper, so a process that detaches from a worker (``setsid``, double
    fork) is re-parented to the launcher instead of to init, and is killed
    with the launcher's other children on every exit path it survives."""

    def __init__(self):
        self.active = False
        if sys.platform.startswith("linux"):
            self.active = _libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0

    @staticmethod
    def children() -> list:
        pids = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as file:
                    pids.extend(int(pid) for pid in file.read().split())
            except FileNotFoundError:
                continue
        return pids

    def kill_adopted(self, workers, rounds: int = 50) -> None:
        """SIGKILL and reap every child that is not a worker's own process
        (those are waited for through their Popen), until none is left."""
        if not self.active:
            return
        own = {worker.pid for worker in workers}
        for _ in range(rounds):
            adopted = [pid for pid in self.children() if pid not in own]
            if not adopted:
                return
            for pid in adopted:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            for pid in adopted:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


# ------------------------------------------------------------------- workers
class RelayPool:
    """Two output-relay threads per worker rank, started once for all
    attempts: once the launcher has entered the job's PID namespace it cannot
    start threads any more (see :meth:`Sandbox.start_pid_namespace`)."""

    def __init__(self, nproc: int):
        self.queues = [queue.SimpleQueue() for _ in range(2 * nproc)]
        for slot in self.queues:
            threading.Thread(target=self._serve, args=(slot,), daemon=True).start()

    @staticmethod
    def _serve(slot) -> None:
        while True:
            stream, sink, rank, lock, done = slot.get()
            try:
                _relay(stream, sink, rank, lock)
            finally:
                done.set()

    def relay(self, rank: int, stream_index: int, stream, sink, lock) -> threading.Event:
        done = threading.Event()
        self.queues[2 * rank + stream_index].put((stream, sink, rank, lock, done))
        return done


class Worker:
    """One worker process, in its own process group, with prefixed output."""

    def __init__(self, rank: int, command: list, env: dict, output_lock: threading.Lock, relays: RelayPool,
                 netns: int | None = None):
        self.rank = rank
        if sys.platform.startswith("linux"):
            netns_arg = str(-1 if netns is None else netns)
            command = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), netns_arg, *command]
        self.process = subprocess.Popen(
            command,
            env=env,
            pass_fds=() if netns is None else (netns,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: signals reach its children too
        )
        self._relayed = [
            relays.relay(rank, 0, self.process.stdout, sys.stdout, output_lock),
            relays.relay(rank, 1, self.process.stderr, sys.stderr, output_lock),
        ]

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
        for done in self._relayed:
            done.wait(timeout)


def split_output(buffer: bytearray, final: bool = False) -> list:
    """Take the complete pieces off the front of ``buffer``.

    A piece ends with ``\n`` (``\r\n`` counts as one) or ``\r`` (a progress
    bar redrawing its line; it keeps its ``\r`` so a terminal still redraws in
    place, now with the rank prefix on every update). A run of more than
    ``MAX_LINE_BYTES`` without either is cut there (at a UTF-8 character
    boundary) and ends with ``\n``. ``final``: the stream ended, so the rest
    is a last piece. Returns ``(text, terminator)`` pairs.
    """
    pieces = []
    while buffer:
        newline, carriage = buffer.find(b"\n"), buffer.find(b"\r")
        ends = [i for i in (newline, carriage) if i >= 0]
        end = min(ends) if ends else -1
        if end >= 0 and end < MAX_LINE_BYTES:
            if buffer[end:end + 1] == b"\r":
                if end + 1 == len(buffer) and not final:
                    break  # a "\r\n" may be split across reads
                if buffer[end + 1:end + 2] == b"\n":
                    pieces.append((bytes(buffer[:end]), "\n"))
                    del buffer[:end + 2]
                    continue
                if end > 0:  # "\r" at the start of a redraw carries no text
                    pieces.append((bytes(buffer[:end]), "\r"))
                del buffer[:end + 1]
                continue
            pieces.append((bytes(buffer[:end]), "\n"))
            del buffer[:end + 1]
            continue
        if len(buffer) > MAX_LINE_BYTES:
            cut = MAX_LINE_BYTES
            # Back up over UTF-8 continuation bytes (10xxxxxx): never split a character.
            while cut > MAX_LINE_BYTES - 4 and (buffer[cut] & 0xC0) == 0x80:
                cut -= 1
            pieces.append((bytes(buffer[:cut]), "\n"))
            del buffer[:cut]
            continue
        if final:
            pieces.append((bytes(buffer), "\n"))  # complete the unterminated last line
            buffer.clear()
        break
    return pieces


def _relay(stream, sink, rank: int, lock: threading.Lock) -> None:
    prefix = f"[rank {rank}] "
    sink_open = True
    buffer = bytearray()
    fd = stream.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if sink_open:
            try:
                buffer += chunk
                pieces = split_output(buffer, final=not chunk)
                if pieces:
                    text = "".join(prefix + raw.decode("utf-8", errors="replace") + end for raw, end in pieces)
                    with lock:
                        sink.write(text)
                        sink.flush()
            except (BrokenPipeError, ValueError):  # e.g. `distadam launch ... | head`
                sink_open = False
            except Exception as error:  # never stop draining: a worker blocked on a full pipe hangs the job
                sink_open = False
                print(f"[{PROG}] output of rank {rank} is no longer relayed: {error!r}", file=sys.stderr)
        if not chunk:
            break
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
    def __init__(self, args, sandbox: Sandbox | None = None, subreaper: Subreaper | None = None,
                 nodes: emulated_cluster.EmulatedCluster | None = None):
        self.args = args
        self.sandbox = sandbox
        self.subreaper = subreaper
        self.nodes = nodes
        self.command = worker_command(args)
        self.output_lock = threading.Lock()
        self.workers: list[Worker] = []
        self.relays = RelayPool(args.nproc)
        if sandbox is not None:
            sandbox.start_pid_namespace()
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
        envs = worker_environments(self.args.nproc, self.args.devices_per_worker, attempt, nodes=self.nodes)
        self.workers = []
        for rank, env in enumerate(envs):
            netns = None if self.nodes is None else self.nodes.namespace_of(rank, self.args.nproc)
            self.workers.append(Worker(rank, self.command, env, self.output_lock, self.relays, netns=netns))
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
                    # Whatever the workers left running dies now, and only
                    # then can their output pipes (which it may hold) close.
                    self._kill_all()
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
        seconds = grace_period(self.args, signalled=True)
        self.say(f"received {name}: forwarded to all workers; waiting up to "
                 f"{seconds:g}s for them to exit (send it again to kill them now)")
        self._wait_for_exit(seconds)
        self._kill_all()
        return 128 + self.received_signal

    def _stop_all(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.signal_group(signal.SIGTERM)
        self._wait_for_exit(grace_period(self.args, signalled=False))
        self._kill_all()

    def _wait_for_exit(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and any(w.poll() is None for w in self.workers):
            time.sleep(0.05)

    def _kill_all(self) -> None:
        for worker in self.workers:
            worker.signal_group(signal.SIGKILL)
        # Then what left the workers' process groups (setsid, double fork).
        if self.sandbox is not None:
            if not self.sandbox.clear():
                self.say("could not confirm that every process of the job's namespace died")
        elif self.subreaper is not None:
            self.subreaper.kill_adopted(self.workers)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.say(f"rank {worker.rank} (pid {worker.pid}) did not die after SIGKILL")
        self._finish_output()

    def _finish_output(self) -> None:
        for worker in self.workers:
            worker.finish_output()


def _warn(message: str) -> None:
    print(f"[{PROG}] WARNING: {message}", file=sys.stderr, flush=True)


def main(argv=None, prog: str = PROG) -> int:
    args = parse_args(argv, prog=prog)
    sandbox = subreaper = None
    if args.network == "private":
        try:
            sandbox = Sandbox(private_network=True)
        except SandboxError as error:
            print(f"{prog}: error: cannot give the workers a private network ({error}). Their "
                  "TensorFlow gRPC servers would listen, unauthenticated, on every interface of "
                  "this machine. To run anyway, pass --network host and make sure nothing "
                  "untrusted can reach this machine's ports.", file=sys.stderr)
            return EXIT_USAGE
    else:
        if args.nproc > 1:
            _warn("--network host: the workers' TensorFlow gRPC servers listen on EVERY interface "
                  "of this machine, and anyone who can reach their ports can run code as you. "
                  "Use it only on a machine no untrusted host can reach.")
        subreaper = Subreaper()
        if not subreaper.active:
            _warn("no child subreaper on this platform: processes the workers detach (setsid) "
                  "may outlive the job")
    nodes = None
    if args.nodes is not None:
        # In the launcher's private namespace, before any thread or worker.
        try:
            nodes = emulated_cluster.EmulatedCluster(args.nodes, args.inter_node_rate)
        except emulated_cluster.EmulatedClusterError as error:
            print(f"{prog}: error: cannot emulate {args.nodes} node(s): {error}", file=sys.stderr)
            return EXIT_USAGE
    try:
        launcher = Launcher(args, sandbox=sandbox, subreaper=subreaper, nodes=nodes)
        if nodes is not None:
            launcher.say(nodes.describe())
        code = launcher.run()
    except SandboxError as error:
        print(f"{prog}: error: cannot start the job's PID namespace: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if sandbox is not None:
            sandbox.close()
        if nodes is not None:
            nodes.close()
    if code not in (0, EXIT_TIMEOUT) and launcher.received_signal is None:
        launcher.say(f"job failed (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
