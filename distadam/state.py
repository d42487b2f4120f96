"""The optimizer's sharded state: for each state kind (``momentum``,
``velocity``, ``velocity_hat``, ``average``, ``accumulator`` — Keras' names
for Adam's m, v, v_hat, the EMA weights and the gradient accumulators) one
per-worker variable per bucket, each worker's copy holding its own shard.

:class:`ShardedState` owns those variables and every eager operation on them:
reading and writing one shard (checkpoints), gathering all shards into
per-variable arrays (consolidation, ``save_own_variables``, EMA finalisation; a replicated
bucket is read locally),
loading per-variable arrays back (each worker keeps its shard), and counting
the bytes actually allocated per device. Like PyTorch's
``ZeroRedundancyOptimizer.consolidate_state_dict``, the gather is a
collective: every worker calls it at the same point.
"""

from __future__ import annotations

import keras
import numpy as np

from distadam import _keras_internals as hooks
from distadam import _tf_internals
from distadam.collectives import Collectives
from distadam.partition import Layout


class ShardStateVariable(_tf_internals.PerKeyCheckpoint, keras.Variable):
    """A Keras variable holding one worker's shard of a bucket's state.

    In TF checkpoints every local shard is saved under a key naming its element
    range, so per-worker values survive (a plain ON_READ variable saves one
    aggregated value, or refuses to save at all) and a multi-process worker
    writes only what it owns. Restoring needs the same ranges, i.e. the same
    worker count; a range that is not in the checkpoint is reported by TF as a
    missing key. Change the worker count through ``model.save`` /
    ``save_weights`` (plain Adam layout) or ``distadam.checkpoint``.
    """

    def bind_shards(self, bucket, collectives):
        self._bucket = bucket
        self._collectives = collectives

    def _local_slices(self):
        bucket = self._bucket
        components = self._collectives.local_components(self)
        for (_, component), worker in zip(components, self._collectives.local_worker_indices()):
            # Every copy of a replicated bucket is the whole bucket: one key.
            start, stop = bucket.shard_range(bucket.shard_of_worker(worker))
            key = f"ELEMENTS_{start}_{stop}_OF_{bucket.num_elements}"
            yield component, key, stop - start

    def checkpoint_items(self):
        return [(key, component) for component, key, _ in self._local_slices()]


class ShardedState:
    """State variables of every kind for every bucket of ``layout``.

    Args:
        layout: the partition the shards follow.
        collectives: the backend that tells which workers this process holds
            and gathers across workers.
        kinds: state kinds, in the order they are created.
        create_variable: ``(name, shape, dtype, options) -> keras.Variable``;
            the optimizer creates (and tracks) the variables in its own scope.
    """

    def __init__(self, layout: Layout, collectives: Collectives, kinds, create_variable):
        self.layout = layout
        self.collectives = collectives
        self.kinds = tuple(kinds)
        options = collectives.state_variable_options()
        self._variables = {kind: [] for kind in self.kinds}
        for b, bucket in enumerate(layout.buckets):
            for kind in self.kinds:
                variable = create_variable(
                    f"bucket{b}_{bucket.dtype}_{kind}_shard", (bucket.shard_size,), bucket.dtype, options
                )
                variable.bind_shards(bucket, collectives)
                self._variables[kind].append(variable)

    def __contains__(self, kind) -> bool:
        return kind in self._variables

    def variables(self, kind) -> list:
        """One :class:`ShardStateVariable` per bucket."""
        self._check_kind(kind)
        return list(self._variables[kind])

    def local_handle(self, kind, bucket_index: int):
        """Inside a step: the resource handle of this replica's copy of
        ``kind``'s variable of bucket ``bucket_index``, which the compiled
        update writes in place (:func:`distadam.shard_update.in_place`)."""
        return hooks.local_handle(self._variables[kind][bucket_index])

    def all_variables(self) -> list:
        return [v for kind in self.kinds for v in self._variables[kind]]

    @property
    def local_shards(self) -> list:
        """Shard index of each worker this process holds (in sharded buckets;
        every worker holds the one shard 0 of a replicated bucket)."""
        return self.collectives.local_worker_indices()

    def local_shards_of(self, bucket_index: int) -> list:
        """The distinct shards of bucket ``bucket_index`` this process holds."""
        bucket = self.layout.buckets[bucket_index]
        return sorted({bucket.shard_of_worker(worker) for worker in self.local_shards})

    # ------------------------------------------------------------ one shard
    def read_shard(self, kind, bucket_index: int, shard: int) -> np.ndarray:
        """The real (non-padding) elements of ``shard`` of one bucket's state;
        ``shard`` must be held by this process."""
        bucket = self.layout.buckets[bucket_index]
        start, stop = bucket.shard_range(shard)
        return np.asarray(self._components(kind, bucket_index, shard)[0])[: stop - start]

    def write_shard(self, kind, bucket_index: int, shard: int, values) -> None:
        """Set ``shard`` of one bucket's state from its real elements (padding
        becomes zero)."""
        bucket = self.layout.buckets[bucket_index]
        start, stop = bucket.shard_range(shard)
        values = np.asarray(values)
        if values.shape != (stop - start,):
            raise ValueError(
                f"{kind} shard {shard} of bucket {bucket_index} holds {stop - start} elements, "
                f"got an array of shape {values.shape}"
            )
        padded = np.zeros([bucket.shard_size], dtype=bucket.dtype)
        padded[: stop - start] = values
        for component in self._components(kind, bucket_index, shard):
            component.assign(padded)

    # ------------------------------------------------------------ all shards
    def gather(self, kind) -> list:
        """Full (unsharded) values of ``kind``: one numpy array per trainable
        variable, in build order. A collective: every process calls it."""
        self._check_kind(kind)
        buckets = self.layout.buckets
        sharded = [b for b, bucket in enumerate(buckets) if not bucket.replicated]
        flats = {}
        if sharded:
            gathered = self.collectives.all_gather_eagerly([self._variables[kind][b] for b in sharded])
            flats.update(zip(sharded, gathered))
        for b, bucket in enumerate(buckets):
            if bucket.replicated:  # every worker holds it whole
                flats[b] = np.asarray(self._components(kind, b, 0)[0])
        result = [None] * self.layout.num_variables
        for b, bucket in enumerate(buckets):
            flat = np.asarray(flats[b])
            if flat.shape != (bucket.padded_size,):
                raise RuntimeError(
                    f"backend {self.collectives.name!r} gathered shape {flat.shape} for a bucket "
                    f"of {bucket.padded_size} elements"
                )
            for seg in bucket.segments:
                result[seg.variable_index] = flat[seg.offset: seg.end].reshape(seg.shape)
        return result

    def load_full(self, kind, values_by_index) -> None:
        """Set ``kind`` from full per-variable arrays (``{variable_index:
        array}`` or a list in build order); each local worker keeps its shard."""
        self._check_kind(kind)
        for b, bucket in enumerate(self.layout.buckets):
            flat = np.zeros([bucket.padded_size], dtype=bucket.dtype)
            for seg in bucket.segments:
                value = np.asarray(values_by_index[seg.variable_index])
                if value.size != seg.size:
                    raise ValueError(
                        f"{kind} for {seg.name} has {value.size} elements, expected {seg.size} {seg.shape}"
                    )
                flat[seg.offset: seg.end] = value.reshape([-1])
            shards = flat.reshape(bucket.num_shards, bucket.shard_size)
            for shard in self.local_shards_of(b):
                for component in self._components(kind, b, shard):
                    component.assign(shards[shard])

    def bytes_per_device(self) -> dict:
        """Bytes allocated on each local device, summed from the actual
        variable copies (not computed from a formula)."""
        totals = {}
        for variable in self.all_variables():
            for device, component in self.collectives.local_components(variable):
                nbytes = int(np.prod(component.shape)) * component.dtype.size
                totals[device] = totals.get(device, 0) + nbytes
        return totals

    # -------------------------------------------------------------- helpers
    def _components(self, kind, bucket_index, shard) -> list:
        """This process's copies of ``shard`` of one bucket's state (several
        for a replicated bucket under a multi-device strategy)."""
        self._check_kind(kind)
        bucket = self.layout.buckets[bucket_index]
        held = [bucket.shard_of_worker(worker) for worker in self.local_shards]
        if shard not in held:
            raise ValueError(f"shard {shard} of bucket {bucket_index} is not held by this process "
                             f"(it holds {sorted(set(held))})")
        variable = self._variables[kind][bucket_index]
        components = self.collectives.local_components(variable)
        return [component for (_, component), h in zip(components, held) if h == shard]

    def _check_kind(self, kind):
        if kind not in self._variables:
            raise ValueError(f"No {kind!r} state; this optimizer has {list(self.kinds)}")
