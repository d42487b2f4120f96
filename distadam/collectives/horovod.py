"""Horovod backend: one process is one worker, collectives go through
``horovod.tensorflow``'s tensor ops (which work with Keras 3; Horovod's Keras
wrappers do not, see :mod:`distadam.horovod_keras`).

Gradient semantics
------------------
Under Horovod no ``tf.distribute`` strategy is active, so TensorFlow and Keras
believe there is a single replica: ``model.fit``'s ``train_step`` and
``tf.nn.compute_average_loss(per_example_loss)`` scale the loss by
1/local_batch, not 1/global_batch. Gradients are therefore *averaged* over
workers (Horovod's own convention): the collectives sum, and the backend's
``gradient_divisor`` (the number of ranks) tells the optimizer to divide every
reduced gradient, dense or sparse, which turns the per-worker means back into
the mean over the global batch (given equal per-rank batch sizes, as Horovod
assumes). Write the loss exactly as for one process::

    loss = tf.reduce_mean(loss_fn(y, model(x)))       # local mean, as usual
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))

Do *not* divide by the global batch as in a tf.distribute custom loop: that
would shrink the step by the number of workers. ``model.fit`` is correct as is.

``all_reduce_sum`` (the global-norm partial sums of squares, replicated
buckets' gradients) and the all-gathers are exact sums/concatenations.

Reduce-scatter choice
---------------------
A gradient bucket (always padded to ``size * S``) is reduced one of three ways:

* ``"alltoall"``: ``hvd.alltoall`` sends row j of the bucket (viewed as
  [size, S]) to rank j; each rank sums the rows it receives, in rank order.
  The same bytes as a ring reduce-scatter, ``(size-1)/size`` of the bucket.
* ``"reducescatter"``: ``hvd.reducescatter``. Horovod splits the first
  dimension into near-equal parts, the first ``dim0 % size`` ranks getting
  one extra row; with padded buckets every rank receives exactly its
  contiguous slice ``[rank * S, (rank+1) * S)``.
* ``"allreduce"``: ``hvd.allreduce`` of the whole bucket, then this rank's
  slice. Twice the bytes of a reduce-scatter.

Measured on 2 CPU processes (ms per call, median, 2.6M float32, one compute
thread per rank; ``benchmarks/`` has the full runs):

==========  ========  =============  =============  ====================
controller  alltoall  reducescatter  allreduce      alltoall + allgather
==========  ========  =============  =============  ====================
Gloo        10.1      28.1           15.0           16.2
MPI         4.2       4.6            6.4            5.3
==========  ========  =============  =============  ====================

Horovod 0.28's Gloo reducescatter builds a new halving-doubling algorithm
(buffers, pair registration) on every call, hence its cost. ``"auto"``
(default) uses ``"reducescatter"`` where Horovod runs it on NCCL (GPU
tensors, NCCL built), which is ring-optimal there, and ``"alltoall"``
otherwise. Override with ``HorovodCollectives(reduce_scatter=...)`` or the
environment variable ``DISTADAM_HOROVOD_REDUCE_SCATTER`` (read when the
optimizer is built, which is how ``ShardedAdam(backend="horovod")``
constructs it).

Collective naming
-----------------
Horovod matches tensors across processes by name, so every rank must give a
collective the same name, unique among the collectives in flight. Names left
to Horovod derive from the input tensor's graph name, which depends on how
many ops the rank traced before it, and that differs between ranks (a rank
owning a shard that spans more variables traces more slicing ops): ranks
then wait for names no other rank submits. So in-step collectives are named
``distadam<k>.<name>``, from the name the optimizer gives each collective and
``k``, the backend's creation index in the process (every rank builds its
optimizers in the same order). Eager calls (consolidating state) are named
from a per-backend call counter.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import tensorflow as tf

from distadam.collectives.base import Collectives, slice_own_shard, sum_rows
from distadam.worker_grid import WorkerGrid


def _import_horovod():
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:  # optional dependency
        raise ImportError(
            "ShardedAdam(backend='horovod') needs Horovod with TensorFlow support. "
            "Run `./dev setup` (it builds Horovod 0.28.1 against this TensorFlow via "
            "scripts/install_horovod.sh), or use backend='tf.distribute'."
        ) from error
    return hvd


def _nccl_on_gpus(hvd) -> bool:
    """Whether Horovod will run reductions of this process's tensors on NCCL."""
    try:
        return bool(hvd.nccl_built()) and bool(tf.config.list_logical_devices("GPU"))
    except Exception:  # older builds lack nccl_built(): assume CPU collectives
        return False


_instance_counter = itertools.count()

_REDUCE_SCATTER_MODES = ("auto", "alltoall", "reducescatter", "allreduce")


class HorovodCollectives(Collectives):
    """Collectives over all Horovod processes (the global process set).

    Gradients are averaged over workers: ``gradient_divisor`` is the number
    of ranks (see the module docstring).

    Args:
        reduce_scatter: ``"auto"``, ``"alltoall"``, ``"reducescatter"`` or ``"allreduce"``
            (see the module docstring); default from
            ``DISTADAM_HOROVOD_REDUCE_SCATTER``, else ``"auto"``.
    """

    name = "horovod"

    def __init__(self, reduce_scatter: str | None = None):
        super().__init__()
        hvd = _import_horovod()
        try:
            initialized = hvd.is_initialized()
        except Exception:  # raises instead of answering on some builds
            initialized = False
        if not initialized:
            raise RuntimeError(
                "Horovod is not initialised: call horovod.tensorflow.init() at the "
                "start of the script (before building the optimizer) and launch it "
                "with horovodrun or mpirun."
            )
        if reduce_scatter is None:
            reduce_scatter = os.environ.get("DISTADAM_HOROVOD_REDUCE_SCATTER") or "auto"
        if reduce_scatter not in _REDUCE_SCATTER_MODES:
            raise ValueError(
                f"reduce_scatter must be one of {_REDUCE_SCATTER_MODES}, got {reduce_scatter!r}"
            )
        if reduce_scatter == "auto":
            reduce_scatter = "reducescatter" if _nccl_on_gpus(hvd) else "alltoall"
        self._hvd = hvd
        # Fixed for the life of the optimizer: the shard layout depends on it.
        # (Elastic Horovod, which changes the size, is not supported.)
        self._size = int(hvd.size())
        self._rank = int(hvd.rank())
        self.gradient_divisor = self._size
        self.reduce_scatter_mode = reduce_scatter
        self._name_prefix = f"distadam{next(_instance_counter)}"
        self._eager_calls = 0

    @property
    def num_workers(self) -> int:
        return self._size

    @property
    def rank(self) -> int:
        return self._rank

    def worker_index(self):
        return tf.constant(self._rank, dtype=tf.int32)

    def _op_name(self, name):
        return None if name is None else f"{self._name_prefix}.{name}"

    def _reduce_scatter_sum(self, flat, name):
        if self._size == 1:
            return flat
        length = flat.shape[0]
        if length is None or length % self._size:
            # Horovod would hand ranks unequal pieces that no longer line up
            # with the shards: refuse rather than train on misaligned state.
            raise ValueError(
                f"reduce-scatter input of length {length} is not a static multiple of "
                f"the {self._size} workers; distadam pads buckets to size * shard_size"
            )
        # Sums; the optimizer divides by gradient_divisor ("Gradient semantics").
        if self.reduce_scatter_mode == "alltoall":
            received = self._hvd.alltoall(flat, name=self._op_name(name))
            return sum_rows(tf.reshape(received, [self._size, length // self._size]))
        if self.reduce_scatter_mode == "reducescatter":
            return self._hvd.reducescatter(flat, op=self._hvd.Sum, name=self._op_name(name))
        reduced = self._hvd.allreduce(flat, op=self._hvd.Sum, name=self._op_name(name))
        return slice_own_shard(reduced, self._size, self.worker_index())

    def _all_reduce_sum(self, values, name):
        if self._size == 1:
            return values
        return self._hvd.allreduce(values, op=self._hvd.Sum, name=self._op_name(name))

    def _all_gather(self, shard, name):
        if self._size == 1:
            return shard
        return self._hvd.allgather(shard, name=self._op_name(name))

    def _all_gather_rows(self, rows, name):
        if self._size == 1:
            return rows
        return self._hvd.allgather(rows, name=self._op_name(name))  # first dimensions may differ

    def subgroup_ops(self, group_size):
        """Hybrid sharding's group collectives on Horovod process sets: one
        per group of ``group_size`` consecutive ranks and one per position
        across groups. Uses the sets registered by ``hvd.init(process_sets=
        distadam.collectives.horovod.hybrid_process_sets(hvd.size(), G))``, or
        adds them when Horovod runs with ``HOROVOD_DYNAMIC_PROCESS_SETS=1``."""
        if group_size == self._size:
            return None
        grid = WorkerGrid(self._size, group_size)
        groups, positions = grid.groups(), grid.positions()
        # Every rank resolves (and, in dynamic mode, adds) every set, in the
        # same order: adding a process set is itself a collective.
        sets = {tuple(ranks): self._process_set(ranks, group_size) for ranks in groups + positions}
        within = sets[tuple(groups[grid.group_of(self._rank)])]
        across = sets[tuple(positions[grid.shard_of(self._rank)])]
        return _HorovodSubgroupOps(self, within, across, group_size)

    def _process_set(self, ranks, group_size):
        """The process set of ``ranks``: declared at init, added by an earlier
        optimizer, or added now."""
        if len(ranks) == 1:
            return _SingleRank(ranks)  # a set of one: nothing to communicate
        if len(ranks) == self._size:  # groups of one: across is every rank
            return self._hvd.global_process_set
        key = tuple(ranks)
        # hybrid_process_sets() handed these to hvd.init(), which set their ids.
        known = _KNOWN_SETS.get(key)
        if known is not None and known.process_set_id is not None:
            return known
        try:
            process_set = self._hvd.add_process_set(list(ranks))
        except Exception as error:  # noqa: BLE001 - Horovod raises several kinds
            raise RuntimeError(
                f"shard_group_size={group_size} needs Horovod process sets for ranks {list(ranks)}: "
                "initialise Horovod with hvd.init(process_sets=distadam.collectives.horovod."
                f"hybrid_process_sets(hvd.size(), {group_size})), or run with "
                f"HOROVOD_DYNAMIC_PROCESS_SETS=1 ({type(error).__name__}: {error})") from error
        _KNOWN_SETS[key] = process_set
        return process_set

    def _eager_name(self, what):
        # Horovod matches ops across ranks by name, and eager ops have no graph
        # node name to borrow. A per-call name from a counter is identical on
        # every rank (all ranks make the same calls) and never collides with a
        # collective still in flight from another thread or optimizer.
        self._eager_calls += 1
        return f"{self._name_prefix}.{what}_{self._eager_calls}"

    def all_reduce_eagerly(self, values):
        values = np.asarray(values)
        if self._size == 1:
            return values
        name = self._eager_name("all_reduce_eagerly")
        return np.asarray(self._hvd.allreduce(tf.constant(values), op=self._hvd.Sum, name=name))

    def all_gather_eagerly(self, variables) -> list:
        """All-gather per-rank variables outside any step (EMA finalisation,
        consolidating state for a checkpoint): one grouped op."""
        tensors = [tf.convert_to_tensor(getattr(v, "value", v)) for v in variables]
        if self._size == 1 or not tensors:
            return [np.asarray(t) for t in tensors]
        gathered = self._hvd.grouped_allgather(tensors, name=self._eager_name("gather_eagerly"))
        return [np.asarray(t) for t in gathered]


def hybrid_process_sets(size: int, group_size: int) -> list:
    """The Horovod process sets ``ShardedAdam(shard_group_size=group_size)``
    needs among ``size`` ranks, to pass to ``hvd.init(process_sets=...)``
    (every rank passes the same list): each group of consecutive ranks, and
    each position across groups."""
    hvd = _import_horovod()
    if group_size < 1 or size % group_size or group_size == size:
        raise ValueError(f"group_size must be a divisor of size ({size}) smaller than it, got {group_size}")
    grid = WorkerGrid(size, group_size)
    sets = [hvd.ProcessSet(ranks) for ranks in grid.groups() + grid.positions() if len(ranks) > 1]
    # hvd.init() sets their ids; the backend finds them here by their ranks.
    _KNOWN_SETS.update((tuple(ps.ranks), ps) for ps in sets)
    return sets


#: ranks -> the ProcessSet object Horovod registered for them (Horovod keeps
#: no public table of its sets, and refuses to add one twice).
_KNOWN_SETS = {}


class _SingleRank:
    """A process set of one rank (G = 1 groups, or one group per position):
    Horovod needs no set for it and the collectives are the identity."""

    process_set_id = "single"

    def __init__(self, ranks):
        self.ranks = list(ranks)


class _HorovodSubgroupOps:
    """Hybrid sharding's group collectives on two Horovod process sets. Names
    carry the set, so equal names in different sets never meet."""

    def __init__(self, collectives, within, across, group_size):
        self._collectives = collectives
        self._hvd = collectives._hvd
        self._within = within
        self._across = across
        self._group_size = group_size

    def _name(self, name, process_set):
        return None if name is None else f"{self._collectives._op_name(name)}.set{process_set.process_set_id}"

    def _sum(self, values, name, process_set):
        if len(process_set.ranks) == 1:
            return values
        return self._hvd.allreduce(values, op=self._hvd.Sum, name=self._name(name, process_set),
                                   process_set=process_set)

    def reduce_scatter_within(self, flat, name):
        size = self._group_size
        if size == 1:
            return flat
        received = self._hvd.alltoall(flat, name=self._name(name, self._within), process_set=self._within)
        return sum_rows(tf.reshape(received, [size, -1]))

    def all_reduce_across(self, values, name):
        return self._sum(values, name, self._across)

    def all_gather_within(self, shard, name):
        if self._group_size == 1:
            return shard
        return self._hvd.allgather(shard, name=self._name(name, self._within), process_set=self._within)
