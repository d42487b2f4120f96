"""tf.distribute backend: MirroredStrategy, MultiWorkerMirroredStrategy,
TPUStrategy and the default (single-replica) strategy. A worker is a replica.

Collectives are issued from replica context through the strategy itself so
group and instance keys stay consistent with every other collective the
strategy launches. Two implementations of the bucket collectives:

* **Direct** (Mirrored/MultiWorkerMirrored strategies whose cross-device ops
  are ``CollectiveAllReduce``, the CPU default): reduce-scatter is one
  all-to-all followed by a local sum — TF registers no CPU reduce-scatter
  kernel, and all-to-all moves exactly the (N-1)/N of the bucket a ring
  reduce-scatter moves — and the all-gather is one collective, skipping TF's
  shape exchange since shards are equal by construction. One launch each:
  two per bucket per step. They go through the strategy's own per-device
  launchers, which are private TF internals kept behind
  :mod:`distadam._tf_internals`; if those do not look as expected,
  at detection or at any later use, the portable path runs instead.
  ``DISTADAM_DIRECT_COLLECTIVES=0`` forces the portable path.
* **Portable** (everything else, e.g. NCCL on GPU, TPU): all-reduce + this
  replica's slice, and ``ReplicaContext.all_gather`` (which exchanges shapes
  first: two launches). On GPU NCCL's all-reduce is itself reduce-scatter +
  all-gather, so the extra bytes are the gather half.

Both paths map TensorFlow's rank order onto worker order
(:mod:`distadam.collectives.member_order`): from 11 workers on TensorFlow
ranks the members of a group by the lexicographic order of their task names,
so a gather's rows and an all-to-all's destinations are not in replica
order. The ranking of every group the optimizer uses is probed when the
optimizer is built eagerly, or predicted from the device names when it is
first built inside a traced step (``member_order_established`` is then
False and the optimizer checks the prediction on the first step's gathers).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import tensorflow as tf

from distadam import _tf_internals
from distadam.collectives import member_order
from distadam.collectives.base import Collectives, slice_own_shard
from distadam.collectives.member_order import MemberOrder
from distadam.worker_grid import WorkerGrid

#: Set to "0" to force the portable (public API) collectives.
DIRECT_COLLECTIVES_ENV = "DISTADAM_DIRECT_COLLECTIVES"


def direct_collectives_requested(environ=None) -> bool:
    value = (os.environ if environ is None else environ).get(DIRECT_COLLECTIVES_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{DIRECT_COLLECTIVES_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


class DistributeCollectives(Collectives):
    name = "tf.distribute"

    def __init__(self, strategy: tf.distribute.Strategy | None = None):
        super().__init__()
        self._strategy = strategy or tf.distribute.get_strategy()
        self._local_indices = None  # fixed for the strategy's lifetime
        self._eager_all_reduce = None
        self._eager_gathers = {}  # one traced gather per set of variables
        self._direct = None
        if self.num_workers > 1 and direct_collectives_requested():
            self._direct = _tf_internals.direct_launchers(self._strategy)
        # The ranking of the all-workers group (one group for both paths:
        # the portable collectives use the strategy's launchers too).
        self._order = MemberOrder.identity(self.num_workers)
        self._order_source = "single worker"
        if self.num_workers > 1:
            if can_probe():
                self._order = member_order.agreed(self._probe_member_orders(self._direct, lambda replica: replica))
                self._order_source = "probed"
            else:
                self._order = _predicted_order(member_device_names(self._strategy), self.num_workers)
                self._order_source = "predicted"
            if self._direct is not None:
                self._direct = self._direct.with_orders([self._order] * len(self._direct.launchers))
        # Where TensorFlow's all-to-all would mix up its buffers (a process
        # holding several members of a group of 11 or more), the reduce-
        # scatter is an all-reduce + slice instead; the gather stays direct.
        self._direct_all_to_all = self._direct is not None and _tf_internals.all_to_all_is_safe(
            self.num_workers, len(self._direct.launchers))

    @property
    def member_order(self) -> MemberOrder:
        """The ranking TensorFlow gave the all-workers group (how its gathers
        order the workers before distadam puts them in worker order)."""
        return self._order

    @property
    def member_order_source(self) -> str:
        """How :attr:`member_order` was learnt: "probed" (observed when the
        optimizer was built), "predicted" (from device names: built inside a
        traced step) or "single worker"."""
        return self._order_source

    @property
    def member_order_established(self) -> bool:
        return self._order_source != "predicted"

    def _probe_member_orders(self, launchers, index_in_group) -> list:
        """Each local replica's observation of its group's ranking: a gather
        of every member's index in the group (``index_in_group(replica id)``),
        as the collective returns it (``launchers``: through them; None: the
        portable all-gather). Eager, in cross-replica context; a collective:
        every process probes at the same point of building."""
        strategy = self._strategy

        def raw_gather(launcher, _order, value):
            return _tf_internals.equal_shard_all_gather(launcher, None, value)

        @tf.function
        def probe():
            def replica_fn():
                context = tf.distribute.get_replica_context()
                index = tf.reshape(tf.cast(index_in_group(context.replica_id_in_sync_group), tf.float32), [1])
                if launchers is None:
                    return context.all_gather(index, axis=0)
                return launchers.call_per_replica(context, raw_gather, index)

            return strategy.run(replica_fn)

        return [member_order.from_probe(np.asarray(result))
                for result in strategy.experimental_local_results(probe())]

    @property
    def uses_direct_collectives(self) -> bool:
        """Whether the bucket collectives take the direct path (see module doc)."""
        return self._direct is not None

    @property
    def num_workers(self) -> int:
        return int(self._strategy.num_replicas_in_sync)

    def _context(self):
        context = tf.distribute.get_replica_context()
        if context is None:
            raise RuntimeError(
                "ShardedAdam's step must run in replica context: call "
                "apply_gradients inside strategy.run(...) (model.fit does this)."
            )
        return context

    def worker_index(self):
        if self.num_workers == 1:
            return tf.constant(0, tf.int32)
        return tf.cast(self._context().replica_id_in_sync_group, tf.int32)

    # ---------------------------------------------------- in-step collectives
    # Every collective goes through distadam's own launchers where the direct
    # path is available (their keys are this strategy instance's alone: see
    # distadam._tf_internals.own_group_key), else through the public
    # ReplicaContext collectives (the portable path).
    def _reduce_scatter_sum(self, flat, name):
        if self.num_workers == 1:
            return flat
        if self._direct_all_to_all:
            direct = self._call_direct(_tf_internals.all_to_all_sum, flat)
            if direct is not None:
                return direct
        # An all-reduce is order-free: slice this worker's shard of the sum.
        summed = self._all_reduce_sum(flat, name)
        return slice_own_shard(summed, self.num_workers, self.worker_index())

    def _all_reduce_sum(self, values, name):
        return self._direct_or_portable(
            _tf_internals.launcher_all_reduce, values,
            lambda: self._context().all_reduce(tf.distribute.ReduceOp.SUM, values))

    def _all_gather(self, shard, name):
        return self._direct_or_portable(
            _tf_internals.equal_shard_all_gather, shard,
            lambda: self._order.flat_to_worker_order(self._context().all_gather(shard, axis=0)))

    def _all_gather_rows(self, rows, name):
        # Row counts may differ (both paths exchange shapes first). Left in
        # rank order: the rows are a sparse gradient's (index, value) pairs,
        # packed together and summed by index, so which worker sent a row
        # does not matter (every worker receives the same sequence).
        return self._direct_or_portable(
            _tf_internals.launcher_all_gather_rows, rows, lambda: self._context().all_gather(rows, axis=0))

    def _direct_or_portable(self, per_device_fn, value, portable):
        if self.num_workers == 1:
            return value
        direct = self._call_direct(per_device_fn, value)
        return direct if direct is not None else portable()

    def _call_direct(self, per_device_fn, value):
        """The direct collective's result, or None to take the portable path
        (not available, or the internals changed since detection)."""
        if self._direct is None:
            return None
        try:
            return self._direct.call_per_replica(self._context(), per_device_fn, value)
        except _tf_internals.InternalsUnavailable as error:
            warnings.warn(f"distadam: direct collectives unavailable ({error}); using the portable path")
            self._direct = None
            return None

    def subgroup_ops(self, group_size):
        """Direct subgroup collectives (see :mod:`distadam.collectives.hybrid`)
        when the direct path is available, else None (emulated)."""
        if self._direct is None or group_size == self.num_workers:
            return None
        grid = WorkerGrid(self.num_workers, group_size)
        try:
            indices = _tf_internals.local_replica_ids(self._strategy)
            within, across = _tf_internals.subgroup_launchers(self._direct, indices, grid)
        except _tf_internals.InternalsUnavailable as error:
            warnings.warn(f"distadam: subgroup collectives unavailable ({error}); emulating them over all workers")
            return None
        # Each local replica's group has a ranking of its own (the members'
        # task names decide it); the across-group collectives only all-reduce.
        local_groups = {grid.group_of(i) for i in indices}
        if can_probe():
            orders = self._probe_member_orders(within, grid.shard_of)
            for group in local_groups:
                member_order.agreed([o for o, i in zip(orders, indices) if grid.group_of(i) == group])
            established = True
        else:
            names = member_device_names(self._strategy)
            orders = [_predicted_order(None if names is None else [names[w] for w in grid.groups()[grid.group_of(i)]],
                                       group_size) for i in indices]
            established = False
        # Members of one group held by one process (equal on every process).
        members_per_process = max(sum(1 for i in indices if grid.group_of(i) == group) for group in local_groups)
        return _DirectSubgroupOps(self, within.with_orders(orders), across, group_size, established,
                                  _tf_internals.all_to_all_is_safe(group_size, members_per_process))

    def assign_replicated(self, variables, values):
        # Mirrored variables can only be written from cross-replica context;
        # each replica already holds the full gathered value, so every device
        # copy is assigned its own local (identical) tensor.
        tf_variables = [getattr(v, "value", v) for v in variables]

        def assign_all(strategy, tf_variables, values):
            for variable, value in zip(tf_variables, values):
                strategy.extended.update(
                    variable, lambda var, val: var.assign(val), args=(value,), group=False
                )

        _tf_internals.maybe_merge_call(assign_all, self._strategy, tf_variables, list(values))

    def state_variable_options(self) -> dict:
        if self.num_workers == 1:
            return {}
        # ON_READ gives every replica its own copy: the replica's shard.
        return {"synchronization": "on_read", "aggregation": "none"}

    # ----------------------------------------------------------- eager calls
    def all_reduce_eagerly(self, values):
        values = np.asarray(values)
        if self.num_workers == 1:
            return values
        if self._eager_all_reduce is None:
            strategy = self._strategy

            # One tf.function for the backend's lifetime: traced once per shape.
            # tf.identity places each replica's copy on its own device, which
            # MirroredStrategy's all-reduce needs to find its destinations.
            @tf.function
            def reduce(tensor):
                return strategy.run(lambda t: self._all_reduce_sum(tf.identity(t), None), args=(tensor,))

            self._eager_all_reduce = reduce
        result = self._eager_all_reduce(tf.constant(values))
        return np.asarray(self._strategy.experimental_local_results(result)[0])

    def all_gather_eagerly(self, variables):
        variables = list(variables)
        if self.num_workers == 1:
            return [np.asarray(self.local_components(v)[0][1]) for v in variables]
        key = tuple(id(v) for v in variables)
        if key not in self._eager_gathers:
            strategy = self._strategy

            # Traced once per variable set (the optimizer's state kinds), not
            # once per call: saving a checkpoint must not retrace. Not counted
            # in `launches`, which describes the training step.
            # tf.identity: a read placed on the replica's device, where the
            # portable all-gather looks for its destinations (a bare variable
            # read has none under MultiWorkerMirroredStrategy).
            @tf.function
            def gather():
                return strategy.run(
                    lambda: [self._all_gather(tf.identity(getattr(v, "value", v)), None) for v in variables])

            # The variables stay referenced with the function, so their ids
            # in the key cannot be reused by other objects.
            self._eager_gathers[key] = (gather, variables)
        gathered = self._eager_gathers[key][0]()
        return [np.asarray(self._strategy.experimental_local_results(g)[0]) for g in gathered]

    def local_worker_indices(self):
        if self.num_workers == 1:
            return [0]
        if self._local_indices is None:
            strategy = self._strategy

            @tf.function
            def replica_ids():
                return strategy.run(
                    lambda: tf.distribute.get_replica_context().replica_id_in_sync_group
                )

            local = strategy.experimental_local_results(replica_ids())
            self._local_indices = [int(i) for i in local]
        return list(self._local_indices)

    def local_components(self, variable):
        value = getattr(variable, "value", variable)
        components = getattr(value, "values", None)
        if components is None:
            return [(value.device, value)]
        return [(c.device, c) for c in components]


class _DirectSubgroupOps:
    """Hybrid sharding's group collectives through launchers of our own
    (:func:`distadam._tf_internals.subgroup_launchers`): the same kernels as
    the direct path (all-to-all + local sum, ring all-reduce, all-gather
    without the shape exchange), each over a group's or a position's workers."""

    def __init__(self, collectives, within, across, group_size, member_order_established, all_to_all):
        self._collectives = collectives
        self._within = within
        self._across = across
        self._group_size = group_size
        #: Whether the groups' rankings were probed (else predicted).
        self.member_order_established = member_order_established
        self._all_to_all = all_to_all  # else reduce-scatter = all-reduce + slice

    def _call(self, launchers, per_device_fn, value):
        try:
            return launchers.call_per_replica(self._collectives._context(), per_device_fn, value)
        except _tf_internals.InternalsUnavailable as error:
            # The step being traced cannot switch to the emulation half-way
            # (other workers may not fail alike): stop with a clear cause.
            raise RuntimeError(
                f"distadam: subgroup collectives failed ({error}); set {DIRECT_COLLECTIVES_ENV}=0 to "
                "use the emulated (public API) path") from error

    def reduce_scatter_within(self, flat, name):
        if self._all_to_all:
            return self._call(self._within, _tf_internals.all_to_all_sum, flat)
        position = self._collectives.worker_index() % self._group_size
        summed = self._call(self._within, _tf_internals.launcher_all_reduce, flat)
        return slice_own_shard(summed, self._group_size, position)

    def all_reduce_across(self, values, name):
        return self._call(self._across, _tf_internals.launcher_all_reduce, values)

    def all_gather_within(self, shard, name):
        return self._call(self._within, _tf_internals.equal_shard_all_gather, shard)


def can_probe() -> bool:
    """Whether collectives can run now, eagerly, across replicas (building
    outside any step); inside a traced step they cannot."""
    return tf.executing_eagerly() and tf.distribute.in_cross_replica_context()


def member_device_names(strategy) -> list | None:
    """The device of every replica of ``strategy``, in replica order, or None
    if it cannot be told without communicating. MirroredStrategy holds all
    its replicas; under MultiWorkerMirroredStrategy replica ids count the
    chief first, then the workers by index, each with the same local devices
    (``tf.distribute.cluster_resolver``'s cluster spec names them)."""
    local = list(strategy.extended.worker_devices)
    if len(local) == strategy.num_replicas_in_sync:
        return local
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    cluster = resolver.cluster_spec().as_dict()
    tasks = [(job, index) for job in ("chief", "worker") for index in range(len(cluster.get(job, ())))]
    if len(tasks) * len(local) != strategy.num_replicas_in_sync:
        return None
    return [tf.DeviceSpec.from_string(device).replace(job=job, task=index).to_string()
            for job, index in tasks for device in local]


def _predicted_order(device_names, size) -> MemberOrder:
    """TensorFlow's ranking predicted from the members' device names (worker
    order when they are unknown: the first step's check then decides)."""
    if device_names is None or len(device_names) != size:
        return MemberOrder.identity(size)
    return member_order.tensorflow_rank_order(device_names)
