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
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import tensorflow as tf

from distadam import _tf_internals
from distadam.collectives.base import Collectives, slice_own_shard

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
    def _reduce_scatter_sum(self, flat, name):
        if self.num_workers == 1:
            return flat
        num_workers = self.num_workers
        direct = self._call_direct(lambda launcher, local: _tf_internals.all_to_all_sum(launcher, local, num_workers), flat)
        if direct is not None:
            return direct
        summed = self._context().all_reduce(tf.distribute.ReduceOp.SUM, flat)
        return slice_own_shard(summed, num_workers, self.worker_index())

    def _all_reduce_sum(self, values, name):
        if self.num_workers == 1:
            return values
        return self._context().all_reduce(tf.distribute.ReduceOp.SUM, values)

    def _all_gather(self, shard, name):
        if self.num_workers == 1:
            return shard
        if os.environ.get("DISTADAM_GATHER_VIA_ALLTOALL") == "1":
            n = self.num_workers
            direct = self._call_direct(
                lambda launcher, s: tf.reshape(_tf_internals.all_to_all_rows(launcher, tf.tile(s[None], [n, 1])), [-1]),
                shard)
        else:
            direct = self._call_direct(_tf_internals.equal_shard_all_gather, shard)
        if direct is not None:
            return direct
        return self._context().all_gather(shard, axis=0)

    def _all_gather_rows(self, rows, name):
        if self.num_workers == 1:
            return rows
        # The public all-gather exchanges shapes first: row counts may differ.
        return self._context().all_gather(rows, axis=0)

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
        try:
            indices = _tf_internals.local_replica_ids(self._strategy)
            within, across = _tf_internals.subgroup_launchers(self._direct, indices, group_size, self.num_workers)
        except _tf_internals.InternalsUnavailable as error:
            warnings.warn(f"distadam: subgroup collectives unavailable ({error}); emulating them over all workers")
            return None
        return _DirectSubgroupOps(self, within, across, group_size)

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

        tf.__internal__.distribute.interim.maybe_merge_call(
            assign_all, self._strategy, tf_variables, list(values)
        )

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
                return strategy.run(
                    lambda t: tf.distribute.get_replica_context().all_reduce(
                        tf.distribute.ReduceOp.SUM, tf.identity(t)
                    ),
                    args=(tensor,),
                )

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

    def __init__(self, collectives, within, across, group_size):
        self._collectives = collectives
        self._within = within
        self._across = across
        self._group_size = group_size

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
        size = self._group_size
        return self._call(self._within, lambda launcher, v: _tf_internals.all_to_all_sum(launcher, v, size), flat)

    def all_reduce_within(self, values, name):
        return self._call(self._within, _tf_internals.launcher_all_reduce, values)

    def all_reduce_across(self, values, name):
        return self._call(self._across, _tf_internals.launcher_all_reduce, values)

    def all_gather_within(self, shard, name):
        return self._call(self._within, _tf_internals.equal_shard_all_gather, shard)
