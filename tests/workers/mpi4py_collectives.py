"""A complete distadam communication backend in one file: collectives over
mpi4py, one MPI rank per worker. It exists to prove the README's claim that
a new backend is one file (nothing else in distadam knows about it), and it
is a fair template for one.

In-step collectives run as ``tf.numpy_function`` calls into MPI. MPI needs
every rank to issue its collectives in the same order, but TensorFlow may run
independent ops in any order (or at once); so each collective traced into a
graph depends on the previous one of that graph, which makes the order the
trace order, identical on every rank.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from mpi4py import MPI

from distadam.collectives import Collectives


class MPI4PyCollectives(Collectives):
    name = "mpi4py"

    def __init__(self, comm=None):
        super().__init__()
        self._comm = comm or MPI.COMM_WORLD
        self._last = {}  # graph -> the last collective traced into it

    @property
    def num_workers(self) -> int:
        return self._comm.Get_size()

    def worker_index(self):
        return tf.constant(self._comm.Get_rank(), tf.int32)

    # ---------------------------------------------------- in-step collectives
    def _in_order(self, fn, tensor, shape):
        graph = tf.compat.v1.get_default_graph()
        previous = self._last.get(graph)
        with tf.control_dependencies([previous] if previous is not None else []):
            result = tf.numpy_function(fn, [tensor], tensor.dtype, stateful=True)
        result.set_shape(shape)
        self._last[graph] = result
        return result

    def _reduce_scatter_sum(self, flat, name):
        n = self.num_workers
        size = int(flat.shape[0])

        def reduce_scatter(x):
            out = np.empty(size // n, dtype=x.dtype)
            self._comm.Reduce_scatter_block(np.ascontiguousarray(x), out, op=MPI.SUM)
            return out

        return self._in_order(reduce_scatter, flat, [size // n])

    def _all_reduce_sum(self, values, name):
        def all_reduce(x):
            out = np.empty_like(x)
            self._comm.Allreduce(np.ascontiguousarray(x), out, op=MPI.SUM)
            return out

        return self._in_order(all_reduce, values, values.shape)

    def _all_gather(self, shard, name):
        n = self.num_workers
        size = int(shard.shape[0])

        def all_gather(x):
            out = np.empty(size * n, dtype=x.dtype)
            self._comm.Allgather(np.ascontiguousarray(x), out)
            return out

        return self._in_order(all_gather, shard, [size * n])

    def _all_gather_rows(self, rows, name):
        tail = rows.shape[1:]

        def all_gather_rows(x):
            x = np.ascontiguousarray(x)
            counts = self._comm.allgather(x.shape[0])
            row = int(np.prod(x.shape[1:], dtype=np.int64))
            out = np.empty((sum(counts),) + x.shape[1:], dtype=x.dtype)
            self._comm.Allgatherv(x, [out, [c * row for c in counts]])
            return out

        return self._in_order(all_gather_rows, rows, [None, *tail])

    # ----------------------------------------------------------- eager calls
    def all_reduce_eagerly(self, values):
        values = np.ascontiguousarray(values)
        out = np.empty_like(values)
        self._comm.Allreduce(values, out, op=MPI.SUM)
        return out

    def all_gather_eagerly(self, variables):
        gathered = []
        for variable in variables:
            local = np.ascontiguousarray(np.asarray(getattr(variable, "value", variable)))
            out = np.empty(local.size * self.num_workers, dtype=local.dtype)
            self._comm.Allgather(local, out)
            gathered.append(out)
        return gathered
