"""Horovod benchmark process (launch with horovodrun/mpirun, one rank per
process): ShardedAdam with its Horovod backend vs the Horovod baseline,
``hvd.grouped_allreduce`` (average) of the gradients followed by
``keras.optimizers.Adam``, on the same models and data. Rank 0 writes JSON.

usage: horovodrun -np 2 -H localhost:2 --gloo python benchmarks/horovod_worker.py --out result.json

The baseline is built from Horovod's tensor ops because Horovod 0.28's
``horovod.tensorflow.keras.DistributedOptimizer`` wraps a Keras 3 optimizer
without averaging anything (see distadam/horovod_keras.py): timing it would
time a broken optimizer.
"""

from __future__ import annotations

import argparse

from harness import steps, tasks

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
tasks.add_task_arguments(parser)
ARGS = parser.parse_args()
steps.quiet_tensorflow()

import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

hvd.init()
# Ranks share the machine's cores: one compute thread each avoids
# oversubscription that would swamp the measurement.
tf.config.threading.set_intra_op_parallelism_threads(1)
RANK, SIZE = hvd.rank(), hvd.size()


class AllreduceAdamStep:
    """The Horovod data-parallel baseline: average gradients with one grouped
    all-reduce, then a full (unsharded) Adam update on every rank."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def __call__(self, grads):
        grads = hvd.grouped_allreduce(grads, op=hvd.Average)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))


class Horovod(tasks.Setup):
    """One rank per process: a traced graph holds this rank's ops only."""

    workers, replicas_in_graph = SIZE, 1

    def make_step(self, name, model, optimizer, batch_per_replica):
        """Per-rank mean loss, as Horovod scripts write it (the Horovod backend
        and the baseline both average over ranks)."""
        baseline = AllreduceAdamStep(model, optimizer) if name == "adam" else None

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            if baseline is None:
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
            else:
                baseline(grads)
            return loss

        return step

    def batch(self, input_dim, output_dim, batch_per_replica, seed=0):
        rng = np.random.default_rng(seed + RANK)
        return (tf.constant(rng.normal(size=(batch_per_replica, input_dim)).astype("float32")),
                tf.constant(rng.normal(size=(batch_per_replica, output_dim)).astype("float32")))

    def fetch(self, result):
        return result.numpy()

    def per_replica(self, totals):
        # One process = one replica: the per-"device" dict has a single entry.
        return sum(totals.values())

    def start_from_the_same_weights(self, pairs, tag):
        # Both start from rank 0's weights, as a real Horovod job would.
        for model, _ in pairs.values():
            for variable in model.trainable_variables:
                variable.assign(hvd.broadcast(variable.value, root_rank=0, name=f"bcast_{tag}_{variable.path}"))

    def backend_info(self, backend):
        return {"reduce_scatter_mode": getattr(backend, "reduce_scatter_mode", None)}


def main():
    result = {"replicas": SIZE, "strategy": "horovod", "baseline": "hvd.grouped_allreduce(Average) + keras Adam",
              "horovod_version": __import__("horovod").__version__,
              "controller": "mpi" if hvd.mpi_enabled() else "gloo"}
    tasks.run_tasks(Horovod(), ARGS, result, memory_configs={"default": {}}, write=RANK == 0)


if __name__ == "__main__":
    main()
