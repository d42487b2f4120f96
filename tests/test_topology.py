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
    assert (topology.num_workers, topology.group_size, topology.num_groups, topology.hybrid) == (8, 8, 1, False)
    assert topology.local_shards() == [2, 3]


def test_groups_name_the_shard_each_worker_holds_and_its_process():
    topology = Topology.build(EightWorkersTwoPerProcess(), 4, environ={WORKERS_PER_NODE_ENV: "4"})
    assert (topology.num_workers, topology.group_size, topology.num_groups, topology.hybrid) == (8, 4, 2, True)
    # Worker w holds shard w % G in group w // G; this process drives 2 and 3.
    assert [topology.shard_of(w) for w in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [topology.group_of(w) for w in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
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
