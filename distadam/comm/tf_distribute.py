"""tf.distribute backend: MirroredStrategy, MultiWorkerMirroredStrategy,
TPUStrategy and the default (single-replica) strategy.

Collectives are issued from replica context through the strategy's own
``ReplicaContext`` so group/instance keys stay consistent with every other
collective the strategy launches.

CPU has no reduce-scatter kernel in TF (only NCCL registers one), so the
portable reduce-scatter is an all-reduce followed by taking this replica's
slice. On GPU, NCCL's all-reduce is itself reduce-scatter + all-gather, so the
extra bytes are the all-gather half.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from distadam.comm.base import Collectives, slice_own_shard


class DistributeCollectives(Collectives):
    name = "tf.distribute"

    def __init__(self, strategy: tf.distribute.Strategy | None = None):
        super().__init__()
        self._strategy = strategy or tf.distribute.get_strategy()
        self._local_indices = None  # fixed for the strategy's lifetime
        self._eager_all_reduce = None

    @property
    def strategy(self):
        return self._strategy

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
        index = self._context().replica_id_in_sync_group
        return tf.cast(index, tf.int32)

    def _reduce_scatter_sum(self, flat):
        if self.num_workers == 1:
            return flat
        summed = self._context().all_reduce(tf.distribute.ReduceOp.SUM, flat)
        return slice_own_shard(summed, self.num_workers, self.worker_index())

    def _all_reduce_sum(self, values):
        if self.num_workers == 1:
            return values
        return self._context().all_reduce(tf.distribute.ReduceOp.SUM, values)

    def _all_gather(self, shard):
        if self.num_workers == 1:
            return shard
        return self._context().all_gather(shard, axis=0)

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

    def all_reduce_eagerly(self, values):
        if self.num_workers == 1:
            return np.asarray(values)
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
