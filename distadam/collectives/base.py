"""The interface every communication backend implements.

A backend knows how the workers that share one sharded optimizer talk to each
other; it never sees optimizer math or the partition. Two kinds of calls:

* **In-step collectives**, called from inside one worker's traced step
  (replica context under tf.distribute, the process itself under Horovod), on
  flat tensors: :meth:`Collectives.reduce_scatter_sum`,
  :meth:`Collectives.all_reduce_sum`, :meth:`Collectives.all_gather`, and
  :meth:`Collectives.all_gather_rows` for sparse gradients' rows. Every
  call is counted in :attr:`Collectives.launches` while tracing, so a traced
  step's collective count can be read back (the benchmarks check it).
* **Eager calls**, from ordinary Python outside any step (building,
  checkpointing, consolidating state): :meth:`Collectives.all_reduce_eagerly`
  and :meth:`Collectives.all_gather_eagerly`, plus the bookkeeping of which
  worker copies this process holds (:meth:`Collectives.local_worker_indices`,
  :meth:`Collectives.local_components`).

Vocabulary used throughout distadam: a *worker* is one participant holding one
shard of the state (a replica under tf.distribute, a rank under Horovod); a
*process* may hold several workers (MirroredStrategy over several devices).

Hybrid sharding (state sharded within groups of workers, replicated across
groups) builds on a backend's :meth:`Collectives.subgroup_ops`; see
:mod:`distadam.collectives.hybrid`.

A new backend is one file: subclass :class:`Collectives`, implement the
abstract methods, and register it with
:func:`distadam.collectives.register_backend`.
"""

from __future__ import annotations

import abc

import numpy as np
import tensorflow as tf


class Collectives(abc.ABC):
    """Collectives over the workers that share one sharded optimizer."""

    #: short name used in errors and ``ShardedAdam(backend=...)``.
    name = "abstract"

    #: What the optimizer divides every reduced gradient by: 1 where the
    #: framework already scaled each worker's loss by 1/N (tf.distribute), N
    #: where each worker's loss is its local mean (Horovod). The collectives
    #: themselves always sum.
    gradient_divisor = 1

    def __init__(self):
        # Collective launches issued while tracing, by kind. A traced step
        # launches exactly these on every execution; benchmarks read it.
        self.launches = {"reduce_scatter": 0, "all_reduce": 0, "all_gather": 0}

    # ------------------------------------------------------------ topology
    @property
    @abc.abstractmethod
    def num_workers(self) -> int:
        """Static number of workers (= shards)."""

    @abc.abstractmethod
    def worker_index(self) -> tf.Tensor:
        """Inside a step: this worker's shard index as an int32 scalar tensor
        (a constant where the backend knows it at trace time)."""

    @property
    def member_order_established(self) -> bool:
        """Whether this backend's gathers are known to return workers in
        worker order: observed, or guaranteed by the library (Horovod and MPI
        gather in rank order). False where the order was predicted: the
        optimizer then checks it on its first step's gathers and stops before
        writing anything if it was wrong (see
        :mod:`distadam.collectives.member_order`)."""
        return True

    def local_worker_indices(self) -> list:
        """Eagerly: the shard index of each worker this process holds, in
        :meth:`local_components` order."""
        return [int(self.worker_index())]

    def local_components(self, variable) -> list:
        """(device, tensor-like with ``assign``) for each copy of a per-worker
        ``variable`` held by this process, in worker order."""
        value = getattr(variable, "value", variable)
        return [(value.device, value)]

    def state_variable_options(self) -> dict:
        """Keras ``Variable`` options that give every worker its own copy of
        a state variable (e.g. ON_READ under a strategy)."""
        return {}

    # ---------------------------------------------------- in-step collectives
    # ``name`` identifies the collective within a step: unique among the
    # step's collectives and identical on every worker. Backends that match
    # collectives across processes by name (Horovod) need it; the others may
    # use it for op names only.

    def reduce_scatter_sum(self, flat: tf.Tensor, name: str | None = None) -> tf.Tensor:
        """Sum ``flat`` (shape [num_workers * S]) over workers; return this
        worker's slice [index * S, (index + 1) * S) of the sum."""
        self.launches["reduce_scatter"] += 1
        return self._reduce_scatter_sum(flat, name)

    def all_reduce_sum(self, values: tf.Tensor, name: str | None = None) -> tf.Tensor:
        """Elementwise sum of ``values`` over workers (exact, never averaged)."""
        self.launches["all_reduce"] += 1
        return self._all_reduce_sum(values, name)

    def all_gather(self, shard: tf.Tensor, name: str | None = None) -> tf.Tensor:
        """Concatenate every worker's ``shard`` (shape [S]) in worker order."""
        self.launches["all_gather"] += 1
        return self._all_gather(shard, name)

    def all_gather_rows(self, rows: tf.Tensor, name: str | None = None) -> tf.Tensor:
        """Concatenate every worker's ``rows`` along axis 0, in worker order;
        the number of rows may differ between workers (a sparse gradient's
        rows: indices or values)."""
        self.launches["all_gather"] += 1
        return self._all_gather_rows(rows, name)

    @abc.abstractmethod
    def _reduce_scatter_sum(self, flat, name): ...

    @abc.abstractmethod
    def _all_reduce_sum(self, values, name): ...

    @abc.abstractmethod
    def _all_gather(self, shard, name): ...

    @abc.abstractmethod
    def _all_gather_rows(self, rows, name): ...

    def subgroup_ops(self, group_size: int):
        """The in-step collectives of hybrid sharding over groups of
        ``group_size`` consecutive workers (an object with the methods of
        :class:`distadam.collectives.hybrid.SubgroupOps`), or None when the
        backend has no subgroup collectives: they are then emulated over all
        workers (correct, more bytes). Called once, when the optimizer is
        built, on every worker."""
        return None

    def assign_replicated(self, variables, values) -> None:
        """Inside a step: write ``values``, identical on every worker, into the
        replicated model ``variables`` (no communication)."""
        for variable, value in zip(variables, values):
            variable.assign(value)

    # ----------------------------------------------------------- eager calls
    @abc.abstractmethod
    def all_reduce_eagerly(self, values) -> np.ndarray:
        """Outside any step: sum a small numpy array over workers (each local
        worker contributes ``values``). A collective: every process calls it
        at the same point."""

    @abc.abstractmethod
    def all_gather_eagerly(self, variables) -> list:
        """Outside any step: for each per-worker variable, the concatenation
        of every worker's copy in worker order, as a numpy array. A
        collective: every process calls it with the same variables."""


def sum_rows(rows: tf.Tensor, order=None) -> tf.Tensor:
    """The sum of the rows of ``rows`` ([num_workers, S]): the local half of
    a reduce-scatter done as an all-to-all. One ``AddN`` over the rows,
    which are views of ``rows``: ``tf.reduce_sum(rows, axis=0)`` is a
    column reduction and took 3.7 ms against 1.4 ms for a [2, 1.2M] float32
    shard on one CPU thread (``benchmarks/README.md``). The rows are added
    in worker order whatever the backend (``order``: the
    :class:`~distadam.collectives.member_order.MemberOrder` the rows arrived
    in; None: already worker order), so every path rounds alike."""
    parts = tf.unstack(rows)
    if order is not None:
        parts = order.list_to_worker_order(parts)
    return tf.add_n(parts)


def slice_own_shard(flat: tf.Tensor, num_workers: int, index: tf.Tensor) -> tf.Tensor:
    """Row ``index`` of ``flat`` viewed as [num_workers, S] (XLA-friendly gather)."""
    return tf.gather(tf.reshape(flat, [num_workers, -1]), index)
