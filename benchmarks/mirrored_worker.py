"""One MirroredStrategy benchmark process: ShardedAdam vs keras.optimizers.Adam
under the same strategy on N logical CPU devices, same models, same data.

usage: python benchmarks/mirrored_worker.py --replicas N [--tasks memory,collectives,bytes,timing]
       [--collective-sizes 10,100,1000] [--timing-models update_bound,compute_bound]
       [--repetitions R] [--steps S] [--warmup W] --out result.json

Run each N in its own process: TensorFlow allows one MirroredStrategy per
process (a second one collides on collective keys).
"""

from __future__ import annotations

import argparse

from harness import steps, tasks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, required=True)
    # Tracing Keras Adam's per-variable update under MirroredStrategy costs
    # seconds per variable and replica; its launch count is one packed
    # all-reduce at every size, so the baseline is traced up to this size only.
    parser.add_argument("--baseline-collective-max", type=int, default=100)
    tasks.add_task_arguments(parser)
    return parser.parse_args(argv)


ARGS = parse_args()
steps.quiet_tensorflow()
steps.use_logical_cpus(ARGS.replicas)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

N = ARGS.replicas

# Optimizer configurations for the memory measurement: the default, and every
# optional state kind at once (what the planner's flags model).
MEMORY_CONFIGS = {
    "default": {},
    "amsgrad_ema_accumulation": {"amsgrad": True, "use_ema": True, "gradient_accumulation_steps": 2},
}


class Mirrored(tasks.Setup):
    """N logical CPU devices under one MirroredStrategy: one traced graph
    holds every replica's ops."""

    def __init__(self, replicas):
        self.workers = self.replicas_in_graph = replicas
        self.strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])

    def scope(self):
        return self.strategy.scope()

    def make_step(self, name, model, optimizer, batch_per_replica):
        """A custom-loop step as the README describes (loss averaged over the
        global batch, apply_gradients inside strategy.run)."""
        global_batch = self.workers * batch_per_replica

        @tf.function
        def step(x, y):
            def replica_fn(x, y):
                with tf.GradientTape() as tape:
                    per_example = tf.reduce_mean(tf.square(model(x, training=True) - y), axis=-1)
                    loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            return self.strategy.run(replica_fn, args=(x, y))

        return step

    def batch(self, input_dim, output_dim, batch_per_replica, seed=0):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(N, batch_per_replica, input_dim)).astype("float32")
        y = rng.normal(size=(N, batch_per_replica, output_dim)).astype("float32")
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: (tf.constant(x[ctx.replica_id_in_sync_group]), tf.constant(y[ctx.replica_id_in_sync_group]))
        )

    def fetch(self, result):
        return self.strategy.experimental_local_results(result)[0].numpy()


def main():
    setup = Mirrored(N)
    result = {"replicas": N, "strategy": "MirroredStrategy", "devices": list(setup.strategy.extended.worker_devices)}
    tasks.run_tasks(setup, ARGS, result, memory_configs=MEMORY_CONFIGS, baseline_max=ARGS.baseline_collective_max)


if __name__ == "__main__":
    main()
