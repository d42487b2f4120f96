"""Cluster resolution: every launch environment resolves to the right rank,
world size and peers, and every inconsistent one is rejected by name."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from distadam import cluster
from distadam.cluster import expand_hostlist, expand_tasks_per_node, resolve_cluster

ROOT = Path(__file__).resolve().parents[1]


def tf_config(cluster_spec, task_type, index):
    return {"TF_CONFIG": json.dumps({"cluster": cluster_spec, "task": {"type": task_type, "index": index}})}


def k8s_env(index=1, world=3, **extra):
    env = {
        "JOB_COMPLETION_INDEX": str(index),
        "DISTADAM_WORLD_SIZE": str(world),
        "DISTADAM_SERVICE": "digits-workers",
        "DISTADAM_JOB_NAME": "digits",
    }
    env.update(extra)
    return env


def slurm_env(procid, ntasks, nodelist, tasks_per_node=None, **extra):
    env = {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NODELIST": nodelist}
    if tasks_per_node is not None:
        env["SLURM_STEP_TASKS_PER_NODE"] = tasks_per_node
    env.update(extra)
    return env


@pytest.fixture
def fake_rendezvous(monkeypatch):
    """Stand-in for distadam.mpi_rendezvous that returns a chosen TF_CONFIG
    (the real one needs an MPI job; it is exercised by the Horovod tests)."""
    calls = []

    def install(config):
        module = types.ModuleType("distadam.mpi_rendezvous")

        def rendezvous_tf_config():
            calls.append(config)
            return config

        module.rendezvous_tf_config = rendezvous_tf_config
        monkeypatch.setitem(sys.modules, "distadam.mpi_rendezvous", module)
        monkeypatch.delattr("distadam.mpi_rendezvous", raising=False)
        return calls

    return install


# ---------------------------------------------------------------- valid envs
def test_no_cluster_environment_is_one_local_worker():
    spec = resolve_cluster({})
    assert (spec.rank, spec.world_size, spec.peers, spec.tf_config, spec.source) == (0, 1, (), None, "local")
    assert spec.is_chief and not spec.is_distributed


def test_tf_config_workers_only():
    peers = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]
    spec = resolve_cluster(tf_config({"worker": peers}, "worker", 2))
    assert (spec.rank, spec.world_size, spec.peers, spec.source) == (2, 3, tuple(peers), "TF_CONFIG")
    assert spec.tf_config["task"] == {"type": "worker", "index": 2}


@pytest.mark.parametrize("task_type, index, rank", [("chief", 0, 0), ("worker", 0, 1), ("worker", 1, 2)])
def test_tf_config_chief_is_rank_zero_then_workers(task_type, index, rank):
    cluster_spec = {"chief": ["c:1"], "worker": ["w0:1", "w1:1"], "evaluator": ["e:1"]}
    spec = resolve_cluster(tf_config(cluster_spec, task_type, index))
    assert spec.rank == rank
    assert spec.peers == ("c:1", "w0:1", "w1:1")  # the evaluator does not train
    assert "evaluator" not in spec.tf_config["cluster"]


def test_tf_config_from_training_operator_single_worker_is_not_distributed():
    spec = resolve_cluster(tf_config({"worker": ["digits-worker-0.ns.svc:2222"]}, "worker", 0))
    assert (spec.rank, spec.world_size, spec.is_distributed) == (0, 1, False)


@pytest.mark.parametrize("raw", ["", "   ", "{}", '{"cluster": {}}', '{"cluster": {}, "task": {"index": 0}}'])
def test_empty_tf_config_means_no_cluster(raw):
    assert resolve_cluster({"TF_CONFIG": raw}).source == "local"


def test_tf_config_wins_over_every_other_source():
    env = tf_config({"worker": ["a:1", "b:1"]}, "worker", 1)
    env.update(k8s_env(index=1, world=2), **slurm_env(1, 2, "n[1-2]"))
    assert resolve_cluster(env).source == "TF_CONFIG"


def test_kubernetes_indexed_job_uses_headless_service_dns_names():
    spec = resolve_cluster(k8s_env(index=1, world=3))
    assert spec.source == "Kubernetes Indexed Job"
    assert (spec.rank, spec.world_size) == (1, 3)
    assert spec.peers == tuple(f"digits-{i}.digits-workers:2222" for i in range(3))
    assert spec.tf_config == {"cluster": {"worker": list(spec.peers)}, "task": {"type": "worker", "index": 1}}


def test_kubernetes_job_name_from_hostname_namespace_and_port():
    env = k8s_env(index=0, world=2, HOSTNAME="train-7b-0", DISTADAM_NAMESPACE="ml", DISTADAM_PORT="3000")
    del env["DISTADAM_JOB_NAME"]
    assert resolve_cluster(env).peers == ("train-7b-0.digits-workers.ml.svc:3000",
                                          "train-7b-1.digits-workers.ml.svc:3000")


def test_kubernetes_single_completion_is_not_distributed():
    spec = resolve_cluster(k8s_env(index=0, world=1))
    assert (spec.world_size, spec.tf_config) == (1, None)


@pytest.mark.parametrize("rank_var, size_var, family", [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("PMI_RANK", "PMI_SIZE", "PMI"),
    ("HOROVOD_RANK", "HOROVOD_SIZE", "Horovod"),
])
def test_mpi_ranks_rendezvous_for_peers(fake_rendezvous, rank_var, size_var, family):
    peers = ["node-a:40001", "node-b:40002"]
    calls = fake_rendezvous(cluster.tf_config_for(peers, 1))
    spec = resolve_cluster({rank_var: "1", size_var: "2"})
    assert calls, "the MPI source must ask the rendezvous for peers"
    assert (spec.rank, spec.world_size, spec.peers) == (1, 2, tuple(peers))
    assert spec.source == f"{family} rendezvous"


def test_mpi_rendezvous_may_return_json_text(fake_rendezvous):
    fake_rendezvous(json.dumps(cluster.tf_config_for(["a:1", "b:1"], 0)))
    assert resolve_cluster({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}).rank == 0


def test_mpi_single_process_needs_no_rendezvous(fake_rendezvous):
    calls = fake_rendezvous(None)
    spec = resolve_cluster({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"})
    assert (spec.world_size, calls) == (1, [])


def test_mpirun_inside_a_slurm_allocation_follows_mpi(fake_rendezvous):
    # mpirun's children inherit the batch step's SLURM_PROCID=0.
    fake_rendezvous(cluster.tf_config_for(["a:1", "b:1"], 1))
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", **slurm_env(0, 1, "n1")}
    assert resolve_cluster(env).rank == 1


def test_slurm_block_distribution_with_uneven_tasks_per_node():
    env = slurm_env(4, 5, "gpu[01-02],cpu7", tasks_per_node="2(x2),1",
                    SLURMD_NODENAME="cpu7", SLURM_LOCALID="0", DISTADAM_PORT="29500")
    spec = resolve_cluster(env)
    assert spec.source == "Slurm"
    assert spec.peers == ("gpu01:29500", "gpu01:29501", "gpu02:29500", "gpu02:29501", "cpu7:29500")
    assert (spec.rank, spec.world_size) == (4, 5)


def test_slurm_even_split_without_tasks_per_node_and_step_nodelist_preferred():
    env = slurm_env(3, 4, "n[3-4]", SLURM_JOB_NODELIST="n[1-8]")
    assert resolve_cluster(env).peers == ("n3:2222", "n3:2223", "n4:2222", "n4:2223")


def test_slurm_job_nodelist_and_ntasks_fallbacks():
    env = {"SLURM_PROCID": "0", "SLURM_NPROCS": "2", "SLURM_JOB_NODELIST": "a,b", "SLURM_TASKS_PER_NODE": "1(x2)"}
    assert resolve_cluster(env).peers == ("a:2222", "b:2222")


@pytest.mark.parametrize("hostlist, expected", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[08-11,20]", ["gpu08", "gpu09", "gpu10", "gpu11", "gpu20"]),
    ("a[1-2],b,c[5]", ["a1", "a2", "b", "c5"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
])
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]


def test_launcher_variables_that_agree_are_accepted():
    env = tf_config({"worker": ["a:1", "b:1"]}, "worker", 1)
    env.update(DISTADAM_RANK="1", DISTADAM_WORLD_SIZE="2")
    assert resolve_cluster(env).rank == 1


# -------------------------------------------------------------- invalid envs
INVALID = {
    # TF_CONFIG
    "malformed TF_CONFIG": ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"]'}, r"TF_CONFIG is not valid JSON"),
    "TF_CONFIG not an object": ({"TF_CONFIG": '["a:1"]'}, r"TF_CONFIG must be a JSON object"),
    "TF_CONFIG without task": ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1"]}})},
                               r"'task' must be an object with 'type' and 'index'"),
    "TF_CONFIG rank >= world size": (tf_config({"worker": ["a:1", "b:1"]}, "worker", 2),
                                     r"task worker:2 is missing from the cluster, which lists 2"),
    "TF_CONFIG missing task type": (tf_config({"worker": ["a:1"]}, "chief", 0), r"task chief:0 is missing"),
    "TF_CONFIG duplicate host:port": (tf_config({"chief": ["a:1"], "worker": ["b:2", "a:1"]}, "worker", 0),
                                      r"duplicate address 'a:1' for ranks 0 and 2"),
    "TF_CONFIG duplicate differing in case": (tf_config({"worker": ["Node:1", "node:1"]}, "worker", 0),
                                              r"duplicate address"),
    "TF_CONFIG no port": (tf_config({"worker": ["a", "b:1"]}, "worker", 0), r"peer 0 address 'a' is not 'host:port'"),
    "TF_CONFIG port out of range": (tf_config({"worker": ["a:70000", "b:1"]}, "worker", 0), r"port in 1-65535"),
    "TF_CONFIG parameter servers": (tf_config({"worker": ["a:1"], "ps": ["p:1"]}, "worker", 0),
                                    r"task types \['ps'\] are not supported"),
    "TF_CONFIG evaluator task": (tf_config({"worker": ["a:1"], "evaluator": ["e:1"]}, "evaluator", 0),
                                 r"'evaluator' task, which does not train"),
    "TF_CONFIG two chiefs": (tf_config({"chief": ["a:1", "b:1"]}, "chief", 0), r"at most one chief"),
    "TF_CONFIG negative index": (tf_config({"worker": ["a:1"]}, "worker", -1), r"non-negative integer"),
    "TF_CONFIG addresses not a list": (tf_config({"worker": "a:1,b:1"}, "worker", 0),
                                       r"cluster\['worker'\] must be a list"),
    # Kubernetes
    "k8s index >= world size": (k8s_env(index=3, world=3),
                                r"JOB_COMPLETION_INDEX=3 is out of range for DISTADAM_WORLD_SIZE=3"),
    "k8s no world size": ({"JOB_COMPLETION_INDEX": "0", "DISTADAM_SERVICE": "s", "DISTADAM_JOB_NAME": "j"},
                          r"DISTADAM_WORLD_SIZE is not set \(set it to the Job's spec.completions"),
    "k8s no service": (k8s_env(DISTADAM_SERVICE=""), r"DISTADAM_SERVICE is not"),
    "k8s no job name": (k8s_env(DISTADAM_JOB_NAME="", HOSTNAME="laptop"),
                        r"cannot tell the Job's name.*HOSTNAME='laptop'"),
    "k8s bad index": (k8s_env(JOB_COMPLETION_INDEX="one"), r"JOB_COMPLETION_INDEX='one' is not an integer"),
    "k8s bad port": (k8s_env(DISTADAM_PORT="0"), r"DISTADAM_PORT=0 is not a port"),
    "k8s zero world size": (k8s_env(index=0, world=0), r"world size must be at least 1"),
    # MPI
    "mpi rank >= size": ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"},
                         r"OMPI_COMM_WORLD_RANK=2 is out of range for OMPI_COMM_WORLD_SIZE=2"),
    "mpi size missing": ({"PMI_RANK": "0"}, r"PMI_SIZE is not set"),
    "horovod rank not a number": ({"HOROVOD_RANK": "x", "HOROVOD_SIZE": "2"}, r"HOROVOD_RANK='x' is not an integer"),
    # Slurm
    "slurm rank >= ntasks": (slurm_env(2, 2, "n[1-2]"), r"SLURM_PROCID=2 is out of range for SLURM_NTASKS=2"),
    "slurm no ntasks": ({"SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}, r"SLURM_NTASKS is not set"),
    "slurm no nodelist": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, r"no SLURM_STEP_NODELIST"),
    "slurm cyclic": (slurm_env(0, 2, "n[1-2]", SLURM_DISTRIBUTION="cyclic"), r"assuming block distribution"),
    "slurm tasks-per-node count": (slurm_env(0, 3, "n[1-2]", tasks_per_node="1(x3)"),
                                   r"describes 3 nodes but SLURM_STEP_NODELIST lists 2"),
    "slurm tasks-per-node sum": (slurm_env(0, 3, "n[1-2]", tasks_per_node="1,1"), r"sums to 2 tasks but"),
    "slurm uneven without tasks": (slurm_env(0, 3, "n[1-2]"), r"do not divide evenly over 2 nodes"),
    "slurm wrong node": (slurm_env(0, 2, "n[1-2]", SLURMD_NODENAME="n2"),
                         r"rank 0 should run on n1 .* SLURMD_NODENAME='n2'"),
    "slurm wrong local id": (slurm_env(1, 2, "n1", SLURM_LOCALID="0"), r"SLURM_LOCALID=0 but block"),
    "slurm unbalanced hostlist": (slurm_env(0, 1, "n[1-2"), r"unbalanced brackets"),
    "slurm backwards range": (slurm_env(0, 1, "n[3-1]"), r"runs backwards"),
    "slurm bad range": (slurm_env(0, 1, "n[a-b]"), r"bad range 'a-b'"),
    # Hostile values (issue 14)
    "TF_CONFIG cluster is a list": ({"TF_CONFIG": '{"cluster": [], "task": {"type": "worker", "index": 0}}'},
                                   r"'cluster' must be an object"),
    "TF_CONFIG cluster is 0": ({"TF_CONFIG": '{"cluster": 0}'}, r"'cluster' must be an object"),
    "TF_CONFIG task without cluster": ({"TF_CONFIG": '{"task": {"type": "worker", "index": 3}}'},
                                       r"but no cluster: this process would train alone as process 0"),
    "TF_CONFIG task bool index without cluster": ({"TF_CONFIG": '{"task": {"index": true}}'}, r"but no cluster"),
    "TF_CONFIG Arabic-Indic port": (tf_config({"worker": ["a:\u0662\u0662\u0662\u0662", "b:1"]}, "worker", 0),
                                    r"is not 'host:port' with a port"),
    "TF_CONFIG fullwidth port": (tf_config({"worker": ["a:\uff11", "b:1"]}, "worker", 0), r"is not 'host:port'"),
    "TF_CONFIG underscore port": (tf_config({"worker": ["a:1_0", "b:1"]}, "worker", 0), r"is not 'host:port'"),
    "TF_CONFIG URL as host": (tf_config({"worker": ["http://evil host/x:80", "b:1"]}, "worker", 0),
                              r"'http://evil host/x' is not a host name \(RFC 1123\)"),
    "TF_CONFIG empty host": (tf_config({"worker": [":80", "b:1"]}, "worker", 0), r"is not a host name"),
    "TF_CONFIG bad IPv4": (tf_config({"worker": ["300.1.1.1:80", "b:1"]}, "worker", 0), r"is not a host name"),
    "TF_CONFIG unbracketed IPv6": (tf_config({"worker": ["::1:80", "b:1"]}, "worker", 0), r"is not a host name"),
    "TF_CONFIG huge cluster": ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"] * 70000},
                                                         "task": {"type": "worker", "index": 0}})},
                               r"70000 workers is more than distadam accepts \(65536\)"),
    "k8s fullwidth index": (k8s_env(JOB_COMPLETION_INDEX="\uff11"), r"is not an integer \(ASCII digits 0-9 only\)"),
    "k8s Arabic-Indic index": (k8s_env(JOB_COMPLETION_INDEX="\u0661"), r"is not an integer"),
    "k8s underscore world size": (k8s_env(world="1_0"), r"DISTADAM_WORLD_SIZE='1_0' is not an integer"),
    "k8s signed index": (k8s_env(JOB_COMPLETION_INDEX="+1"), r"is not an integer"),
    "k8s padded index": (k8s_env(JOB_COMPLETION_INDEX=" 1"), r"is not an integer"),
    "k8s world size 1e9": (k8s_env(world="1e9"), r"DISTADAM_WORLD_SIZE='1e9' is not an integer"),
    "k8s service not a DNS label": (k8s_env(DISTADAM_SERVICE="evil host/x"), r"DISTADAM_SERVICE='evil host/x' is not a"),
    "slurm huge product": (slurm_env(0, 2, "r[1-1000]n[1-1000]"), r"names more than 65536 hosts"),
    "logical devices huge": (
        {"DISTADAM_LOGICAL_DEVICES": "20000", **tf_config({"worker": ["a:1", "b:1"]}, "worker", 0)}, None),
    # Disagreeing launchers
    "TF_CONFIG vs JOB_COMPLETION_INDEX": ({**tf_config({"worker": ["a:1", "b:1"]}, "worker", 1),
                                          "JOB_COMPLETION_INDEX": "0"},
                                         r"TF_CONFIG says rank 1 of 2, but JOB_COMPLETION_INDEX say rank 0"),
    "TF_CONFIG vs srun step": ({**tf_config({"worker": ["a:1", "b:1"]}, "worker", 0), "SLURM_STEP_ID": "0",
                                "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"},
                               r"TF_CONFIG says rank 0 of 2, but SLURM_PROCID/SLURM_STEP_NUM_TASKS say rank 1 of 2"),
    "TF_CONFIG vs srun step size": ({**tf_config({"worker": ["a:1", "b:1"]}, "worker", 0), "SLURM_STEP_ID": "3",
                                     "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, r"say rank 0 of 4"),
    "PMI vs Open MPI": ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "PMI_RANK": "0", "PMI_SIZE": "2"},
                        r"Open MPI \(OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE\) says rank 1 of 2, but PMI "
                        r"\(PMI_RANK/PMI_SIZE\) says rank 0 of 2"),
    "Horovod vs Open MPI size": ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "HOROVOD_RANK": "0",
                                 "HOROVOD_SIZE": "3"}, r"but Horovod .* says rank 0 of 3"),
    "k8s vs srun step": ({**k8s_env(index=1, world=3), "SLURM_STEP_ID": "0", "SLURM_PROCID": "2",
                          "SLURM_NTASKS": "3"}, r"Kubernetes Indexed Job says rank 1 of 3, but SLURM_PROCID"),
    "DISTADAM_RANK disagrees": ({**tf_config({"worker": ["a:1", "b:1"]}, "worker", 1), "DISTADAM_RANK": "0"},
                                r"TF_CONFIG says rank 1 of 2, but DISTADAM_RANK/DISTADAM_WORLD_SIZE say rank 0"),
    "MPI size disagrees": ({**tf_config({"worker": ["a:1", "b:1"]}, "worker", 0),
                            "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "3"},
                           r"but Open MPI rank/size say rank 0 of 3"),
}


@pytest.mark.parametrize("env, message", [v for v in INVALID.values() if v[1]],
                         ids=[k for k, v in INVALID.items() if v[1]])
def test_inconsistent_environment_is_rejected_clearly(env, message):
    with pytest.raises(ValueError, match=message):
        resolve_cluster(env)


def test_huge_logical_device_count_is_rejected():
    with pytest.raises(ValueError, match=r"DISTADAM_LOGICAL_DEVICES=20000: more than 64"):
        cluster._logical_cpu_count({"DISTADAM_LOGICAL_DEVICES": "20000"})


@pytest.mark.parametrize("env", [
    {"TF_CONFIG": '{"task": {"type": "worker", "index": 0}}'},  # a single worker written by hand
    {**tf_config({"worker": ["[::1]:2222", "127.0.0.1:2223", "node-1.example.org.:2224"]}, "worker", 1)},
    # A hand-written TF_CONFIG run from an sbatch script (no srun step): Slurm's batch-step values differ.
    {**tf_config({"worker": ["a:1", "b:1"]}, "worker", 1), "SLURM_PROCID": "0", "SLURM_NTASKS": "8"},
    {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "HOROVOD_RANK": "0", "HOROVOD_SIZE": "1"},
], ids=["task-0-no-cluster", "ipv6-ipv4-fqdn", "sbatch-batch-step", "mpi-families-agree"])
def test_valid_unusual_environments_are_accepted(env):
    resolve_cluster(env)


SIZE_BOMB = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: a size bomb fails loudly, not slowly
from distadam.cluster import resolve_cluster
env = {"k8s": {"JOB_COMPLETION_INDEX": "0", "DISTADAM_WORLD_SIZE": "1000000000", "DISTADAM_SERVICE": "s",
               "DISTADAM_JOB_NAME": "j"},
       "slurm": {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "node[1-100000000]"},
       "tasks": {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
                 "SLURM_STEP_TASKS_PER_NODE": "1(x100000000)"},
       "ntasks": {"SLURM_PROCID": "0", "SLURM_NTASKS": "100000000", "SLURM_STEP_NODELIST": "n1"},
       "mpi": {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "999999999"}}[sys.argv[1]]
try:
    resolve_cluster(env)
except ValueError as error:
    print("ValueError", error)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a
# pytest that has TensorFlow loaded would start at its ~0.6 GB.
print("maxrss_kib", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["k8s", "slurm", "tasks", "ntasks", "mpi"])
def test_sizes_from_the_environment_are_bounded_before_allocating(kind):
    """In a subprocess under a 1 GiB address-space limit: without the bounds
    these grow memory until killed (or would take the test run with them)."""
    result = subprocess.run([sys.executable, "-c", SIZE_BOMB, kind], capture_output=True, text=True,
                            timeout=100, cwd=ROOT)
    assert "ValueError" in result.stdout and "65536" in result.stdout, (result.stdout, result.stderr[-2000:])
    peak_kib = int(result.stdout.split("maxrss_kib")[1])
    assert peak_kib < 200 * 1024, f"resolving used {peak_kib / 1024:.0f} MiB"


@pytest.mark.parametrize("interfaces, env, warned", [
    (["lo"], {}, False),                                    # distadam launch's private namespace
    (["lo", "eth0"], {"DISTADAM_NETWORK_CONFINED": "NetworkPolicy x"}, False),
    (["lo", "eth0"], {}, True),
    (None, {}, True),                                       # no /proc: nothing known
])
def test_exposure_warning_unless_something_confines_the_server(interfaces, env, warned):
    spec = resolve_cluster(tf_config({"worker": ["127.0.0.1:4001", "127.0.0.1:4002"]}, "worker", 1))
    message = cluster.exposure_warning(spec, env, interfaces=interfaces)
    assert bool(message) == warned
    if warned:
        assert "port 4002" in message and "authenticates no one" in message and "DISTADAM_NETWORK_CONFINED" in message
    single = resolve_cluster({})
    assert cluster.exposure_warning(single, {}, interfaces=["lo", "eth0"]) is None


def test_mpi_without_mpi4py_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails, as if not installed
    with pytest.raises(RuntimeError, match=r"rank 1 of 2, and exchanging .* needs mpi4py: .*pip install"):
        resolve_cluster({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})


def test_rendezvous_disagreeing_with_mpi_is_rejected(fake_rendezvous):
    # What horovodrun --gloo would produce: no MPI world, every process alone.
    fake_rendezvous({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    with pytest.raises(ValueError, match=r"rank 0 of 1 but Horovod says rank 1 of 2.*--gloo"):
        resolve_cluster({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"})


# ------------------------------------------------------------------ strategy
STRATEGY_PROBE = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import distadam
kind = sys.argv[1]
if kind == "local":
    s = distadam.strategy_from_env(environ={"DISTADAM_LOGICAL_DEVICES": "3"})
    print(type(s).__name__, s.num_replicas_in_sync)
else:
    env = {"DISTADAM_LOGICAL_DEVICES": "2",
           "TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}'}
    try:
        distadam.strategy_from_env(environ=env)
    except ValueError as error:
        print("ValueError", error)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, expected", [
    ("local", "MirroredStrategy 3"),
    ("multiworker_with_logical_cpus", "ValueError DISTADAM_LOGICAL_DEVICES=2 with 2 workers"),
])
def test_strategy_from_env(kind, expected):
    # A fresh process each: TensorFlow's devices can be configured only once.
    result = subprocess.run([sys.executable, "-c", STRATEGY_PROBE, kind], capture_output=True, text=True,
                            timeout=100, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith(expected), result.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mpirun_main_job_resolves_peers_through_mpi(tmp_path):
    """``mpirun -np 2 python train.py``, no TF_CONFIG: the Open MPI variables
    plus distadam.mpi_rendezvous give MultiWorkerMirroredStrategy its cluster."""
    import os
    import signal

    import numpy as np

    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "mpirun").exists():
        pytest.skip("no mpirun in the venv (scripts/install_horovod.sh installs Open MPI)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env['PATH']}"
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.Popen(
        [str(venv_bin / "mpirun"), "-np", "2", sys.executable, "examples/train_digits.py", "--epochs", "1",
         "--max-steps", "4", "--out", str(tmp_path / "rank{rank}.npz")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    assert proc.returncode == 0, out[-4000:]
    assert "cluster: Open MPI rendezvous, 2 worker(s)" in out
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for key in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
