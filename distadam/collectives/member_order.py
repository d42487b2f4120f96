"""Where each worker's contribution lands in a collective's output.

distadam speaks in *worker order*: worker ``w`` holds shard ``w``, so a
gather must put worker ``w``'s shard at row ``w``, and a reduce-scatter built
from an all-to-all must send the part of shard ``w`` to worker ``w``. A
communication library has its own *rank order* instead:

* Horovod and MPI rank processes by their rank: rank order is worker order.
* TensorFlow's collectives rank the members of a group when the group is
  first formed (``CollectiveParamResolverLocal::CompleteDefaultRanking``):
  the members' *tasks* in lexicographic order of their names, then the
  devices inside one task by device number (GPUs possibly along their
  interconnect instead). Up to 10 tasks this agrees with worker order; from
  11 on it does not: ``/job:worker/replica:0/task:10`` sorts before
  ``.../task:2``, so a 12-worker gather returns the rows of workers
  ``0, 1, 10, 11, 2, …, 9``. Every instance of one group (gathers,
  all-to-alls) shares that ranking.

A :class:`MemberOrder` records one group's ranking and converts between the
two orders; the backends apply it to every order-sensitive collective. The
tf.distribute backend learns it by a probe when the optimizer is built
eagerly (a gather of every member's worker index, the truth whatever the
hardware), or predicts it with :func:`tensorflow_rank_order` when the
optimizer is first built inside a traced step; the first step's gathers then
check the prediction (see ``ShardedAdam``'s layout check).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


class MemberOrderUnknown(RuntimeError):
    """A collective returned its members in an order that cannot be mapped
    onto worker order (not a permutation, or different on different devices)."""


@dataclasses.dataclass(frozen=True)
class MemberOrder:
    """The ranking of one collective group.

    ``ranked[r]`` is the worker (index within the group) at rank ``r``: the
    worker whose rows a gather returns at position ``r``, and the worker an
    all-to-all delivers row ``r`` to.
    """

    ranked: tuple

    def __post_init__(self):
        ranked = tuple(int(w) for w in self.ranked)
        if sorted(ranked) != list(range(len(ranked))):
            raise MemberOrderUnknown(
                f"a collective group's ranking must be a permutation of its {len(ranked)} workers, "
                f"got {list(ranked)}")
        object.__setattr__(self, "ranked", ranked)

    @classmethod
    def identity(cls, size: int) -> "MemberOrder":
        return cls(tuple(range(size)))

    @property
    def size(self) -> int:
        return len(self.ranked)

    @property
    def is_identity(self) -> bool:
        return self.ranked == tuple(range(self.size))

    @property
    def rank_of(self) -> tuple:
        """``rank_of[w]``: the rank of worker ``w`` (the inverse permutation)."""
        inverse = [0] * self.size
        for rank, worker in enumerate(self.ranked):
            inverse[worker] = rank
        return tuple(inverse)

    def rows_to_worker_order(self, rows: tf.Tensor) -> tf.Tensor:
        """``rows`` ([size, ...], row r from rank r, as a gather returns
        them) rearranged so that row w is worker w's."""
        if self.is_identity:
            return rows
        return tf.gather(rows, self.rank_of)

    def rows_to_rank_order(self, rows: tf.Tensor) -> tf.Tensor:
        """``rows`` ([size, ...], row w meant for worker w) rearranged so that
        an all-to-all, which delivers row r to rank r, delivers each row to
        its worker."""
        if self.is_identity:
            return rows
        return tf.gather(rows, self.ranked)

    def list_to_worker_order(self, items: list) -> list:
        """A Python list of per-rank items (e.g. unstacked rows) in worker
        order; costs nothing at run time."""
        return [items[rank] for rank in self.rank_of]

    def flat_to_worker_order(self, gathered: tf.Tensor) -> tf.Tensor:
        """A gather's flat output (``size`` equal shards, rank order) in
        worker order."""
        if self.is_identity:
            return gathered
        rows = tf.reshape(gathered, [self.size, -1])
        return tf.reshape(self.rows_to_worker_order(rows), [-1])


def from_probe(gathered_ids) -> MemberOrder:
    """The ranking a probe observed: ``gathered_ids`` is what a gather of
    every member's worker index returned (rank order)."""
    values = [float(i) for i in gathered_ids]
    if any(v != round(v) for v in values):
        raise MemberOrderUnknown(f"a probe of the collective's member order returned non-integers: {values}")
    return MemberOrder(tuple(int(v) for v in values))


def agreed(orders) -> MemberOrder:
    """The one ranking several local devices observed for the same group."""
    orders = list(orders)
    if not orders:
        raise MemberOrderUnknown("no device reported the collective's member order")
    if any(order != orders[0] for order in orders[1:]):
        raise MemberOrderUnknown(
            "the devices of this process observed different member orders for one collective group: "
            + "; ".join(str(list(order.ranked)) for order in orders))
    return orders[0]


def task_and_device_key(device_name: str) -> tuple:
    """(task name, device type, device number) of a full device name, the
    keys TensorFlow ranks a group's members by."""
    spec = tf.DeviceSpec.from_string(device_name)
    task = f"/job:{spec.job}/replica:{spec.replica or 0}/task:{spec.task or 0}"
    return task, spec.device_type or "", spec.device_index or 0


def tensorflow_rank_order(device_names) -> MemberOrder:
    """The ranking TensorFlow gives a collective group whose members, in
    worker order, are ``device_names``: tasks in lexicographic order of their
    names, devices within a task by type and number. (TensorFlow may chain
    GPUs of one task along their interconnect instead; the probe, not this
    prediction, is authoritative.)"""
    keys = [task_and_device_key(name) for name in device_names]
    tasks = sorted({task for task, _, _ in keys})  # string order: "task:10" < "task:2"
    ranked = []
    for task in tasks:
        members = [w for w, key in enumerate(keys) if key[0] == task]
        ranked += sorted(members, key=lambda w: keys[w][1:])
    return MemberOrder(tuple(ranked))
