"""Who talks to whom in one step: the communicators, each with one meaning.

A step uses two groups of workers, and before this object each caller picked
one per call from a backend whose ``num_workers`` meant the group size under
hybrid sharding while its eager all-reduce spanned every worker (a wrong pick
is silent when the group is all workers). :class:`Topology` names them once,
when the optimizer is built:

* ``everyone``: all N workers. Gradient rows of row-sparse variables,
  replicated buckets, the agreements of checkpoints and preemption, the
  build-time layout check, eager consolidation of model variables.
* ``shard_group``: the G workers that together hold one copy of the sharded
  state (``shard_group_size``; G = N by default, then it is ``everyone``).
  Sharded buckets are reduce-scattered to it (the sum still spans all N),
  norm statistics summed over it, parameters gathered within it.

and where every worker sits (:attr:`Topology.grid`, a
:class:`~distadam.worker_grid.WorkerGrid`: which group a worker is in, which
shard it holds, which machine it is on; the same arithmetic the backends use
to build subgroups and the planner to price them). ``workers_per_node`` is
what a launcher says about the machines; the step does not need it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from distadam.collectives import Collectives, hybrid
from distadam.worker_grid import WorkerGrid

#: Set by a launcher that knows how many workers share a machine (all nodes
#: equal); read once, when the optimizer is built.
WORKERS_PER_NODE_ENV = "DISTADAM_WORKERS_PER_NODE"


@dataclasses.dataclass(frozen=True)
class Topology:
    everyone: Collectives
    shard_group: Collectives
    workers_per_node: int | None = None

    @classmethod
    def build(cls, everyone: Collectives, shard_group_size=None, environ=None) -> "Topology":
        """The topology of ``everyone`` sharded over groups of
        ``shard_group_size`` consecutive workers (None: one group of all;
        ``"auto"``: :func:`auto_group_size`)."""
        per_node = workers_per_node(everyone.num_workers, environ)
        if shard_group_size == AUTO:
            shard_group_size = auto_group_size(everyone.num_workers, per_node)
        shard_group = hybrid.shard_group(everyone, shard_group_size)
        return cls(everyone, shard_group, per_node)

    @property
    def grid(self) -> WorkerGrid:
        """N, G and workers per node: where every worker sits."""
        return WorkerGrid(self.everyone.num_workers, self.shard_group.num_workers, self.workers_per_node)

    @property
    def num_workers(self) -> int:
        """N: every worker of the job."""
        return self.everyone.num_workers

    @property
    def group_size(self) -> int:
        """G: workers sharing one copy of the state (= the number of shards)."""
        return self.shard_group.num_workers

    def local_workers(self) -> list:
        """Indices (among all N) of the workers this process drives."""
        return self.everyone.local_worker_indices()

    def local_shards(self) -> list:
        """The shard each of this process's workers holds, in the same order."""
        return [self.grid.shard_of(worker) for worker in self.local_workers()]

    @property
    def workers_per_process(self) -> int:
        return len(self.local_workers())

    @property
    def process_index(self) -> int:
        """This process's index (processes drive equally many consecutive workers)."""
        return min(self.local_workers()) // self.workers_per_process

    @property
    def num_processes(self) -> int:
        return self.num_workers // self.workers_per_process

    def check_same_layout(self, layout) -> None:
        """Build-time check (one tiny eager all-reduce over everyone) that
        every worker laid out the same variables; a mismatch would otherwise
        surface as a shape error in the first step's collectives or, worse,
        as silently mixed shards."""
        summed = self.everyone.all_reduce_eagerly(np.asarray(layout.agreement_terms(), np.float64))
        if not layout.agrees_with(summed, self.num_workers):
            raise ValueError(
                "distadam: workers disagree on the trainable variables (number, shapes, "
                f"dtypes or order): this worker has {layout.summary()}. "
                "Every worker must build the same model with the same trainable flags."
            )

    def describe(self) -> str:
        return self.grid.describe(self.everyone.name)


#: ``ShardedAdam(shard_group_size="auto")``.
AUTO = "auto"


def auto_group_size(num_workers: int, per_node):
    """G for ``shard_group_size="auto"``: the workers of one node when the
    job spans several (known from ``DISTADAM_WORKERS_PER_NODE``, which
    ``distadam launch --nodes`` sets), else all workers (None). Why: then the
    reduce-scatter and all-gather stay inside a node and only 1/G of each
    bucket crosses the network, once each way; across emulated nodes this
    was the fastest layout measured (docs/benchmarks/emulated-cluster.md:
    0.82x Keras Adam's step against 1.15x for G = N, 2 x 2 workers at
    200 Mbit/s), and on one node it is G = N."""
    if per_node and num_workers > per_node:
        return per_node
    return None


def workers_per_node(num_workers: int, environ=None):
    """``DISTADAM_WORKERS_PER_NODE`` checked against the job (a positive
    integer dividing the number of workers), or None when not set."""
    raw = (os.environ if environ is None else environ).get(WORKERS_PER_NODE_ENV)
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if not text.isdigit() or int(text) < 1 or num_workers % int(text):
        raise ValueError(f"{WORKERS_PER_NODE_ENV}={raw[:32]!r} must be a positive integer dividing "
                         f"the number of workers ({num_workers})")
    return int(text)
