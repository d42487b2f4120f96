"""Where every worker sits: N workers in groups of G consecutive ranks (one
copy of the sharded state per group), P consecutive ranks to a node.

Pure arithmetic, no TensorFlow: the step's communicators
(:class:`distadam.topology.Topology`), the backends that build subgroups
(tf.distribute, Horovod) and the planner's cost model (``distadam plan``,
which runs without TensorFlow) all read groups, positions and nodes from
this one object, so "which workers does a group hold" has one answer.

    grid = WorkerGrid(num_workers=8, group_size=4, workers_per_node=4)
    grid.group_of(5), grid.shard_of(5), grid.node_of(5)   # 1, 1, 1
    grid.groups()     # [[0, 1, 2, 3], [4, 5, 6, 7]]
    grid.positions()  # [[0, 4], [1, 5], [2, 6], [3, 7]]
"""

from __future__ import annotations

import dataclasses
import math

#: More workers than any job this code plans for (the planner's bound too);
#: keeps hostile counts from turning list-building into a memory bomb.
MAX_WORKERS = 1 << 20


def divisors(n: int) -> list:
    """Divisors of ``n`` in increasing order (trial division to sqrt(n))."""
    _check_count("n", n, MAX_WORKERS)
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def divisor_hint(n: int) -> str:
    """The divisors of ``n`` as an error message lists them (elided when many)."""
    found = divisors(n)
    if len(found) <= 16:
        return ", ".join(map(str, found))
    return ", ".join(map(str, found[:8])) + ", ..., " + ", ".join(map(str, found[-4:]))


def _check_count(name: str, value, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 1 <= value <= maximum:
        raise ValueError(f"{name} must be between 1 and {maximum}, got {value}")


def check_group_size(group_size, num_workers: int) -> int:
    """``group_size`` (None: all workers) checked against ``num_workers``:
    groups of consecutive workers must tile the job exactly."""
    if group_size is None:
        return num_workers
    _check_count("shard_group_size", group_size, MAX_WORKERS)
    if group_size > num_workers or num_workers % group_size:
        raise ValueError(
            f"shard_group_size={group_size} must divide the number of workers ({num_workers}): "
            "groups of consecutive workers hold one copy of the state each. "
            f"Possible values: [{divisor_hint(num_workers)}]"
        )
    return group_size


@dataclasses.dataclass(frozen=True)
class WorkerGrid:
    """N workers, groups of ``group_size`` consecutive ranks, and (when
    known) ``workers_per_node`` consecutive ranks to a machine.

    ``workers_per_node`` need not divide N when N fits on one node (a job
    smaller than a machine); otherwise nodes are full.
    """

    num_workers: int
    group_size: int
    workers_per_node: int | None = None

    def __post_init__(self):
        _check_count("number of workers", self.num_workers, MAX_WORKERS)
        check_group_size(self.group_size, self.num_workers)
        if self.workers_per_node is not None:
            _check_count("workers per node", self.workers_per_node, MAX_WORKERS)
            p = self.workers_per_node
            if self.num_workers > p and self.num_workers % p:
                raise ValueError(f"{self.num_workers} workers do not fill whole nodes of {p}: use a "
                                 f"multiple of {p} workers (or say how many share a node)")

    # ------------------------------------------------------------ groups
    @property
    def num_groups(self) -> int:
        """N / G: copies of the sharded state in the job."""
        return self.num_workers // self.group_size

    @property
    def hybrid(self) -> bool:
        """Several copies of the state (G < N)."""
        return self.group_size < self.num_workers

    def group_of(self, worker: int) -> int:
        """Which copy of the state ``worker`` helps hold."""
        return worker // self.group_size

    def shard_of(self, worker: int) -> int:
        """The shard ``worker`` holds: its position in its group."""
        return worker % self.group_size

    def groups(self) -> list:
        """The workers of each group, in rank order."""
        return [list(range(start, start + self.group_size)) for start in range(0, self.num_workers, self.group_size)]

    def positions(self) -> list:
        """The workers at each position across groups (one per group): the
        members of the all-reduce across groups."""
        return [list(range(p, self.num_workers, self.group_size)) for p in range(self.group_size)]

    # ------------------------------------------------------------- nodes
    @property
    def num_nodes(self) -> int:
        """Machines the job spans (1 when unknown)."""
        if self.workers_per_node is None:
            return 1
        return max(1, -(-self.num_workers // self.workers_per_node))

    def node_of(self, worker: int) -> int:
        return 0 if self.workers_per_node is None else worker // self.workers_per_node

    def group_placement(self) -> tuple:
        """(spans_nodes, fewest): whether some group spans machines, and the
        fewest members any spanning group has on one of its machines (G when
        none spans). All groups communicate at once, so the worst decides."""
        p, g = self.workers_per_node, self.group_size
        if p is None:
            return False, g
        spans, fewest = False, g
        # Group k starts at k*G; node boundaries repeat every lcm(G, P) ranks,
        # i.e. every P/gcd(G, P) groups: those cover every distinct case.
        for k in range(min(self.num_groups, p // math.gcd(g, p))):
            first, last = k * g, (k + 1) * g - 1
            if first // p == last // p:
                continue
            spans = True
            head = (first // p + 1) * p - first  # members on the first node
            tail = last - (last // p) * p + 1  # members on the last node
            middle = p if last // p - first // p > 1 else g
            fewest = min(fewest, head, tail, middle)
        return spans, fewest

    def across_placement(self) -> tuple:
        """(spans_nodes, members per node) of the all-reduce across groups
        (ranks j, j+G, j+2G, ...): one per node when G >= P, else P // G."""
        p = self.workers_per_node
        if p is None or self.num_workers <= p:
            return False, self.num_groups
        return True, max(1, p // self.group_size)

    def describe(self, where: str = "") -> str:
        """E.g. "8 worker(s) over <where>, 2 groups of 4, 4 per node"."""
        where = f" over {where}" if where else ""
        groups = f", {self.num_groups} groups of {self.group_size}" if self.hybrid else ""
        nodes = f", {self.workers_per_node} per node" if self.workers_per_node else ""
        return f"{self.num_workers} worker(s){where}{groups}{nodes}"
