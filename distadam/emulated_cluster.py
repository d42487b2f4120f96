"""A cluster of several nodes on one machine, for ``distadam launch --nodes``.

    distadam launch --nproc 4 --nodes 2 --inter-node-rate 200mbit train.py

K emulated nodes, each a network namespace of its own with one interface,
``eth0``, addressed ``169.254.1.<k+1>/24`` (link-local: RFC 3927 addresses no
router forwards, and none of the machine's). Each node's ``eth0`` is one end
of a veth pair whose other end is a port of a bridge, the "switch", in the
launcher's own private network namespace (see :class:`distadam.launch.Sandbox`),
which has no address at all. Workers ``k*W .. k*W+W-1`` (W = nproc / K) run in
node k and share its address on different ports, so TensorFlow's gRPC between
two nodes crosses both nodes' links, and within a node it stays on the node's
own interface (the kernel loops it back, unshaped).

``--inter-node-rate`` shapes every link in both directions with a token
bucket (``tc qdisc ... tbf``) at that rate: a full-duplex NIC of that speed
per node, behind a non-blocking switch.

What it is: an emulation of the *bandwidth* between hosts, good for seeing
which collectives cross nodes and how many bytes they send there (hybrid
sharding keeping its reduce-scatter inside a node, say), trying a multi-host
``TF_CONFIG`` locally, and timing communication-bound steps at a chosen link
rate. What it is not: all workers share this machine's CPU cores and memory
(compute does not scale with the nodes), there is no added latency (``netem``
does not exist in every kernel, this project's CI machine's included; the
links have the microseconds of a veth pair), no packet loss, and the node's
"NIC" is not a PCIe device: the kernel copies the bytes on the shared CPU.

Containment, as in the default mode: every address lives in a namespace the
launcher created, no namespace has a default route (only the node's
connected /24), IPv6 address generation is off on every new interface, and
nothing listens in the machine's namespace. Nothing is named in the machine
(no ``ip netns``, which writes ``/run/netns``): the node namespaces are held
by file descriptors of the launcher and by the workers inside them, so they
disappear with the job, however it ends.

Needs root, ``ip`` and ``tc`` (iproute2) and the kernel's ``veth``,
``bridge`` and ``sch_tbf`` (loaded on first use); it refuses, saying which is
missing, otherwise.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys

#: At most this many emulated nodes (each a /24 address and a bridge port).
MAX_NODES = 64
#: Bounds of ``--inter-node-rate`` in bit/s: below 1 Mbit/s TensorFlow's
#: rendezvous crawls; above 100 Gbit/s tbf on a veth shapes nothing (the copy
#: on the CPU is slower).
MIN_RATE = 10**6
MAX_RATE = 100 * 10**9
SUBNET_PREFIX = "169.254.1."
PREFIX_LENGTH = 24
NODE_INTERFACE = "eth0"
SWITCH = "switch0"

_CLONE_NEWNET = 0x40000000
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)([a-z]{3,4})")

# A process that only holds a new network namespace until the launcher has
# opened it (then the launcher's descriptor holds it): unshare, say so, wait
# for stdin to close. PR_SET_PDEATHSIG: it never outlives the launcher.
_HOLDER = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.prctl(1, signal.SIGKILL)\n"
    f"if libc.unshare({_CLONE_NEWNET}) != 0:\n"
    "    sys.exit('unshare(CLONE_NEWNET): ' + os.strerror(ctypes.get_errno()))\n"
    "os.write(1, b'r')\n"
    "sys.stdin.buffer.read()\n"
)

# Runs a command inside the network namespace open on descriptor argv[1]
# (how `ip` configures a node without naming its namespace anywhere).
_IN_NAMESPACE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.setns(int(sys.argv[1]), {_CLONE_NEWNET}) != 0:\n"
    "    sys.exit('setns: ' + os.strerror(ctypes.get_errno()))\n"
    "os.close(int(sys.argv[1]))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class EmulatedClusterError(RuntimeError):
    """The emulated nodes cannot be made here; the message says why."""


def parse_rate(text: str) -> int:
    """``200mbit``, ``1.5gbit``, ``800kbit`` (tc's SI units, case-insensitive)
    to bit/s, bounded by :data:`MIN_RATE` and :data:`MAX_RATE`."""
    match = _RATE.fullmatch(text.strip().lower()) if len(text) <= 32 else None
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"expected a rate such as 200mbit or 1.5gbit (units: {', '.join(_UNITS)}), "
                         f"got {text[:40]!r}")
    bits = round(float(match.group(1)) * _UNITS[match.group(2)])
    if not MIN_RATE <= bits <= MAX_RATE:
        raise ValueError(f"{text.strip()} is outside {format_rate(MIN_RATE)} .. {format_rate(MAX_RATE)}")
    return bits


def format_rate(bits: int) -> str:
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits}bit"


def node_address(node: int) -> str:
    return f"{SUBNET_PREFIX}{node + 1}"


def node_of(rank: int, nproc: int, nodes: int) -> int:
    """Consecutive ranks share a node (so hybrid groups of W = nproc / nodes
    consecutive workers, distadam's shard groups, are the nodes)."""
    return rank // (nproc // nodes)


def token_bucket(bits: int) -> list:
    """tc arguments of a token bucket at ``bits``/s. The bucket holds 4 ms of
    traffic (at least 64 KiB, one TSO/GSO packet, so tbf does not have to
    re-segment most of them), the queue 20 ms: TCP sees a link of that rate,
    not a loss-heavy policer."""
    burst = max(64 * 1024, bits // 8 * 4 // 1000)
    return ["tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "20ms"]


def _tool(name: str) -> str:
    # Not root, /usr/sbin may be missing from PATH.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise EmulatedClusterError(f"--nodes needs {name!r} (iproute2), which is not installed")
    return found


class EmulatedCluster:
    """``nodes`` node namespaces joined by a bridge in the caller's network
    namespace (which must be the job's private one: the bridge and veth ends
    are created there). Build it before any worker exists; :meth:`close`
    drops the launcher's hold on the nodes."""

    def __init__(self, nodes: int, rate: int | None = None):
        if not 1 <= nodes <= MAX_NODES:
            raise EmulatedClusterError(f"{nodes} nodes is outside 1 .. {MAX_NODES}")
        if os.geteuid() != 0:
            # In the launcher's user namespace the caller keeps its own uid,
            # so `ip` and `tc` run without CAP_NET_ADMIN there (exec drops the
            # namespace's capabilities from a non-root uid).
            raise EmulatedClusterError("--nodes needs root: iproute2 makes the nodes' interfaces, and "
                                       "without root it has no CAP_NET_ADMIN in the job's namespace")
        self.nodes = nodes
        self.rate = rate
        self._ip, self._tc = _tool("ip"), _tool("tc")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.namespaces: list[int] = []  # one descriptor per node, held by the launcher
        try:
            self._run([self._ip, "link", "add", SWITCH, "type", "bridge"])
            self._run([self._ip, "link", "set", SWITCH, "addrgenmode", "none"])
            self._run([self._ip, "link", "set", SWITCH, "up"])
            for node in range(nodes):
                self._add_node(node)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------- set-up
    def _run(self, argv, namespace: int | None = None, stdin: str | None = None) -> None:
        if namespace is not None:
            argv = [sys.executable, "-c", _IN_NAMESPACE, str(namespace), *argv]
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30,
                                  pass_fds=() if namespace is None else (namespace,))
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EmulatedClusterError(f"{' '.join(argv[-6:])}: {error}") from error
        if done.returncode != 0:
            raise EmulatedClusterError(f"{' '.join(argv[-6:])} failed: {done.stderr.strip()[-500:]}")

    def _new_namespace(self) -> int:
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            if holder.stdout.read(1) != b"r":
                raise EmulatedClusterError("cannot make a node's network namespace: "
                                           + holder.stderr.read().decode(errors="replace").strip()[-300:])
            return os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            holder.kill()
            holder.wait()
            for stream in (holder.stdin, holder.stdout, holder.stderr):
                stream.close()

    def _add_node(self, node: int) -> None:
        namespace = self._new_namespace()
        self.namespaces.append(namespace)
        port = f"node{node}"
        # The veth's far end is born inside the node (named by descriptor).
        self._run([self._ip, "link", "add", port, "type", "veth", "peer", "name", NODE_INTERFACE,
                   "netns", f"/proc/{os.getpid()}/fd/{namespace}"])
        for args in (["addrgenmode", "none"], ["master", SWITCH], ["up"]):
            self._run([self._ip, "link", "set", port, *args])
        # Inside the node: lo, eth0 with the node's address, and no other
        # route than the connected subnet (no gateway is ever configured).
        self._run([self._ip, "-batch", "-"], namespace=namespace, stdin="\n".join([
            "link set lo up",
            f"link set {NODE_INTERFACE} addrgenmode none",
            f"addr add {node_address(node)}/{PREFIX_LENGTH} dev {NODE_INTERFACE}",
            f"link set {NODE_INTERFACE} up",
        ]) + "\n")
        if self.rate is not None:
            # Both directions: node -> switch on eth0, switch -> node on the port.
            self._run([self._tc, "qdisc", "add", "dev", port, "root", *token_bucket(self.rate)])
            self._run([self._tc, "qdisc", "add", "dev", NODE_INTERFACE, "root", *token_bucket(self.rate)],
                      namespace=namespace)

    # ------------------------------------------------------------ use
    def address(self, node: int) -> str:
        return node_address(node)

    def free_ports(self, node: int, count: int) -> list:
        """``count`` ports free on the node's address, chosen inside its
        namespace (setns moves only this thread, and it moves back)."""
        if self._libc.setns(self.namespaces[node], _CLONE_NEWNET) != 0:
            raise EmulatedClusterError(f"setns into node {node}: {os.strerror(ctypes.get_errno())}")
        sockets = []
        try:
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((self.address(node), 0))
            return [sock.getsockname()[1] for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
            if self._libc.setns(self._own, _CLONE_NEWNET) != 0:  # never leave the launcher in a node
                os._exit(70)

    def peers(self, nproc: int) -> list:
        """``host:port`` of every rank: the node's address, a port of its own."""
        per_node = nproc // self.nodes
        peers = []
        for node in range(self.nodes):
            peers.extend(f"{self.address(node)}:{port}" for port in self.free_ports(node, per_node))
        return peers

    def namespace_of(self, rank: int, nproc: int) -> int:
        return self.namespaces[node_of(rank, nproc, self.nodes)]

    def describe(self) -> str:
        rate = f"links shaped to {format_rate(self.rate)} each way" if self.rate else "unshaped links"
        return (f"{self.nodes} emulated node(s) at {node_address(0)}..{node_address(self.nodes - 1)}"
                f"/{PREFIX_LENGTH}, {rate}")

    def close(self) -> None:
        """Drop the launcher's descriptors: each node namespace ends with the
        last worker in it."""
        for fd in [*self.namespaces, self._own]:
            if fd >= 0:
                os.close(fd)
        self.namespaces, self._own = [], -1
