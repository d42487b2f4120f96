"""Where am I in the job? Rank, world size and peers from the launch environment.

A training script calls :func:`strategy_from_env` and gets the right
``tf.distribute`` strategy whether it was started by ``distadam-launch``, a
Kubeflow TFJob, a Kubernetes Indexed Job, ``mpirun``/``horovodrun``, Slurm's
``srun``, or plainly with ``python train.py``.

Sources, first match wins:

1. ``TF_CONFIG`` (distadam-launch, the Kubeflow training-operator, or by hand).
2. A Kubernetes Indexed Job: ``JOB_COMPLETION_INDEX`` (set by the Job
   controller) plus ``DISTADAM_WORLD_SIZE`` and ``DISTADAM_SERVICE`` from the
   manifest; peers are the headless Service's per-pod DNS names
   ``<job>-<index>.<service>[.<namespace>.svc]:<DISTADAM_PORT>``.
3. MPI (``OMPI_COMM_WORLD_*``, ``PMI_*``, ``HOROVOD_*``): rank and size come
   from the environment, peers from an MPI rendezvous
   (:mod:`distadam.mpi_rendezvous`) because MPI does not publish addresses.
4. Slurm (``SLURM_PROCID``, ``SLURM_NTASKS``, the step's node list and tasks
   per node): peers are ``<node>:<DISTADAM_PORT + local task index>``.

Whatever the source, ``DISTADAM_RANK``/``DISTADAM_WORLD_SIZE``,
``JOB_COMPLETION_INDEX``, the MPI variables (every family present, with each
other too) and, inside an ``srun`` step, Slurm's must agree with it: a
mismatch means two launchers disagree about the job, which would otherwise
surface as a collective hanging until its timeout, or as every worker writing
checkpoints as process 0.

Every value is hostile until checked: integers are ASCII digits only (no
``'１'``, ``'٢'``, ``'1_0'``, ``'+1'``), hosts are RFC 1123 names or IP
literals, sizes are bounded by :data:`MAX_WORLD_SIZE` *before* anything of
that size is built.

Security: TensorFlow's gRPC server listens on every interface and
authenticates no one. :func:`strategy_from_env` warns
(:class:`ExposedServerWarning`) when it starts one and nothing known confines
it: neither a private network namespace (only loopback, as ``distadam launch``
provides) nor ``DISTADAM_NETWORK_CONFINED`` (set it to what confines the job,
e.g. the name of its NetworkPolicy, as the manifests in ``k8s/`` do).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import warnings
from typing import Mapping

#: Default port of the collective (gRPC) server when a source does not say.
#: 2222 is the Kubeflow training-operator's default too.
DEFAULT_PORT = 2222

#: Largest world size accepted from the environment: checked before a peer
#: list, a hostlist expansion or anything else of that size is built.
MAX_WORLD_SIZE = 65536

#: What confines the collective servers, when the network namespace is not
#: private (e.g. "NetworkPolicy distadam-digits-collectives").
CONFINEMENT_ENV = "DISTADAM_NETWORK_CONFINED"

#: Logical CPU devices this process should expose (distadam-launch's
#: ``--devices-per-worker``); applied by :func:`strategy_from_env`.
LOGICAL_DEVICES_ENV = "DISTADAM_LOGICAL_DEVICES"

_MPI_FAMILIES = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI", "PMI_RANK", "PMI_SIZE"),
    ("Horovod", "HOROVOD_RANK", "HOROVOD_SIZE"),
)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """This process's place in the job.

    ``peers`` lists every worker's ``host:port`` in rank order (empty when the
    source cannot know them without communicating, i.e. a single worker).
    ``tf_config`` is the ``TF_CONFIG`` dict MultiWorkerMirroredStrategy needs,
    ``None`` for a single worker. ``source`` names where this came from.
    """

    rank: int
    world_size: int
    peers: tuple[str, ...] = ()
    tf_config: dict | None = None
    source: str = "local"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def resolve_cluster(environ: Mapping[str, str] | None = None) -> ClusterSpec:
    """Resolve this process's :class:`ClusterSpec` from ``environ``
    (default ``os.environ``). Raises ``ValueError`` naming the offending
    variables when the environment is inconsistent."""
    env = os.environ if environ is None else environ
    spec = (
        _from_tf_config(env)
        or _from_kubernetes(env)
        or _from_mpi(env)
        or _from_slurm(env)
        or ClusterSpec(rank=0, world_size=1, source="local")
    )
    _check_agreement(spec, env)
    return spec


# ------------------------------------------------------------------ TF_CONFIG
def _from_tf_config(env) -> ClusterSpec | None:
    raw = env.get("TF_CONFIG", "")
    if not raw.strip():
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error.msg} at character {error.pos}): {raw[:200]!r}"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {type(config).__name__}: {raw[:200]!r}")
    cluster = config.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ValueError(f"TF_CONFIG: 'cluster' must be an object mapping task types to address lists, "
                         f"got {cluster!r:.200}")
    if not cluster:
        # TensorFlow treats a TF_CONFIG without a cluster as "not distributed"
        # and lets the other sources speak; but a task other than the first
        # says this process expected peers, and alone it would train (and
        # write checkpoints) as process 0.
        task = config.get("task")
        if task is not None and not (isinstance(task, dict) and task.get("index", 0) == 0
                                     and not isinstance(task.get("index", 0), bool)):
            raise ValueError(
                f"TF_CONFIG: task {task!r:.200} but no cluster: this process would train alone as "
                "process 0. Give the cluster, or drop the task"
            )
        return None
    return spec_from_tf_config(config, source="TF_CONFIG")


def spec_from_tf_config(config: dict, source: str = "TF_CONFIG") -> ClusterSpec:
    """Validate a ``TF_CONFIG`` dict and turn it into a :class:`ClusterSpec`.

    Ranks follow MultiWorkerMirroredStrategy: the chief (if any) is rank 0,
    then the workers in index order.
    """
    cluster = config.get("cluster")
    if not isinstance(cluster, dict):
        raise ValueError(f"{source}: 'cluster' must be an object mapping task types to address lists")
    unsupported = sorted(set(cluster) - {"chief", "worker", "evaluator"})
    if unsupported:
        raise ValueError(
            f"{source}: task types {unsupported} are not supported; ShardedAdam runs under "
            "MultiWorkerMirroredStrategy, whose cluster has only 'chief' and 'worker' tasks "
            "(parameter servers hold no Adam state to shard)"
        )
    for task_type, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError(f"{source}: cluster[{task_type!r}] must be a list of 'host:port' strings")
        _check_size(len(addresses), f"{source}: cluster[{task_type!r}]")
    chief = cluster.get("chief", [])
    if len(chief) > 1:
        raise ValueError(f"{source}: a cluster has at most one chief, got {len(chief)}: {chief}")
    peers = tuple(chief) + tuple(cluster.get("worker", []))
    if not peers:
        raise ValueError(f"{source}: the cluster has no 'chief' or 'worker' tasks")

    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f"{source}: 'task' must be an object with 'type' and 'index', got {task!r}")
    task_type, index = task["type"], task["index"]
    if task_type == "evaluator":
        raise ValueError(
            f"{source}: this process is an 'evaluator' task, which does not train; "
            "run evaluation without strategy_from_env()"
        )
    if task_type not in ("chief", "worker"):
        raise ValueError(f"{source}: task type {task_type!r} is not 'chief' or 'worker'")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{source}: task index must be a non-negative integer, got {index!r}")
    members = cluster.get(task_type, [])
    if index >= len(members):
        raise ValueError(
            f"{source}: task {task_type}:{index} is missing from the cluster, which lists "
            f"{len(members)} {task_type} address(es): {members}"
        )
    rank = index if task_type == "chief" else index + len(chief)
    _check_peers(peers, source)
    return ClusterSpec(
        rank=rank,
        world_size=len(peers),
        peers=peers,
        tf_config={"cluster": {k: list(v) for k, v in cluster.items() if k != "evaluator"},
                   "task": {"type": task_type, "index": index}},
        source=source,
    )


def tf_config_for(peers, rank: int) -> dict:
    """The ``TF_CONFIG`` for worker ``rank`` of a cluster of equal workers."""
    return {"cluster": {"worker": list(peers)}, "task": {"type": "worker", "index": rank}}


def _spec_from_peers(peers, rank, source) -> ClusterSpec:
    peers = tuple(peers)
    _check_peers(peers, source)
    if not 0 <= rank < len(peers):
        raise ValueError(f"{source}: rank {rank} is not in [0, {len(peers)})")
    tf_config = tf_config_for(peers, rank) if len(peers) > 1 else None
    return ClusterSpec(rank=rank, world_size=len(peers), peers=peers, tf_config=tf_config, source=source)


# ----------------------------------------------------------------- Kubernetes
def _from_kubernetes(env) -> ClusterSpec | None:
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    source = "Kubernetes Indexed Job"
    rank = _int_var(env, "JOB_COMPLETION_INDEX", source)
    world_size = _required_int(
        env, "DISTADAM_WORLD_SIZE", source,
        hint="set it to the Job's spec.completions (= spec.parallelism)",
    )
    _check_size(world_size, f"{source}: DISTADAM_WORLD_SIZE")
    rank_in_range(rank, world_size, f"{source}: JOB_COMPLETION_INDEX", "DISTADAM_WORLD_SIZE")
    service = env.get("DISTADAM_SERVICE", "").strip()
    if not service:
        raise ValueError(
            f"{source}: JOB_COMPLETION_INDEX is set but DISTADAM_SERVICE is not; set it to the "
            "headless Service named in the pod template's spec.subdomain"
        )
    job = env.get("DISTADAM_JOB_NAME", "").strip()
    if not job:
        # An Indexed Job's pod hostname is "<job>-<index>".
        hostname = env.get("HOSTNAME", "")
        suffix = f"-{rank}"
        if not hostname.endswith(suffix) or len(hostname) == len(suffix):
            raise ValueError(
                f"{source}: cannot tell the Job's name: DISTADAM_JOB_NAME is not set and "
                f"HOSTNAME={hostname!r} does not end with '-{rank}' (JOB_COMPLETION_INDEX). Set "
                "DISTADAM_JOB_NAME from the downward API label 'batch.kubernetes.io/job-name'"
            )
        job = hostname[: -len(suffix)]
    port = _port_var(env, "DISTADAM_PORT", source)
    namespace = env.get("DISTADAM_NAMESPACE", "").strip()
    for name, value in (("DISTADAM_SERVICE", service), ("DISTADAM_JOB_NAME", job),
                        ("DISTADAM_NAMESPACE", namespace)):
        if value and not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"{source}: {name}={value!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    domain = f"{service}.{namespace}.svc" if namespace else service
    peers = [f"{job}-{i}.{domain}:{port}" for i in range(world_size)]
    return _spec_from_peers(peers, rank, source)


# ------------------------------------------------------------------------ MPI
def _mpi_rank_and_size(env):
    """(family, rank, size) from the MPI families present, or None.

    Several may be set at once (Horovod under mpirun sets HOROVOD_* beside
    OMPI_COMM_WORLD_*; some MPIs set PMI_* too): they must all agree."""
    found = []
    for family, rank_var, size_var in _MPI_FAMILIES:
        if rank_var in env or size_var in env:
            source = f"{family} ({rank_var}/{size_var})"
            rank = _required_int(env, rank_var, source)
            size = _required_int(env, size_var, source)
            _check_size(size, f"{source}: {size_var}")
            rank_in_range(rank, size, f"{source}: {rank_var}", size_var)
            found.append((family, rank, size, f"{rank_var}/{size_var}"))
    for family, rank, size, names in found[1:]:
        first = found[0]
        if (rank, size) != first[1:3]:
            raise ValueError(
                f"inconsistent environment: {first[0]} ({first[3]}) says rank {first[1]} of {first[2]}, "
                f"but {family} ({names}) says rank {rank} of {size}"
            )
    return found[0][:3] if found else None


def _from_mpi(env) -> ClusterSpec | None:
    found = _mpi_rank_and_size(env)
    if found is None:
        return None
    family, rank, size = found
    source = f"{family} rendezvous"
    if size == 1:
        return ClusterSpec(rank=0, world_size=1, source=family)
    from distadam import mpi_rendezvous

    try:
        config = mpi_rendezvous.rendezvous_tf_config()
    except ImportError as error:  # mpi4py, imported on first use
        raise RuntimeError(
            f"{family} says this is rank {rank} of {size}, and exchanging the workers' addresses "
            f"over MPI needs mpi4py: {error} Or set TF_CONFIG yourself."
        ) from error
    if isinstance(config, str):
        config = json.loads(config)
    spec = spec_from_tf_config(config, source=source)
    if (spec.rank, spec.world_size) != (rank, size):
        raise ValueError(
            f"{source} produced rank {spec.rank} of {spec.world_size} but {family} says rank "
            f"{rank} of {size}. horovodrun --gloo starts no MPI job: use --mpi (or mpirun)."
        )
    return spec


# ---------------------------------------------------------------------- Slurm
def _from_slurm(env) -> ClusterSpec | None:
    if "SLURM_PROCID" not in env:
        return None
    source = "Slurm"
    rank = _int_var(env, "SLURM_PROCID", source)
    size_var = "SLURM_NPROCS" if "SLURM_NPROCS" in env and "SLURM_NTASKS" not in env else "SLURM_NTASKS"
    world_size = _required_int(env, size_var, source, hint="run the script with srun")
    _check_size(world_size, f"{source}: {size_var}")
    rank_in_range(rank, world_size, f"{source}: SLURM_PROCID", size_var)

    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if env.get(v)), None)
    if nodelist_var is None:
        raise ValueError(f"{source}: SLURM_PROCID is set but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
    nodes = expand_hostlist(env[nodelist_var])

    distribution = env.get("SLURM_DISTRIBUTION", "block")
    if not distribution.startswith("block"):
        raise ValueError(
            f"{source}: SLURM_DISTRIBUTION={distribution!r}; peers are derived assuming block "
            "distribution (consecutive ranks per node): use srun --distribution=block"
        )
    tasks_var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(v)), None)
    if tasks_var:
        tasks_per_node = expand_tasks_per_node(env[tasks_var])
        if len(tasks_per_node) != len(nodes):
            raise ValueError(
                f"{source}: {tasks_var}={env[tasks_var]!r} describes {len(tasks_per_node)} nodes "
                f"but {nodelist_var} lists {len(nodes)}: {nodes}"
            )
    else:
        if world_size % len(nodes):
            raise ValueError(
                f"{source}: {world_size} tasks do not divide evenly over {len(nodes)} nodes and "
                "SLURM_STEP_TASKS_PER_NODE is not set"
            )
        tasks_per_node = [world_size // len(nodes)] * len(nodes)
    if sum(tasks_per_node) != world_size:
        raise ValueError(
            f"{source}: {tasks_var} sums to {sum(tasks_per_node)} tasks but {size_var}={world_size}"
        )

    base_port = _port_var(env, "DISTADAM_PORT", source)
    peers, local_ids = [], []
    for node, count in zip(nodes, tasks_per_node, strict=True):
        for local_id in range(count):
            peers.append(f"{node}:{base_port + local_id}")
            local_ids.append(local_id)
    if base_port + max(tasks_per_node) - 1 > 65535:
        raise ValueError(f"{source}: DISTADAM_PORT={base_port} + tasks per node exceeds port 65535")

    my_host = peers[rank].rsplit(":", 1)[0]
    node_name = env.get("SLURMD_NODENAME")
    if node_name and node_name != my_host:
        raise ValueError(
            f"{source}: rank {rank} should run on {my_host} by {nodelist_var}/{tasks_var or 'even split'}, "
            f"but SLURMD_NODENAME={node_name!r}"
        )
    if "SLURM_LOCALID" in env and _int_var(env, "SLURM_LOCALID", source) != local_ids[rank]:
        raise ValueError(
            f"{source}: SLURM_LOCALID={env['SLURM_LOCALID']} but block distribution puts rank "
            f"{rank} at local index {local_ids[rank]} on {my_host}"
        )
    return _spec_from_peers(peers, rank, source)


_RANGE = re.compile(r"([0-9]{1,18})(?:-([0-9]{1,18}))?")


def expand_hostlist(hostlist: str, limit: int = MAX_WORLD_SIZE) -> list:
    """Expand a Slurm hostlist: ``"gpu[01-03,7],cpu-a"`` -> ``gpu01 gpu02 gpu03 gpu7 cpu-a``.

    Several bracket groups in one name expand as a product
    (``"r[1-2]n[1-2]"`` -> ``r1n1 r1n2 r2n1 r2n2``); zero padding follows the
    width of each range's lower bound, as in Slurm. More than ``limit``
    names is an error, detected from the ranges' bounds before expanding.
    """
    names = []
    for item in _split_outside_brackets(hostlist.strip()):
        if not item:
            raise ValueError(f"hostlist {hostlist!r} has an empty entry")
        if item.count("[") != item.count("]"):
            raise ValueError(f"hostlist {hostlist!r} has unbalanced brackets in {item!r}")
        groups = [(prefix, body) for prefix, body in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item)
                  if prefix or body]
        count = 1
        for _, body in groups:
            if body:
                count *= _count_ranges(body, hostlist)
        if len(names) + count > limit:
            raise ValueError(f"hostlist {hostlist[:200]!r} names more than {limit} hosts")
        expansions = [""]
        for prefix, body in groups:
            values = [prefix]
            if body:
                values = [prefix + suffix for suffix in _expand_ranges(body, hostlist)]
            expansions = [head + tail for head in expansions for tail in values]
        names.extend(expansions)
    if not names:
        raise ValueError("empty Slurm hostlist")
    return names


def _split_outside_brackets(text):
    items, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {text!r} has nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {text!r} has unbalanced brackets")
        elif char == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    items.append(text[start:])
    return items


def _count_ranges(body, hostlist) -> int:
    total = 0
    for part in body.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"hostlist {hostlist!r}: bad range {part!r} (expected N or N-M)")
        low, high = match.groups()
        total += max(0, int(high if high is not None else low) - int(low) + 1)
    return total


def _expand_ranges(body, hostlist):
    values = []
    for part in body.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"hostlist {hostlist!r}: bad range {part!r} (expected N or N-M)")
        low_text, high_text = match.groups()
        low = int(low_text)
        high = int(high_text) if high_text is not None else low
        if high < low:
            raise ValueError(f"hostlist {hostlist!r}: range {part!r} runs backwards")
        width = len(low_text)
        values.extend(str(n).zfill(width) for n in range(low, high + 1))
    return values


def expand_tasks_per_node(text: str) -> list:
    """``"2(x3),1"`` (Slurm's compressed tasks-per-node) -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"([0-9]{1,9})(?:\(x([0-9]{1,9})\))?", part.strip())
        if not match:
            raise ValueError(f"cannot parse Slurm tasks-per-node {text[:200]!r} at {part[:50]!r}")
        repeat = int(match.group(2) or 1)
        if len(counts) + repeat > MAX_WORLD_SIZE:
            raise ValueError(f"Slurm tasks-per-node {text[:200]!r} describes more than {MAX_WORLD_SIZE} nodes")
        counts.extend([int(match.group(1))] * repeat)
    return counts


# --------------------------------------------------------------- consistency
def _check_agreement(spec: ClusterSpec, env) -> None:
    """Other launch variables present must describe the same rank and size.

    Slurm's are compared only inside an ``srun`` step (``SLURM_STEP_ID``
    numeric) and when the source is not MPI: ``mpirun`` inside an ``sbatch``
    allocation inherits the batch step's SLURM_PROCID, which legitimately
    differs, and so does a single ``python train.py`` in the batch script.
    """
    claims = []
    if "DISTADAM_RANK" in env or "DISTADAM_WORLD_SIZE" in env:
        rank = _int_var(env, "DISTADAM_RANK", "distadam") if "DISTADAM_RANK" in env else None
        size = _int_var(env, "DISTADAM_WORLD_SIZE", "distadam") if "DISTADAM_WORLD_SIZE" in env else None
        claims.append(("DISTADAM_RANK/DISTADAM_WORLD_SIZE", rank, size))
    if "JOB_COMPLETION_INDEX" in env and spec.source != "Kubernetes Indexed Job":
        claims.append(("JOB_COMPLETION_INDEX", _int_var(env, "JOB_COMPLETION_INDEX", "Kubernetes"), None))
    mpi = _mpi_rank_and_size(env)
    if mpi is not None:
        claims.append((f"{mpi[0]} rank/size", mpi[1], mpi[2]))
    in_srun_step = re.fullmatch(r"[0-9]+", env.get("SLURM_STEP_ID", "")) is not None
    if (in_srun_step and "SLURM_PROCID" in env and spec.source != "Slurm" and mpi is None):
        size_var = next((v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") if v in env), None)
        size = _int_var(env, size_var, "Slurm") if size_var else None
        claims.append((f"SLURM_PROCID/{size_var or 'SLURM_NTASKS'}", _int_var(env, "SLURM_PROCID", "Slurm"), size))
    for name, rank, size in claims:
        if (rank is not None and rank != spec.rank) or (size is not None and size != spec.world_size):
            raise ValueError(
                f"inconsistent environment: {spec.source} says rank {spec.rank} of "
                f"{spec.world_size}, but {name} say rank {rank} of {size}"
            )


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")


def check_host(host: str) -> bool:
    """An RFC 1123 host name, an IPv4 literal or a bracketed IPv6 literal."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
            return True
        except ValueError:
            return False
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in name.split("."))


def _check_peers(peers, source) -> None:
    _check_size(len(peers), f"{source}: the cluster")
    seen = {}
    for rank, address in enumerate(peers):
        host, sep, port = address.rpartition(":")
        if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise ValueError(f"{source}: peer {rank} address {address[:300]!r} is not 'host:port' with a "
                             "port in 1-65535")
        if not check_host(host):
            raise ValueError(f"{source}: peer {rank} address {address[:300]!r}: {host[:300]!r} is not a host "
                             "name (RFC 1123), an IPv4 address or a bracketed IPv6 address")
        key = (host.lower(), int(port))
        if key in seen:
            raise ValueError(
                f"{source}: duplicate address {address!r} for ranks {seen[key]} and {rank}; "
                "every worker needs its own host:port"
            )
        seen[key] = rank


def _check_size(size: int, what: str) -> None:
    if size > MAX_WORLD_SIZE:
        raise ValueError(f"{what}: {size} workers is more than distadam accepts ({MAX_WORLD_SIZE})")


def rank_in_range(rank: int, world_size: int, rank_name: str, size_name: str) -> None:
    if world_size < 1:
        raise ValueError(f"{size_name}={world_size}: the world size must be at least 1")
    if rank < 0 or rank >= world_size:
        raise ValueError(f"{rank_name}={rank} is out of range for {size_name}={world_size} (rank >= world size)")


def _int_var(env, name, source) -> int:
    # ASCII digits only: int() would also take '１', '٢', '1_0', '+1' and ' 1'.
    text = env[name]
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise ValueError(f"{source}: {name}={text[:100]!r} is not an integer (ASCII digits 0-9 only)")
    return int(text)


def _required_int(env, name, source, hint=None) -> int:
    if not env.get(name, ""):
        detail = f" ({hint})" if hint else ""
        raise ValueError(f"{source}: {name} is not set{detail}")
    return _int_var(env, name, source)


def _port_var(env, name, source) -> int:
    if not env.get(name, ""):
        return DEFAULT_PORT
    port = _int_var(env, name, source)
    if not 0 < port < 65536:
        raise ValueError(f"{source}: {name}={port} is not a port in 1-65535")
    return port


# ------------------------------------------------------------------- exposure
class ExposedServerWarning(UserWarning):
    """A TensorFlow gRPC server starts where nothing known confines it."""


def network_interfaces(pid="self") -> list:
    """Interface names of the network namespace ``pid`` is in (/proc/PID/net/dev)."""
    with open(f"/proc/{pid}/net/dev") as table:
        return [line.split(":", 1)[0].strip() for line in table.readlines()[2:] if ":" in line]


def exposure_warning(spec: ClusterSpec, env, interfaces=None) -> str | None:
    """Why this worker's collective server is reachable by anyone, or None
    when something known confines it. ``interfaces``: the network namespace's
    interface names (default: read from /proc; None where /proc has none)."""
    if not spec.is_distributed:
        return None
    confinement = env.get(CONFINEMENT_ENV, "").strip()
    if confinement:
        return None
    if interfaces is None:
        try:
            interfaces = network_interfaces()
        except OSError:
            interfaces = None
    if interfaces and all(name == "lo" for name in interfaces):
        return None  # a private network namespace: distadam launch's
    port = spec.peers[spec.rank].rsplit(":", 1)[1]
    where = f"interfaces {', '.join(interfaces)}" if interfaces else "every interface"
    return (
        f"TensorFlow's gRPC server for worker {spec.rank} listens on port {port} of {where} "
        f"(TensorFlow binds every address, whatever TF_CONFIG says) and authenticates no one: "
        "whoever reaches it can run code as this process. Confine it (a private network, a "
        "Kubernetes NetworkPolicy, a firewall) and set "
        f"{CONFINEMENT_ENV} to say what does; locally, use distadam launch."
    )


# ------------------------------------------------------------------- strategy
def strategy_from_env(
    communication_timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
    cluster: ClusterSpec | None = None,
):
    """The ``tf.distribute`` strategy for the environment this process runs in.

    * Several workers (any source above): ``MultiWorkerMirroredStrategy``,
      one replica per worker on CPU (all local GPUs per worker on GPU).
      ``communication_timeout`` (seconds) bounds every collective, so a stalled
      peer fails the step with ``DeadlineExceededError`` instead of hanging.
    * One worker: ``MirroredStrategy`` over the local GPUs, or over
      ``DISTADAM_LOGICAL_DEVICES`` logical CPU devices when that is set, or
      over the one CPU.

    Pass ``cluster`` when the script already called :func:`resolve_cluster`:
    under MPI resolving is itself a collective (the address rendezvous), so
    doing it twice costs a round trip and picks new ports.

    Call it before anything else touches TensorFlow devices: logical devices
    and the collective server can only be configured before the runtime starts.
    """
    import tensorflow as tf

    env = os.environ if environ is None else environ
    spec = resolve_cluster(env) if cluster is None else cluster
    logical_cpus = _logical_cpu_count(env)
    if logical_cpus > 1:
        _configure_logical_cpus(tf, logical_cpus)

    if spec.is_distributed:
        if logical_cpus > 1 and not tf.config.list_physical_devices("GPU"):
            raise ValueError(
                f"{LOGICAL_DEVICES_ENV}={logical_cpus} with {spec.world_size} workers: "
                "MultiWorkerMirroredStrategy drives one CPU device per worker, so extra logical "
                "CPUs would sit idle. Start more workers instead (distadam-launch --nproc)."
            )
        message = exposure_warning(spec, env)
        if message:
            warnings.warn(message, ExposedServerWarning, stacklevel=2)
        task = spec.tf_config["task"]
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(spec.tf_config["cluster"]),
            task_type=task["type"],
            task_id=task["index"],
            rpc_layer="grpc",
        )
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=communication_timeout
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in cpus])


def _logical_cpu_count(env) -> int:
    if not env.get(LOGICAL_DEVICES_ENV, ""):
        return 1
    count = _int_var(env, LOGICAL_DEVICES_ENV, "distadam")
    if count < 1:
        raise ValueError(f"{LOGICAL_DEVICES_ENV}={count}: need at least one device")
    if count > 64:  # distadam launch's --devices-per-worker bound
        raise ValueError(f"{LOGICAL_DEVICES_ENV}={count}: more than 64 logical devices only splits "
                         "the same CPU cores further")
    return count


def _configure_logical_cpus(tf, count: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        # The runtime is already up: fine if it already has these devices.
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != count:
            raise RuntimeError(
                f"{LOGICAL_DEVICES_ENV}={count} but TensorFlow already started with {existing} "
                "CPU device(s): call strategy_from_env() before any other TensorFlow work"
            ) from None
