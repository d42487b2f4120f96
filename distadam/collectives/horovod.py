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

from distadam.collectives.base import Collectives, slice_own_shard


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
            rows = tf.reshape(received, [self._size, length // self._size])
            return tf.reduce_sum(rows, axis=0)
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
