"""Hybrid sharding: the state is sharded over groups of G consecutive workers
and replicated across the N/G groups (``ShardedAdam(shard_group_size=G)``),
like PyTorch FSDP's ``HYBRID_SHARD`` or DeepSpeed's MiCS applied to ZeRO-1.

Worker ``w`` is in group ``w // G`` and holds shard ``w % G`` (its *position*)
of every sharded bucket. One step per bucket of ``G * S`` elements:

1. reduce-scatter within the group: the worker receives its position's
   slice [S] summed over its group's G workers;
2. all-reduce that slice *across* groups, among the N/G workers holding the
   same position: now it is the slice of the sum over all N workers, exactly
   what a plain (G = N) reduce-scatter gives;
3. the update runs on the shard as usual; norm-clipping statistics are summed
   within the group only (every group holds the whole, already global
   gradient once, so each element is counted once);
4. all-gather the new parameter shard within the group.

On a cluster with G = the devices of one node, steps 1 and 4 stay on the
node's fast links and only step 2, 1/G of the bucket, crosses the network.

:class:`ShardGroupCollectives` presents this to the optimizer as an ordinary
:class:`~distadam.collectives.base.Collectives` over G workers, so the
optimizer's step is the same code for G = N and G < N. Backends provide the
group collectives through :meth:`Collectives.subgroup_ops`, returning an object
with the three methods of :class:`SubgroupOps`; a backend that returns None
gets an emulation over all N workers (correct, more bytes: every collective
spans all workers).
"""

from __future__ import annotations

import typing

import numpy as np
import tensorflow as tf

from distadam.collectives.base import Collectives, slice_own_shard, sum_rows
from distadam.worker_grid import WorkerGrid, check_group_size


class SubgroupOps(typing.Protocol):
    """In-step collectives over the two kinds of subgroups of one worker.

    ``within``: the G workers of this worker's group (consecutive indices);
    ``across``: the N/G workers, one per group, at this worker's position.
    Order inside a group is by worker index. ``name`` is unique in the step
    and identical on every worker, as for :class:`Collectives`.
    """

    def reduce_scatter_within(self, flat: tf.Tensor, name: str | None) -> tf.Tensor: ...

    def all_reduce_across(self, values: tf.Tensor, name: str | None) -> tf.Tensor: ...

    def all_gather_within(self, shard: tf.Tensor, name: str | None) -> tf.Tensor: ...


def shard_group(collectives: Collectives, group_size) -> Collectives:
    """The collectives the sharded buckets use: ``collectives`` itself when
    the state is sharded over all workers, else a :class:`ShardGroupCollectives`."""
    group_size = check_group_size(group_size, collectives.num_workers)
    if group_size == collectives.num_workers:
        return collectives
    return ShardGroupCollectives(collectives, group_size)


class ShardGroupCollectives(Collectives):
    """Collectives over the G shards of hybrid sharding, seen from one worker.

    ``num_workers`` is G and ``worker_index`` the worker's position in its
    group, so a layout with ``num_shards = G`` maps onto it as onto any
    backend. ``reduce_scatter_sum`` returns the position's slice of the sum
    over *all* workers (steps 1 + 2 of the module docstring),
    ``all_gather`` and ``all_reduce_sum`` span the group. The eager calls
    serve the state (consolidation): ``all_gather_eagerly`` returns the G
    shards of one group (group 0; every group holds the same values); there
    is no eager all-reduce here (agreements span all workers:
    ``Topology.everyone``).
    """

    def __init__(self, full: Collectives, group_size: int):
        super().__init__()
        self.full = full
        self.grid = WorkerGrid(full.num_workers, group_size)
        self.group_size = group_size
        self.num_groups = self.grid.num_groups
        self.name = f"{full.name}[groups of {group_size}]"
        self.gradient_divisor = full.gradient_divisor
        # A group of one communicates nothing within; across is all workers.
        self.ops = full.subgroup_ops(group_size) if group_size > 1 else None

    @property
    def emulated(self) -> bool:
        """Whether the group collectives are emulated over all workers (the
        backend offers no subgroup collectives; groups of one need none)."""
        return self.ops is None and self.group_size > 1

    @property
    def num_workers(self) -> int:
        return self.group_size

    @property
    def member_order_established(self) -> bool:
        return self.full.member_order_established and getattr(self.ops, "member_order_established", True)

    def worker_index(self):
        return self._split_index(tf.math.floormod, self.grid.shard_of)

    def group_index(self):
        """Inside a step: this worker's group (which copy of the state)."""
        return self._split_index(tf.math.floordiv, self.grid.group_of)

    def _split_index(self, op, static_op):
        # A constant stays a constant (TensorFlow does not fold floormod at
        # trace time): the update then copies only the shard's own pieces of
        # the parameters instead of flattening the whole bucket.
        index = self.full.worker_index()
        static = tf.get_static_value(index)
        if static is not None:
            return tf.constant(static_op(int(static)), tf.int32)
        return op(index, self.group_size)

    def local_worker_indices(self) -> list:
        return [self.grid.shard_of(w) for w in self.full.local_worker_indices()]

    def local_components(self, variable) -> list:
        return self.full.local_components(variable)

    def state_variable_options(self) -> dict:
        return self.full.state_variable_options()

    def assign_replicated(self, variables, values) -> None:
        self.full.assign_replicated(variables, values)

    # ---------------------------------------------------- in-step collectives
    def _reduce_scatter_sum(self, flat, name):
        if self.group_size == 1:  # every worker holds the whole state
            return self.full.all_reduce_sum(flat, name=name)
        if self.ops is not None:
            partial = self.ops.reduce_scatter_within(flat, _part(name, "within"))
            self.launches["all_reduce"] += 1  # the across-group half
            return self.ops.all_reduce_across(partial, _part(name, "across"))
        # Emulated: the sum over all workers, then this position's slice.
        summed = self.full.all_reduce_sum(flat, name=name)
        return slice_own_shard(summed, self.group_size, self.worker_index())

    def _all_reduce_sum(self, values, name):
        if self.group_size == 1:
            return values
        if self.ops is not None:
            # Gathered and added in worker order, not all-reduced: every group
            # holds the same values (the norm statistics of the same global
            # gradient) and must get the same bits, but an all-reduce adds in
            # its group's rank order, which differs between groups from 11
            # workers on (distadam.collectives.member_order). A few floats.
            gathered = self.ops.all_gather_within(tf.reshape(values, [-1]), name)
            return tf.reshape(sum_rows(tf.reshape(gathered, [self.group_size, -1])), tf.shape(values))
        # Emulated: only group 0 contributes, so the sum is exactly one group's.
        in_group_0 = tf.cast(tf.equal(self.group_index(), 0), values.dtype)
        return self.full.all_reduce_sum(values * in_group_0, name=name)

    def _all_gather(self, shard, name):
        if self.group_size == 1:
            return shard
        if self.ops is not None:
            return self.ops.all_gather_within(shard, name)
        gathered = self.full.all_gather(shard, name=name)
        groups = tf.reshape(gathered, [self.num_groups, -1])
        return tf.gather(groups, self.group_index())

    def _all_gather_rows(self, rows, name):
        # A sparse gradient's rows come from every worker: all of them.
        return self.full.all_gather_rows(rows, name=name)

    # ----------------------------------------------------------- eager calls
    def all_reduce_eagerly(self, values) -> np.ndarray:
        # It used to sum over all N workers while num_workers said G: one name,
        # two meanings. Eager agreements span the job: topology.everyone.
        raise NotImplementedError(
            "a shard group has no eager all-reduce; agreements between workers go through "
            "optimizer.topology.everyone (all workers)")

    def all_gather_eagerly(self, variables) -> list:
        gathered = [np.asarray(g) for g in self.full.all_gather_eagerly(variables)]
        # Worker order: group 0's G shards come first.
        return [g[: g.shape[0] // self.num_groups] for g in gathered]


def _part(name, part):
    return None if name is None else f"{name}.{part}"
