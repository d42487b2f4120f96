"""The communicators of a step, each with one meaning (issue 23): all
workers, the shard group, and the arithmetic between them."""

import numpy as np
import pytest

from distadam.collectives import Collectives
from distadam.topology import WORKERS_PER_NODE_ENV, Topology, workers_per_node


class EightWorkersTwoPerProcess(Collectives):
    """Process 1 of a job of 8 workers, 2 per process (workers 2 and 3)."""

    name = "fake"
    num_workers = 8

    def worker_index(self):
        return 2

    def local_worker_indices(self):
        return [2, 3]

    def _reduce_scatter_sum(self, flat, name):
        return flat

    def _all_reduce_sum(self, values, name):
        return values

    def _all_gather(self, shard, name):
        return shard

    def _all_gather_rows(self, rows, name):
        return rows

    def all_reduce_eagerly(self, values):
        return np.asarray(values) * self.num_workers

    def all_gather_eagerly(self, variables):
        return [np.asarray(v) for v in variables]


def test_one_group_of_everyone_is_everyone():
    backend = EightWorkersTwoPerProcess()
    topology = Topology.build(backend, None, environ={})
    assert topology.shard_group is topology.everyone is backend
    assert (topology.num_workers, topology.group_size, topology.grid.num_groups, topology.grid.hybrid) == (8, 8, 1, False)
    assert topology.local_shards() == [2, 3]


def test_groups_name_the_shard_each_worker_holds_and_its_process():
    topology = Topology.build(EightWorkersTwoPerProcess(), 4, environ={WORKERS_PER_NODE_ENV: "4"})
    assert (topology.num_workers, topology.group_size, topology.grid.num_groups, topology.grid.hybrid) == (8, 4, 2, True)
    # Worker w holds shard w % G in group w // G; this process drives 2 and 3.
    assert [topology.grid.shard_of(w) for w in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [topology.grid.group_of(w) for w in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topology.local_workers() == [2, 3] and topology.local_shards() == [2, 3]
    assert (topology.process_index, topology.num_processes, topology.workers_per_process) == (1, 4, 2)
    assert topology.shard_group.num_workers == 4 and topology.everyone.num_workers == 8
    assert topology.describe() == "8 worker(s) over fake, 2 groups of 4, 4 per node"


def test_workers_per_node_is_checked_against_the_job():
    assert workers_per_node(8, {}) is None
    assert workers_per_node(8, {WORKERS_PER_NODE_ENV: " 2 "}) == 2
    for bad in ("3", "0", "-2", "two", "1e3", "9"):
        with pytest.raises(ValueError, match=WORKERS_PER_NODE_ENV):
            workers_per_node(8, {WORKERS_PER_NODE_ENV: bad})


# ------------------------------------------------------------ WorkerGrid
from distadam import cost_model  # noqa: E402
from distadam.worker_grid import WorkerGrid, check_group_size, divisors  # noqa: E402


def test_topology_grid_is_the_arithmetic_the_backends_and_the_planner_use():
    topology = Topology.build(EightWorkersTwoPerProcess(), 4, environ={WORKERS_PER_NODE_ENV: "4"})
    assert topology.grid == WorkerGrid(8, 4, 4)
    grid = topology.grid
    assert grid.groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert grid.positions() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [grid.node_of(w) for w in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert grid.num_nodes == 2
    # Groups of one node's workers stay on it; the across-group all-reduce
    # spans the nodes with one member on each.
    assert grid.group_placement() == (False, 4) and grid.across_placement() == (True, 1)


def _placement_by_enumeration(n, g, p):
    """The definition, worker by worker: does some group span nodes, and the
    fewest members a spanning group has on one of its nodes."""
    spans, fewest = False, g
    for members in WorkerGrid(n, g).groups():
        per_node = {}
        for w in members:
            per_node[w // p] = per_node.get(w // p, 0) + 1
        if len(per_node) > 1:
            spans, fewest = True, min(fewest, *per_node.values())
    return spans, fewest


@pytest.mark.parametrize("n", [1, 2, 6, 8, 12, 24, 36])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 6, 8])
def test_group_placement_matches_enumerating_every_group(n, p):
    if n > p and n % p:
        with pytest.raises(ValueError, match="do not fill whole nodes"):
            WorkerGrid(n, n, p)
        return
    for g in divisors(n):
        assert WorkerGrid(n, g, p).group_placement() == _placement_by_enumeration(n, g, p), (n, g, p)


def test_cost_model_links_come_from_the_grid():
    net = cost_model.PRESETS["a100-ib"]
    for n, g in ((64, 8), (64, 4), (64, 16), (8, 8)):
        grid = WorkerGrid(n, g, net.gpus_per_node)
        inside, across = cost_model.group_link(n, g, net), cost_model.across_link(n, g, net)
        assert (inside[0] == net.inter_latency) is grid.group_placement()[0]
        assert (across[0] == net.inter_latency) is grid.across_placement()[0]


@pytest.mark.parametrize("bad, error, match", [
    (dict(num_workers=0, group_size=1), ValueError, "number of workers"),
    (dict(num_workers=8, group_size=3), ValueError, r"must divide the number of workers \(8\).*1, 2, 4, 8"),
    (dict(num_workers=8, group_size=16), ValueError, "must divide"),
    (dict(num_workers=8, group_size=2.0), TypeError, "integer"),
    (dict(num_workers=True, group_size=1), TypeError, "integer"),
    (dict(num_workers=8, group_size=8, workers_per_node=3), ValueError, "do not fill whole nodes of 3"),
    (dict(num_workers=8, group_size=8, workers_per_node=0), ValueError, "workers per node"),
    (dict(num_workers=1 << 40, group_size=1), ValueError, "between 1 and"),
])
def test_grid_refuses_what_cannot_be_laid_out(bad, error, match):
    with pytest.raises(error, match=match):
        WorkerGrid(**bad)


def test_group_size_none_means_everyone_and_small_jobs_fit_one_node():
    assert check_group_size(None, 6) == 6
    assert WorkerGrid(2, 2, 8).num_nodes == 1 and WorkerGrid(2, 2, 8).group_placement() == (False, 2)
    assert WorkerGrid(4, 2).num_nodes == 1 and WorkerGrid(4, 2).across_placement() == (False, 2)


def test_auto_group_size_is_one_node_when_the_job_spans_several():
    backend = EightWorkersTwoPerProcess()
    spans = Topology.build(backend, "auto", environ={WORKERS_PER_NODE_ENV: "4"})
    assert spans.group_size == 4 and spans.grid == WorkerGrid(8, 4, 4)
    # One node, or nothing known about nodes: all workers, as None.
    for environ in ({WORKERS_PER_NODE_ENV: "8"}, {}):
        assert Topology.build(backend, "auto", environ=environ).shard_group is backend


def test_auto_group_size_survives_the_config_and_bad_values_name_it():
    from distadam import ShardedAdam

    opt = ShardedAdam(shard_group_size="auto")
    assert ShardedAdam.from_config(opt.get_config()).shard_group_size == "auto"
    with pytest.raises(ValueError, match=r"shard_group_size.*\"auto\": the workers of one node"):
        ShardedAdam(shard_group_size="node")
