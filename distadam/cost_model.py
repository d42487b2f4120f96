"""Alpha-beta model of ShardedAdam's communication time per optimizer update,
for Keras Adam, ShardedAdam over all N workers, and hybrid sharding
(``ShardedAdam(shard_group_size=G)``). Pure Python: ``distadam plan`` imports
it without TensorFlow.

One collective
--------------
A collective over ``n`` members on a buffer of S bytes (the full buffer: the
all-reduce's input, the reduce-scatter's input, the all-gather's output) with
per-step latency α and per-worker bandwidth b (β = 1/b seconds per byte):

==================  ====================  ==========================
algorithm           latency               bandwidth
==================  ====================  ==========================
ring all-reduce     2(n−1)·α              2(n−1)/n · S · β
ring reduce-scatter (n−1)·α               (n−1)/n · S · β
ring all-gather     (n−1)·α               (n−1)/n · S · β
pairwise all-to-all (n−1)·α               (n−1)/n · S · β
==================  ====================  ==========================

(Thakur, Rabenseifner and Gropp 2005, "Optimization of collective
communication operations in MPICH".) This table is the one byte model of the
project: the time model below, the planner's byte counts (:func:`bytes_sent`)
and the benchmarks' traced-collective counts (benchmarks/harness/collectives.py)
all read it. ShardedAdam's
tf.distribute backend reduce-scatters on CPU as an all-to-all plus a local
sum: the same terms as a ring reduce-scatter.

Two-level topology
------------------
Workers sit ``gpus_per_node`` to a node, in rank order (ranks 0..P−1 on node
0, ...); N must fill whole nodes when it exceeds P. Inside a node a worker
has its own link (NVLink, PCIe, loopback): ``intra_bandwidth`` per worker and
direction, ``intra_latency`` per step. Between nodes each node has
``inter_bandwidth`` in all (the sum of its NICs, one direction) and
``inter_latency`` per step. A collective whose members all sit on one node
runs at intra-node rates. A collective whose members span nodes runs at
inter-node rates: every ring step waits for the slowest hop, which crosses
nodes, so it pays ``inter_latency`` per step; and its bandwidth is bounded by
the node's network, **shared evenly by the node's workers**: a collective
with k members on a node gets k/P of that node's ``inter_bandwidth`` (NCCL
runs a ring over k GPUs as k channels, one per NIC; on a single shared NIC,
as on the Ethernet preset, the node's members take turns), capped by the
intra-node link, and the node with the fewest members bounds it. Why shared:
in every scheme below, all P workers of a node communicate across nodes at
the same time (one flat ring uses all of them; hybrid sharding runs P
concurrent cross-group all-reduces, one per shard index on the node), so no
collective can have a node's network to itself. Consequences: a flat ring
over N > P workers moves at min(intra, inter_bandwidth) per worker (all P
members of each node); the cross-group all-reduce of hybrid sharding with
G ≥ P has one member per node and moves at inter_bandwidth / P.

One optimizer update
--------------------
* Keras Adam under MultiWorkerMirroredStrategy: one packed all-reduce of all
  gradients over the N workers (measured: one launch per step whatever the
  variable count, benchmarks/README.md), one set of latency terms.
* ShardedAdam, per sharded bucket of S elements (padded to a multiple of G as
  the optimizer pads it), in sequence: reduce-scatter within the group of G
  consecutive workers; all-reduce of the S/G shard across the N/G groups
  (the workers holding the same shard index); all-gather of the updated shard
  within the group. G = N is today's ShardedAdam (no cross-group term); G = 1
  is one all-reduce per bucket. A replicated bucket (``replicate=``,
  ``min_shard_elements``) is one all-reduce over N. Every bucket pays its own
  latency terms: many small buckets cost latency, which is what
  ``bucket_elements`` trades against overlap with the backward pass.
* Nothing overlaps: neither buckets with each other nor communication with
  the backward pass. The prediction is the communication time on the step's
  critical path when nothing hides it, an upper bound on what it adds to a
  step. Row-sparse gradients are counted dense; per-collective launch
  overheads beyond α are not modelled.
* With gradient accumulation over A micro-steps, ShardedAdam reduces every
  micro-step (reduce-scatter and cross-group all-reduce) and all-gathers
  once; Keras' all-reduce is counted once per update, as in the byte counts.

Recommendation: the G with the least predicted time, where times within
``tolerance`` (default 2 %) of the fastest count as equal and the largest such
G (least memory) wins: the model does not resolve smaller differences (the
local calibration's errors are larger). With a per-device memory budget, only
G whose model states (parameters, gradients, optimizer state) fit are
candidates.
"""

from __future__ import annotations

import dataclasses
import math

from distadam import worker_grid

# Bounds on user-supplied parameters: past every real network, small enough
# that products stay exact-ish in a float64 and finite.
MAX_BANDWIDTH = 1e15  # bytes/s (a petabyte per second)
MIN_BANDWIDTH = 1e3  # bytes/s (a kilobyte per second)
MAX_LATENCY = 10.0  # seconds per step
MAX_GPUS_PER_NODE = 1024
MAX_WORKERS = 10**6
DEFAULT_TOLERANCE = 0.02

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")

# Optimizer state kinds, named once, in ShardedAdam's creation order: the
# optimizer's own name (``ShardedAdam.sharded_state.kinds``, the names
# ``gather_full_state`` takes, Keras Adam's slot names) -> the short key the
# planner prints and writes to its JSON (``m``, ``v``, ...). Pure Python, so
# the optimizer and the TensorFlow-free planner can both read it;
# tests/test_planner.py checks it against a built ShardedAdam.
STATE_KINDS = {"momentum": "m", "velocity": "v", "velocity_hat": "v_hat", "average": "ema",
               "accumulator": "accumulator"}


def state_kinds(amsgrad: bool = False, ema: bool = False, accumulation_steps: int | None = None) -> list:
    """The optimizer's state kinds for these options, in its order."""
    optional = {"velocity_hat": amsgrad, "average": ema, "accumulator": bool(accumulation_steps)}
    return [kind for kind in STATE_KINDS if optional.get(kind, True)]


@dataclasses.dataclass(frozen=True)
class Network:
    """Two-level topology: SI units (seconds, bytes per second)."""

    gpus_per_node: int
    intra_latency: float  # s per step, inside a node
    intra_bandwidth: float  # bytes/s per worker and direction, inside a node
    inter_latency: float  # s per step, between nodes
    inter_bandwidth: float  # bytes/s per node and direction (all its NICs)
    name: str = "custom"
    description: str = ""

    def __post_init__(self):
        validate_network(self)

    def replace(self, **changes) -> "Network":
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes and "name" not in changes:
            changes["name"] = f"{self.name} (overridden: {', '.join(sorted(changes))})"
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_number(name, value, low, high, *, low_inclusive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not (value >= low if low_inclusive else value > low) or value > high:
        bound = "from" if low_inclusive else "above"
        raise ValueError(f"{name} must be {bound} {low:g} up to {high:g}, got {value!r}")


def _check_count(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


def validate_network(net: Network) -> None:
    _check_count("gpus_per_node", net.gpus_per_node, 1, MAX_GPUS_PER_NODE)
    _check_number("intra_latency", net.intra_latency, 0.0, MAX_LATENCY)
    _check_number("inter_latency", net.inter_latency, 0.0, MAX_LATENCY)
    _check_number("intra_bandwidth", net.intra_bandwidth, MIN_BANDWIDTH, MAX_BANDWIDTH)
    _check_number("inter_bandwidth", net.inter_bandwidth, MIN_BANDWIDTH, MAX_BANDWIDTH)


GB = 1e9
US = 1e-6
# benchmarks/results/results.json["collectives"]["model"] (alpha_s,
# beta_s_per_byte), rounded to 5 digits; tests/test_cost_model.py checks they
# agree, so a new benchmark run must update them.
LOCAL_ALPHA = 2.8572e-3
LOCAL_BETA = 4.8643e-9

# Approximate vendor figures (peak link rates, one direction), not
# measurements; real collectives reach some 70-90 % of them. Latencies are
# typical per-hop figures for the transport (NVLink/PCIe peer copies a few
# microseconds, InfiniBand RDMA ~5 us with software, kernel TCP tens of us).
PRESETS = {
    "a100-ib": Network(
        8, 2 * US, 300 * GB, 5 * US, 200 * GB, "a100-ib",
        "8x A100 SXM, NVLink 3 (600 GB/s per GPU both directions: 300 GB/s each way); "
        "8x 200 Gb/s HDR InfiniBand per node (200 GB/s per node)"),
    "h100-ib": Network(
        8, 2 * US, 450 * GB, 5 * US, 400 * GB, "h100-ib",
        "8x H100 SXM, NVLink 4 (900 GB/s per GPU both directions: 450 GB/s each way); "
        "8x 400 Gb/s NDR InfiniBand per node (400 GB/s per node)"),
    "pcie-eth": Network(
        8, 5 * US, 32 * GB, 30 * US, 12.5 * GB, "pcie-eth",
        "8 GPUs on PCIe 4.0 x16 (32 GB/s each way); one 100 Gb/s Ethernet link per node (12.5 GB/s, TCP)"),
    # Fitted by benchmarks/run_all.py (collective_worker.py under
    # `distadam launch`, 2-4 processes, MultiWorkerMirroredStrategy over
    # loopback gRPC on a 2-core host): see fit_alpha_beta and
    # benchmarks/README.md. One host: the inter-node figures equal the
    # intra-node ones times the workers per node, so a ring "spanning nodes"
    # moves at the same per-worker rate and nothing changes past 4 workers
    # (an extrapolation: only 2-4 processes were measured).
    "local-cpu": Network(
        4, LOCAL_ALPHA, 1 / LOCAL_BETA, LOCAL_ALPHA, 4 / LOCAL_BETA, "local-cpu",
        "this machine: processes over loopback gRPC (TensorFlow's CPU collectives), fitted to "
        "benchmarks/results/results.json"),
}

# `distadam launch --nodes K --inter-node-rate R` (distadam.emulated_cluster):
# the TCP payload one shaped veth link carried, measured with
# benchmarks/emulated_cluster.py (docs/guides/emulated-cluster.md), Mbit/s.
EMULATED_LINK_MBIT = {"200mbit": 191.0, "1gbit": 955.0}
EMULATED_WORKERS_PER_NODE = 2


def emulated_network(rate: str, workers_per_node: int = EMULATED_WORKERS_PER_NODE) -> Network:
    """The emulated cluster as a planner network: inside a node the
    local-cpu fit (the workers of a node talk over loopback gRPC on the same
    2 cores), between nodes the link's measured payload rate per node and
    direction, and local-cpu's per-step latency (TensorFlow's own overhead:
    the emulation adds no latency, a veth hop costs microseconds)."""
    return Network(workers_per_node, LOCAL_ALPHA, 1 / LOCAL_BETA, LOCAL_ALPHA,
                   EMULATED_LINK_MBIT[rate] * 1e6 / 8, f"emulated-{rate}",
                   f"`distadam launch --nodes K --inter-node-rate {rate}` on this machine: "
                   f"{workers_per_node} workers per emulated node on loopback gRPC (the local-cpu fit), "
                   f"nodes joined by a tbf-shaped veth link that carried {EMULATED_LINK_MBIT[rate]:g} Mbit/s "
                   "of TCP payload, no added latency; benchmarks/emulated_cluster_steps.py")


PRESETS.update({f"emulated-{rate}": emulated_network(rate) for rate in EMULATED_LINK_MBIT})


# ------------------------------------------------------------- collectives
# The table above in one place: ring phases per collective. Each phase is
# n-1 steps, in each of which a member sends 1/n of the full buffer S; a ring
# all-reduce is two phases (a reduce-scatter, then an all-gather).
_RING_PHASES = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "all_to_all": 1}


def latency_steps(kind: str, n: int) -> int:
    """Latency terms (ring steps) of one collective over ``n`` members."""
    _check_kind(kind)
    _check_count("members", n, 1, MAX_WORKERS)
    return _RING_PHASES[kind] * (n - 1)


def bytes_factor(kind: str, n: int) -> float:
    """Bytes each member sends, as a multiple of the full buffer S."""
    _check_kind(kind)
    _check_count("members", n, 1, MAX_WORKERS)
    return _RING_PHASES[kind] * (n - 1) / n


def bytes_sent(kind: str, n: int, input_bytes: float) -> float:
    """Bytes one member sends in one ring collective over ``n`` members, from
    its own input (what a traced op or a backend call sees): the full buffer S
    for an all-reduce, reduce-scatter or all-to-all, its own shard S/n for an
    all-gather. ``broadcast`` (the root sends its buffer once down a pipelined
    chain) is counted for the benchmarks' traced graphs only: no step of the
    time model broadcasts, so :data:`KINDS` leaves it out."""
    if kind == "broadcast":
        _check_count("members", n, 1, MAX_WORKERS)
        return 0.0 if n == 1 else float(input_bytes)
    _check_kind(kind)
    _check_count("members", n, 1, MAX_WORKERS)
    if kind == "all_gather":
        # (n-1)/n of the gathered buffer S = n * input: whole bytes in, whole
        # bytes out, without rounding through the fraction.
        return input_bytes * (n - 1)
    # Multiplied before dividing: one rounding, so byte counts of whole
    # buffers come out exact where they can.
    return _RING_PHASES[kind] * input_bytes * (n - 1) / n


# An IndexedSlices gradient travels as its rows' values plus one int32 index
# per row (TensorFlow and Horovod all-gather both).
INDEX_BYTES = 4


def sparse_rows_bytes(rows: int, row_elements: int, itemsize: int) -> int:
    """Bytes one worker contributes for ``rows`` rows of a sparse gradient."""
    return rows * (row_elements * itemsize + INDEX_BYTES)


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; expected one of {', '.join(KINDS)}")


def collective_time(kind: str, n: int, nbytes: float, latency: float, bandwidth: float) -> float:
    """Seconds for one collective over ``n`` members on a buffer of ``nbytes``."""
    _check_number("nbytes", nbytes, 0.0, 1e18)
    _check_number("latency", latency, 0.0, MAX_LATENCY)
    _check_number("bandwidth", bandwidth, MIN_BANDWIDTH, MAX_BANDWIDTH)
    return latency_steps(kind, n) * latency + bytes_factor(kind, n) * nbytes / bandwidth


# --------------------------------------------------------------- placement
def check_workers(workers: int, net: Network) -> None:
    _check_count("workers", workers, 1, MAX_WORKERS)
    p = net.gpus_per_node
    if workers > p and workers % p:
        raise ValueError(f"{workers} workers do not fill whole nodes of {p} GPUs: use a multiple of "
                         f"{p} (or set the GPUs per node)")


def check_group_size(workers: int, group_size: int) -> None:
    _check_count("shard group size G", group_size, 1, MAX_WORKERS)
    if workers % group_size:
        raise ValueError(f"shard group size G={group_size} must divide the {workers} workers "
                         f"(divisors: {worker_grid.divisor_hint(workers)})")


def divisors(n: int) -> list:
    """Divisors of ``n`` in increasing order."""
    _check_count("n", n, 1, MAX_WORKERS)
    return worker_grid.divisors(n)


def _link(net: Network, spans_nodes: bool, members_per_node: int) -> tuple:
    """(latency, per-worker bandwidth) of a collective (see module doc)."""
    if not spans_nodes:
        return net.intra_latency, net.intra_bandwidth
    share = net.inter_bandwidth * members_per_node / net.gpus_per_node
    return net.inter_latency, min(net.intra_bandwidth, share)


def _grid(workers: int, group_size: int, net: Network) -> worker_grid.WorkerGrid:
    # Ranks fill nodes in order (module doc); a job smaller than a node is on one.
    return worker_grid.WorkerGrid(workers, group_size, net.gpus_per_node)


def latency_bandwidth_product(net: Network) -> float:
    """Bytes a link could have moved during one latency step, for the most
    latency-bound link of ``net`` (inside a node, or a ring spanning nodes
    with a whole node's workers): the size below which a collective's fixed
    latency dominates its transfer."""
    return max(latency * bandwidth for latency, bandwidth in
               (_link(net, False, net.gpus_per_node), _link(net, True, net.gpus_per_node)))


#: Largest latency-bandwidth product among the presets: sizing buckets for it
#: keeps latency small on every network the planner knows.
REFERENCE_LATENCY_BYTES = max(latency_bandwidth_product(net) for net in PRESETS.values())

#: Latency's allowed share of a collective's transfer time when buckets are
#: sized automatically (ShardedAdam(bucket_elements="auto")).
AUTO_LATENCY_SHARE = 0.05


def auto_bucket_bytes(num_workers: int) -> float:
    """Bytes per bucket that keep ShardedAdam's communication within
    ``1 + AUTO_LATENCY_SHARE`` of one all-reduce of everything (Keras Adam's)
    over ``num_workers``, on any preset network.

    Why: a ring reduce-scatter + all-gather over N moves the bytes of one
    ring all-reduce and pays its 2(N-1) latency steps; B buckets pay them B
    times. The extra (B-1)·2(N-1)α, against the all-reduce's transfer
    2(N-1)/N·S/β, is below N·αβ/b for buckets of b bytes (B-1 < S/b): at
    most the share when b >= N·αβ/share, with αβ the largest product any
    preset has (:data:`REFERENCE_LATENCY_BYTES`)."""
    _check_count("num_workers", num_workers, 1, MAX_WORKERS)
    return num_workers * REFERENCE_LATENCY_BYTES / AUTO_LATENCY_SHARE


def group_link(workers: int, group_size: int, net: Network) -> tuple:
    """Link of the collectives inside the groups of ``group_size``
    consecutive ranks: the worst group decides, since all run at once and
    the step waits for the last."""
    return _link(net, *_grid(workers, group_size, net).group_placement())


def across_link(workers: int, group_size: int, net: Network) -> tuple:
    """Link of the all-reduce across groups (ranks j, j+G, j+2G, ...)."""
    return _link(net, *_grid(workers, group_size, net).across_placement())


# -------------------------------------------------------------- one update
@dataclasses.dataclass(frozen=True)
class BucketShape:
    """``count`` identical buckets of ``elements`` elements of ``itemsize``
    bytes (their order does not matter: nothing overlaps in the model)."""

    count: int
    elements: int
    itemsize: int
    replicated: bool = False


def padded_elements(elements: int, group_size: int, shard_alignment: int = 1) -> int:
    """A sharded bucket's size once padded to G equal, aligned shards (as
    distadam.partition.plan_layout pads it)."""
    shard = max(1, -(-elements // group_size))
    return -(-shard // shard_alignment) * shard_alignment * group_size


def keras_adam_time(param_bytes: float, workers: int, net: Network) -> dict:
    """One packed all-reduce of every gradient over the N workers."""
    check_workers(workers, net)
    latency, bandwidth = group_link(workers, workers, net)
    seconds = collective_time("all_reduce", workers, param_bytes, latency, bandwidth)
    return {"seconds": seconds, "phases": {"all_reduce": seconds},
            "collectives": 1 if workers > 1 else 0,
            "bytes_sent": bytes_factor("all_reduce", workers) * param_bytes}


def sharded_time(buckets, workers: int, group_size: int, net: Network, *, shard_alignment: int = 1,
                 micro_steps: int = 1) -> dict:
    """ShardedAdam(shard_group_size=G) per optimizer update (see module doc)."""
    check_workers(workers, net)
    check_group_size(workers, group_size)
    _check_count("micro_steps", micro_steps, 1, 10**6)
    _check_count("shard_alignment", shard_alignment, 1, 1 << 20)
    g, m = group_size, workers // group_size
    inside = group_link(workers, g, net)
    across = across_link(workers, g, net)
    everyone = group_link(workers, workers, net)
    phases = {"reduce_scatter": 0.0, "all_reduce_across": 0.0, "all_gather": 0.0, "all_reduce_replicated": 0.0}
    sent = collectives = 0
    for b in buckets:
        _check_count("bucket count", b.count, 1, 10**12)
        _check_count("bucket elements", b.elements, 1, 10**15)
        if b.replicated:
            nbytes = b.elements * b.itemsize
            phases["all_reduce_replicated"] += b.count * micro_steps * collective_time(
                "all_reduce", workers, nbytes, *everyone)
            sent += b.count * micro_steps * bytes_factor("all_reduce", workers) * nbytes
            collectives += b.count * micro_steps * (workers > 1)
            continue
        nbytes = padded_elements(b.elements, g, shard_alignment) * b.itemsize
        rs = collective_time("reduce_scatter", g, nbytes, *inside)
        ar = collective_time("all_reduce", m, nbytes / g, *across)
        ag = collective_time("all_gather", g, nbytes, *inside)
        phases["reduce_scatter"] += b.count * micro_steps * rs
        phases["all_reduce_across"] += b.count * micro_steps * ar
        phases["all_gather"] += b.count * ag
        sent += b.count * (micro_steps * (bytes_factor("reduce_scatter", g) * nbytes
                                          + bytes_factor("all_reduce", m) * nbytes / g)
                           + bytes_factor("all_gather", g) * nbytes)
        collectives += b.count * (micro_steps * ((g > 1) + (m > 1)) + (g > 1))
    return {"seconds": sum(phases.values()), "phases": phases, "collectives": collectives, "bytes_sent": sent,
            "links": {"inside_group": _describe(inside), "across_groups": _describe(across)}}


def _describe(link):
    return {"latency_s": link[0], "bandwidth_bytes_per_s": link[1]}


def recommend(options, memory_budget: float | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Pick G from ``options``: dicts with ``group_size``, ``seconds`` and
    ``total_bytes`` (model states per worker). Returns the chosen option's
    G (None if nothing fits) and the reason, in words."""
    _check_number("tolerance", tolerance, 0.0, 1.0)
    if memory_budget is not None:
        _check_number("memory budget", memory_budget, 0.0, 1e18, low_inclusive=False)
    options = list(options)
    if not options:
        raise ValueError("no shard group sizes to choose from")
    fits = [o for o in options if memory_budget is None or o["total_bytes"] <= memory_budget]
    if not fits:
        least = min(options, key=lambda o: o["total_bytes"])
        return {"group_size": None,
                "reason": f"no G fits {memory_budget:.4g} bytes per device: the least memory is "
                          f"G={least['group_size']} with {least['total_bytes']:.4g} bytes of model states (more workers, "
                          f"--master-weights off, or a smaller dtype would help)"}
    fastest = min(o["seconds"] for o in fits)
    near = [o for o in fits if o["seconds"] <= fastest * (1 + tolerance)]
    best = max(near, key=lambda o: o["group_size"])
    overall = min(options, key=lambda o: (o["seconds"], -o["group_size"]))
    parts = [f"G={best['group_size']} is the fastest predicted"]
    if len(near) > 1:
        parts.append(f" within {tolerance:.0%} ({len(near)} such G; the largest holds the least state)")
    if memory_budget is not None:
        parts.append(f" among the {len(fits)} of {len(options)} G whose model states fit {memory_budget:.4g} bytes")
        if overall["group_size"] != best["group_size"] and overall["seconds"] < fastest:
            parts.append(f"; G={overall['group_size']} would be faster ({overall['seconds']:.4g} s) "
                         "but does not fit")
    return {"group_size": best["group_size"], "seconds": best["seconds"], "reason": "".join(parts)}


# ------------------------------------------------------------ calibration
def fit_alpha_beta(samples) -> tuple:
    """Least-squares α (s per step) and β (s per byte) from measured
    collectives, ``samples`` = (kind, members, full buffer bytes, seconds).

    Each sample predicts t = steps·α + bytes·β (the table above). Sizes span
    four orders of magnitude, so plain least squares would fit the largest
    buffers only: residuals are weighted by 1/t, i.e. the fit minimises the
    sum of squared *relative* errors, which is the quantity reported. Two
    unknowns: the 2x2 normal equations are solved directly; a negative
    coefficient (no latency or no bandwidth term visible in the data) is
    clamped to 0 and the other refitted alone."""
    rows = []
    for kind, n, nbytes, seconds in samples:
        _check_number("measured seconds", seconds, 0.0, 1e6, low_inclusive=False)
        _check_number("nbytes", nbytes, 0.0, 1e18)
        if n < 2:
            continue  # a one-member collective costs nothing: no information
        rows.append((latency_steps(kind, n) / seconds, bytes_factor(kind, n) * nbytes / seconds))
    if len(rows) < 2:
        raise ValueError("need at least two measured collectives with 2 or more members to fit alpha and beta")
    saa = sum(a * a for a, _ in rows)
    sbb = sum(b * b for _, b in rows)
    sab = sum(a * b for a, b in rows)
    sa = sum(a for a, _ in rows)  # right-hand side: each weighted t/t = 1
    sb = sum(b for _, b in rows)
    det = saa * sbb - sab * sab
    alpha = beta = -1.0
    if det > 1e-12 * saa * sbb:
        alpha = (sa * sbb - sb * sab) / det
        beta = (sb * saa - sa * sab) / det
    if alpha < 0 or beta < 0 or det <= 1e-12 * saa * sbb:
        # One term alone: keep whichever single-term fit leaves less error.
        only_alpha = (sa / saa, 0.0) if saa > 0 else None
        only_beta = (0.0, sb / sbb) if sbb > 0 else None
        candidates = [c for c in (only_alpha, only_beta) if c]
        alpha, beta = min(candidates, key=lambda c: sum((a * c[0] + b * c[1] - 1) ** 2 for a, b in rows))
    return alpha, beta


def predict(kind: str, n: int, nbytes: float, alpha: float, beta: float) -> float:
    """Predicted seconds of one collective among workers of one host."""
    return latency_steps(kind, n) * alpha + bytes_factor(kind, n) * nbytes * beta
