"""The small interface every communication backend implements.

A backend is used from inside one worker's step (replica context under
tf.distribute, the process itself under Horovod). It never sees variables or
optimizer math: only flat tensors whose leading size is ``num_workers * S``.
"""

from __future__ import annotations

import abc

import numpy as np
import tensorflow as tf


class Collectives(abc.ABC):
    """Collectives over the workers that share one sharded optimizer."""

    #: short name used in errors and ``ShardedAdam(backend=...)``.
    name = "abstract"

    def __init__(self):
        # Collective launches issued while tracing, by kind. A traced step
        # launches exactly these on every execution; benchmarks read it.
        self.launches = {"reduce_scatter": 0, "all_reduce": 0, "all_gather": 0}

    @property
    @abc.abstractmethod
    def num_workers(self) -> int:
        """Static number of workers (shards)."""

    @abc.abstractmethod
    def worker_index(self) -> tf.Tensor:
        """This worker's shard index as an int32 scalar tensor."""

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
        self.launches["all_reduce"] += 1
        return self._all_reduce_sum(values, name)

    def all_gather(self, shard: tf.Tensor, name: str | None = None) -> tf.Tensor:
        """Concatenate every worker's ``shard`` (shape [S]) in worker order."""
        self.launches["all_gather"] += 1
        return self._all_gather(shard, name)

    @abc.abstractmethod
    def _reduce_scatter_sum(self, flat, name): ...

    @abc.abstractmethod
    def _all_reduce_sum(self, values, name): ...

    @abc.abstractmethod
    def _all_gather(self, shard, name): ...

    def assign_replicated(self, variables, values) -> None:
        """Write identical ``values`` into the replicated model ``variables``
        (already consistent on every worker, so no communication)."""
        for variable, value in zip(variables, values):
            variable.assign(value)

    def state_variable_options(self) -> dict:
        """Keras ``Variable`` options for per-worker (unmirrored) state."""
        return {}

    def all_reduce_eagerly(self, values):
        """Sum a small numpy array across workers from eager, cross-replica code
        (outside any step). Returns a numpy array."""
        return np.asarray(self._all_reduce_sum(tf.constant(values), None))

    def local_worker_indices(self) -> list:
        """Shard index of each local component, in ``local_components`` order.
        Called eagerly, outside any step."""
        return [int(self.worker_index())]

    def local_components(self, variable) -> list:
        """(device, tensor-like) for each copy of ``variable`` held by this process."""
        value = getattr(variable, "value", variable)
        return [(value.device, value)]


def slice_own_shard(flat: tf.Tensor, num_workers: int, index: tf.Tensor) -> tf.Tensor:
    """Row ``index`` of ``flat`` viewed as [num_workers, S] (XLA-friendly gather)."""
    return tf.gather(tf.reshape(flat, [num_workers, -1]), index)
