"""`distadam launch --nodes`: a cluster of emulated nodes on one machine
(distadam.emulated_cluster).

* ShardedAdam on 2 nodes x 2 workers, in groups of G=2 (one group per node)
  and G=4 (across the shaped link), equals single-device Keras Adam; the same
  job is checked from outside while its servers listen: every address lives
  in a namespace the launcher made, no namespace has a route out, nothing of
  the job listens in the machine's namespace, and the steps' traffic crossed
  the nodes' links.
* Nothing survives a SIGKILLed launcher with emulated nodes.
* The pure parts: rates, arguments, TF_CONFIG on the nodes' addresses.

The only traffic the tests send stays in namespaces the launcher creates
(link-local addresses, no default route); the machine's own addresses are
never contacted.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import reference
from conftest import ROOT, WORKERS, kill_group, start_process, wait_for, worker_env
from distadam import emulated_cluster, launch
from distadam.cluster import resolve_cluster
from distadam.topology import WORKERS_PER_NODE_ENV
from test_multiworker import SCHEDULE, check_case
from test_launch import socket_inodes, wait_for_files

PROBE = WORKERS / "launch_probe.py"
RTF_REJECT = 0x0200  # the kernel's own "unreachable" IPv6 default (ip6_null_entry)

# One job, both group sizes (several ShardedAdam under one strategy): G = 2
# as shard_group_size="auto" resolves it from the 2 workers per node the
# launcher announces, and G = 4 (all workers). The clipping threshold clips
# some of the 15 updates and not others; the same reference arguments, so one
# Keras Adam reference serves both.
STEPS = 15
CASES = [
    {"name": f"emulated_2x2_groups_of_{group}_global_clipnorm_schedule", "build": "lazy",
     "kwargs": {"shard_group_size": given, "global_clipnorm": 0.6, "fused_update": False},
     "expected_group_size": group, "schedule": SCHEDULE, "steps": STEPS}
    for group, given in ((2, "auto"), (4, 4))
]


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("emulated nodes need root here (veth pairs and a bridge)")


# ------------------------------------------------------------- /proc reading
def namespace(pid="self"):
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def listening_inodes(pid="self"):
    """Inodes of the TCP sockets in LISTEN state in ``pid``'s network namespace."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if path.exists():
            found |= {line.split()[9] for line in path.read_text().splitlines()[1:] if line.split()[3] == "0A"}
    return found


def local_ipv4(pid="self"):
    """The IPv4 addresses of ``pid``'s namespace (the /32 LOCAL leaves of its FIB)."""
    addresses, last = set(), None
    for line in Path(f"/proc/{pid}/net/fib_trie").read_text().splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text == "/32 host LOCAL":
            addresses.add(last)
    return addresses


def local_ipv6(pid="self"):
    path = Path(f"/proc/{pid}/net/if_inet6")
    return {line.split()[0] for line in path.read_text().splitlines()} if path.exists() else set()


def routes_out(pid):
    """IPv4 routes with a gateway or to 0.0.0.0/0, and IPv6 default routes
    that are not the kernel's reject entry: any way out of the namespace."""
    out = []
    for line in Path(f"/proc/{pid}/net/route").read_text().splitlines()[1:]:
        iface, destination, gateway, _, _, _, _, mask = line.split()[:8]
        if destination == "00000000" or gateway != "00000000" or mask == "00000000":
            out.append(line)
    path = Path(f"/proc/{pid}/net/ipv6_route")
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = line.split()
        if fields[1] == "00" and not int(fields[8], 16) & RTF_REJECT:
            out.append(line)
    return out


def interfaces(pid):
    return sorted(launch.network_interfaces(pid))


# ------------------------------------------------------------- the 2x2 job
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_of_two_workers_match_single_device_adam_and_stay_inside(tmp_path):
    needs_root()
    references = start_process([sys.executable, WORKERS / "reference.py", json.dumps(CASES), tmp_path])
    job = start_process([sys.executable, "-m", "distadam.launch", "--nproc", "4", "--nodes", "2",
                         "--inter-node-rate", "200mbit", "--timeout", "300", "--grace-period", "1",
                         WORKERS / "emulated_cases.py", json.dumps(CASES), tmp_path],
                        env=worker_env(PYTHONPATH=f"{WORKERS}:{ROOT}"))
    try:
        wait_for_files(tmp_path, "*.ready", 4, timeout=240, proc=job)
        ready = [json.loads((tmp_path / f"{rank}.ready").read_text()) for rank in range(4)]
        check_network_from_outside(job.pid, ready)
        (tmp_path / "go").write_text("")
        out, _ = wait_for(job, 330)
        assert job.returncode == 0, out[-6000:]
        assert "2 emulated node(s) at 169.254.1.1..169.254.1.2/24, links shaped to 200mbit each way" in out
        assert "ExposedServerWarning" not in out
        out, _ = wait_for(references, 120)
        assert references.returncode == 0, out[-3000:]
    finally:
        kill_group(job)
        kill_group(references)

    for index, case in enumerate(CASES):
        results = [np.load(tmp_path / f"rank{r}-{index}.npz") for r in range(4)]
        check_case(case, results, reference.load(tmp_path / f"ref-{index}.npz"), 4)
    # The steps' collectives crossed the links: every node sent and received
    # over its eth0 (and nothing else carries bytes between the namespaces).
    for rank in (0, 2):
        before, after = ready[rank]["link_before"], json.loads((tmp_path / f"{rank}.link").read_text())
        assert after["tx_bytes"] - before["tx_bytes"] > 10_000, (rank, before, after)
        assert after["rx_bytes"] - before["rx_bytes"] > 10_000, (rank, before, after)


def check_network_from_outside(launcher_pid, ready):
    host = namespace()
    switch = namespace(launcher_pid)
    nodes = [namespace(worker["pid"]) for worker in ready]
    # Ranks 0, 1 on node 0; 2, 3 on node 1: one namespace per node, named in
    # TF_CONFIG by the node's address, none of them the machine's or the switch's.
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], nodes
    assert host not in nodes and switch not in nodes and switch != host
    assert [worker["host"] for worker in ready] == ["169.254.1.1", "169.254.1.1", "169.254.1.2", "169.254.1.2"]
    assert all(worker["workers_per_node"] == 2 for worker in ready)

    for rank, worker in enumerate(ready):
        pid = worker["pid"]
        # Addresses: loopback and the node's own link-local one, nothing else.
        assert interfaces(pid) == ["eth0", "lo"]
        assert local_ipv4(pid) == {"127.0.0.1", worker["host"]}
        assert local_ipv6(pid) == {"0" * 31 + "1"}, "an IPv6 address besides ::1"
        assert not routes_out(pid), f"rank {rank}: a route out of the node: {routes_out(pid)}"
        # Its server listens, in its node; not in the machine's namespace.
        own = socket_inodes(pid)
        assert own & listening_inodes(pid), f"rank {rank} listens nowhere in its node"
        assert not own & listening_inodes(), f"rank {rank} listens in the machine's namespace"
    # The switch (the launcher's namespace): a bridge, one port per node, and
    # no address or route at all.
    assert interfaces(launcher_pid) == ["lo", "node0", "node1", "switch0"]
    assert local_ipv4(launcher_pid) == {"127.0.0.1"} and not routes_out(launcher_pid)
    # The machine's namespace never sees the nodes' addresses.
    assert not {a for a in local_ipv4() if a.startswith(emulated_cluster.SUBNET_PREFIX)}


# ------------------------------------------------------------- containment
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_process_dies_with_a_sigkilled_launcher_on_emulated_nodes(tmp_path):
    needs_root()
    command = [sys.executable, "-m", "distadam.launch", "--nproc", "4", "--nodes", "2", "--grace-period", "1",
               "--no-python", sys.executable, str(PROBE), "--pid-dir", str(tmp_path), "--spawn-child", "--daemon"]
    proc = start_process(command, cwd=ROOT, env=worker_env(), separate_stderr=True)
    try:
        wait_for_files(tmp_path, "*.pids", 4, timeout=60, proc=proc)
        pids = recorded_pids(tmp_path)
        assert len(pids) == 12  # per rank: worker, child, daemon
        assert len({namespace(pid) for pid in pids}) == 2  # children and daemons stay in their node
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only, not its group
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in pids if alive(pid)]
        assert not survivors, f"processes left behind: {survivors}"
    finally:
        kill_group(proc)
        for pid in recorded_pids(tmp_path):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def recorded_pids(directory):
    return [int(pid) for path in Path(directory).glob("*.pids") for pid in path.read_text().split()]


def alive(pid):
    """Alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_launcher_refuses_when_the_nodes_cannot_be_made(tmp_path, monkeypatch, capsys):
    (tmp_path / "x.py").write_text("")
    monkeypatch.setattr(launch, "Sandbox", lambda private_network: FakeSandbox())

    def fail(nodes, rate):
        raise emulated_cluster.EmulatedClusterError("ip link add switch0 type bridge failed: Operation not permitted")

    monkeypatch.setattr(emulated_cluster, "EmulatedCluster", fail)
    assert launch.main(["--nproc", "4", "--nodes", "2", str(tmp_path / "x.py")]) == 2
    assert "cannot emulate 2 node(s): ip link add switch0 type bridge failed" in capsys.readouterr().err


def test_missing_iproute2_is_named(monkeypatch):
    monkeypatch.setattr(emulated_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(emulated_cluster.shutil, "which", lambda name, path=None: None)
    with pytest.raises(emulated_cluster.EmulatedClusterError, match="--nodes needs 'ip' \\(iproute2\\)"):
        emulated_cluster.EmulatedCluster(2)


def test_not_root_is_refused_before_anything_is_made(monkeypatch):
    monkeypatch.setattr(emulated_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(emulated_cluster.EmulatedClusterError, match="--nodes needs root"):
        emulated_cluster.EmulatedCluster(2)


class FakeSandbox:
    def close(self):
        pass


# ------------------------------------------------------------ pure parts
@pytest.mark.parametrize("text, bits", [
    ("200mbit", 200_000_000), ("1.5gbit", 1_500_000_000), ("1500kbit", 1_500_000),
    ("1000000bit", 10**6), ("100gbit", 100 * 10**9), ("200Mbit", 200_000_000), (" 10mbit ", 10**7),
])
def test_rates(text, bits):
    assert emulated_cluster.parse_rate(text) == bits


@pytest.mark.parametrize("text", ["200", "200mbps", "200 mbit", "-1mbit", "1e9bit", "nan", "inf", "mbit",
                                  "0mbit", "999kbit", "101gbit", "1tbit", "\uff12mbit", "1_0mbit",
                                  "1" * 5000 + "mbit", "0x10mbit", ""])
def test_bad_rates_are_rejected(text):
    with pytest.raises(ValueError, match="expected a rate|is outside"):
        emulated_cluster.parse_rate(text)


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "4", "--nodes", "3", "x.py"], "--nodes 3 must divide --nproc 4"),
    (["--nproc", "4", "--nodes", "0", "x.py"], "--nodes must be between 1 and 64"),
    (["--nproc", "128", "--nodes", "128", "x.py"], "--nodes must be between 1 and 64"),
    (["--nproc", "4", "--nodes", "-2", "x.py"], "expected a whole number"),
    (["--nproc", "4", "--nodes", "2", "--network", "host", "x.py"], "--nodes needs the private network"),
    (["--nproc", "4", "--inter-node-rate", "200mbit", "x.py"], "--inter-node-rate needs --nodes"),
    (["--nproc", "4", "--nodes", "2", "--inter-node-rate", "200mbps", "x.py"],
     "expected a rate such as 200mbit"),
    (["--nproc", "4", "--nodes", "2", "--inter-node-rate", "1kbit", "x.py"], "1kbit is outside 1mbit .. 100gbit"),
])
def test_invalid_node_arguments_are_rejected(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("")
    with pytest.raises(SystemExit) as raised:
        launch.parse_args(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_help_documents_the_mode(capsys):
    with pytest.raises(SystemExit):
        launch.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--nodes NODES emulate this many hosts on this machine" in help_text
    assert "Bandwidth only (no added latency; the CPU is shared)" in help_text
    assert "--inter-node-rate RATE" in help_text and "tc tbf" in help_text
    assert "Emulated nodes." in launch.__doc__ and "no added latency" in launch.__doc__


class FakeNodes:
    """What worker_environments asks of an EmulatedCluster."""

    nodes = 2

    def peers(self, nproc):
        per_node = nproc // self.nodes
        return [f"{emulated_cluster.node_address(rank // per_node)}:{7000 + rank}" for rank in range(nproc)]


def test_tf_config_names_each_worker_by_its_nodes_address():
    inherited = {WORKERS_PER_NODE_ENV: "8", "SLURM_PROCID": "3", "PATH": "/bin"}
    envs = launch.worker_environments(6, 1, restart=0, base=inherited, nodes=FakeNodes())
    specs = [resolve_cluster(env) for env in envs]
    assert [s.rank for s in specs] == list(range(6))
    assert specs[0].peers == ("169.254.1.1:7000", "169.254.1.1:7001", "169.254.1.1:7002",
                              "169.254.1.2:7003", "169.254.1.2:7004", "169.254.1.2:7005")
    assert all(env[WORKERS_PER_NODE_ENV] == "3" and env["DISTADAM_NETWORK_CONFINED"] for env in envs)
    assert [emulated_cluster.node_of(rank, 6, 2) for rank in range(6)] == [0, 0, 0, 1, 1, 1]
    # Without nodes, an enclosing job's workers-per-node does not leak in.
    (env, _) = launch.worker_environments(2, 1, restart=0, base=inherited)
    assert WORKERS_PER_NODE_ENV not in env and "DISTADAM_NETWORK_CONFINED" not in env
    assert launch.WORKERS_PER_NODE_ENV == WORKERS_PER_NODE_ENV


def test_token_bucket_holds_a_gso_packet_and_four_milliseconds():
    assert emulated_cluster.token_bucket(200 * 10**6) == ["tbf", "rate", "200000000bit", "burst", "100000",
                                                         "latency", "20ms"]
    assert emulated_cluster.token_bucket(10**6)[4] == str(64 * 1024)
    assert [emulated_cluster.node_address(k) for k in (0, 63)] == ["169.254.1.1", "169.254.1.64"]
