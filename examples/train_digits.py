"""Train a small MLP on the digits data set (examples/data/) with ShardedAdam, on any launcher.

The same script runs unchanged

* alone:                 python examples/train_digits.py            (2 local replicas)
* on local processes:    distadam-launch --nproc 2 examples/train_digits.py
* under MPI/Slurm/Kubernetes: the cluster is read from the environment
  (``distadam.strategy_from_env``; see distadam/cluster.py);
* with Horovod:          horovodrun -np 2 python examples/train_digits.py --backend horovod

Every run with the same ``--seed`` and ``--batch-size`` (the *global* batch)
sees the same examples in the same global batches, whatever the number of
replicas, so its weights match single-device Adam up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over all replicas")
    parser.add_argument("--replicas", type=int, default=2,
                        help="logical CPU replicas when run without a cluster (ignored under a launcher)")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    parser.add_argument("--optimizer", choices=("sharded", "keras"), default="sharded",
                        help="'keras' trains with keras.optimizers.Adam, as a reference")
    parser.add_argument("--backend", choices=("tf.distribute", "horovod"), default="tf.distribute",
                        help="'horovod' for horovodrun/mpirun with Horovod (one replica per process)")
    parser.add_argument("--shard-group-size", type=int, default=None, metavar="G",
                        help="hybrid sharding: state sharded within groups of G workers, replicated across "
                             "groups (must divide the number of workers; default: all workers)")
    parser.add_argument("--stall-timeout", type=float, default=300.0,
                        help="end this worker (exit code 75) when no step completes for this many seconds, "
                             "e.g. because a peer hangs; one watchdog thread (distadam.watchdog). 0: off")
    parser.add_argument("--collective-timeout", type=float, default=0.0,
                        help="TensorFlow's own per-collective timeout in seconds (0: off, the default). "
                             "Costs about 2 threads per collective, each alive this long: prefer "
                             "--stall-timeout")
    parser.add_argument("--preemption-check-every", type=int, default=1,
                        help="steps between the workers' agreement on a received SIGTERM; on SIGTERM "
                             "every worker saves the current step (with --checkpoint-dir) and exits "
                             "with code 42")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="resume from the newest usable sharded checkpoint here and save one every "
                             "--checkpoint-every steps (a directory shared by all workers)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints (default: once per epoch)")
    parser.add_argument("--out", default=None,
                        help="save final weights and metrics to this .npz; '{rank}' in the path is "
                             "replaced by the worker's rank (otherwise only rank 0 writes)")
    args = parser.parse_args(argv)
    for name in ("stall_timeout", "collective_timeout"):
        value = getattr(args, name)
        if not np.isfinite(value) or value < 0:
            parser.error(f"--{name.replace('_', '-')} must be a finite number of seconds >= 0, got {value}")
    if args.preemption_check_every < 1:
        parser.error("--preemption-check-every must be at least 1")
    return args


#: The digits data set, stored with the example (examples/data/README.md).
DIGITS = Path(__file__).resolve().parent / "data" / "digits.npz"


def load_data(seed, path=DIGITS):
    """Digits (1797 8x8 images of pixels 0..16, from examples/data/), 80/20 split."""
    with np.load(path, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    if (images.shape != (1797, 64) or labels.shape != (1797,) or images.dtype != np.uint8
            or labels.dtype != np.uint8 or images.max() > 16 or labels.max() > 9):
        raise ValueError(f"{path}: not the digits data set (see examples/data/README.md)")
    x = (images / 16.0).astype("float32")
    y = labels.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def build_model(hidden, seed):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="digits_mlp",
    )


class DistributeRuntime:
    """tf.distribute: the strategy comes from the launch environment."""

    def __init__(self, args):
        import distadam

        self.cluster = distadam.resolve_cluster()
        environ = dict(os.environ)
        if not self.cluster.is_distributed:
            environ.setdefault(distadam.cluster.LOGICAL_DEVICES_ENV, str(args.replicas))
        self.strategy = distadam.strategy_from_env(
            communication_timeout=args.collective_timeout or None, environ=environ, cluster=self.cluster
        )
        self.rank = self.cluster.rank
        self.world_size = self.cluster.world_size
        self.replicas = self.strategy.num_replicas_in_sync
        self.description = f"{self.cluster.source}, {self.world_size} worker(s)"

    def scope(self):
        return self.strategy.scope()

    def train_step_fn(self, model, optimizer, loss_object, global_batch, per_replica):
        import tensorflow as tf

        strategy = self.strategy

        @tf.function
        def train_step(x, y):
            def step_fn(x, y):
                with tf.GradientTape() as tape:
                    per_example = loss_object(y, model(x, training=True))
                    loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            per_replica_loss = strategy.run(step_fn, args=(x, y))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)

        def slices(array, batch):
            # Replica r (global id, across all workers) always gets the r-th
            # contiguous slice of the global batch, so the union of what the
            # replicas see is exactly the single-device batch.
            def replica_slice(context):
                start = context.replica_id_in_sync_group * per_replica
                return tf.constant(array[batch[start:start + per_replica]])

            return strategy.experimental_distribute_values_from_function(replica_slice)

        return lambda x, y, batch: float(train_step(slices(x, batch), slices(y, batch)))


class HorovodRuntime:
    """Horovod (horovodrun/mpirun): one replica per process, no strategy.

    ShardedAdam picks its Horovod backend by itself once hvd.init() has run,
    and averages the gradients over ranks: the loss is the plain local mean."""

    def __init__(self, args):
        import horovod.tensorflow as hvd

        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.world_size = self.replicas = hvd.size()
        self.description = f"Horovod, {self.world_size} process(es)"

    def scope(self):
        import contextlib

        return contextlib.nullcontext()

    def train_step_fn(self, model, optimizer, loss_object, global_batch, per_replica):
        import tensorflow as tf

        from distadam import horovod_keras

        hvd = self.hvd
        # Start every rank from rank 0's weights; the seeded init already makes
        # them equal, but a real job may have loaded a checkpoint on rank 0 only.
        horovod_keras.broadcast_model_and_optimizer(model, optimizer)

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_object(y, model(x, training=True)))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return hvd.allreduce(loss, op=hvd.Average, name="digits_loss")

        def step(x, y, batch):
            mine = batch[self.rank * per_replica:(self.rank + 1) * per_replica]
            return float(train_step(tf.constant(x[mine]), tf.constant(y[mine])))

        return step


def main(argv=None):
    args = parse_args(argv)
    runtime = HorovodRuntime(args) if args.backend == "horovod" else DistributeRuntime(args)
    # From here on a SIGTERM is held (creating the strategy installed
    # TensorFlow's handler, which would swallow it) until the preemption
    # guard, which needs the optimizer, takes over and acts on it.
    from distadam.preemption import catch_signals

    caught = catch_signals()

    import keras

    import distadam
    from distadam.watchdog import StallWatchdog, long_operation

    replicas = runtime.replicas
    if args.batch_size % replicas:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {replicas} replicas")
    per_replica = args.batch_size // replicas

    def log(message):
        if runtime.rank == 0:
            print(message, flush=True)

    log(f"cluster: {runtime.description}, {replicas} replica(s) in sync; "
        f"global batch {args.batch_size} ({per_replica} per replica)")

    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    with runtime.scope():
        model = build_model(args.hidden, args.seed)
        if args.optimizer == "sharded":
            optimizer = distadam.ShardedAdam(learning_rate=args.learning_rate,
                                             shard_group_size=args.shard_group_size)
        else:
            optimizer = keras.optimizers.Adam(learning_rate=args.learning_rate)
        optimizer.build(model.trainable_variables)
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    train_step = runtime.train_step_fn(model, optimizer, loss_object, args.batch_size, per_replica)

    steps_per_epoch = len(x_train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    manager = None
    if args.checkpoint_dir:
        if args.optimizer != "sharded":
            raise SystemExit("--checkpoint-dir needs the sharded optimizer")
        from distadam.checkpoint import ShardedCheckpointManager

        manager = ShardedCheckpointManager(args.checkpoint_dir, model, optimizer)
    # Before restoring: a SIGTERM held since the strategy was created is acted
    # on after the first step.
    guard = start_preemption_guard(args, optimizer, manager, caught)
    if manager is not None:
        restored = manager.restore()
        log(f"resumed from {restored} at step {int(optimizer.iterations.numpy())}" if restored
            else f"no checkpoint in {args.checkpoint_dir}: starting from scratch")
    checkpoint_every = args.checkpoint_every or steps_per_epoch
    # No step for --stall-timeout seconds (a peer hangs): end this worker, exit 75.
    watchdog = StallWatchdog(args.stall_timeout) if args.stall_timeout > 0 else None
    # The data order depends only on (seed, epoch), so a resumed run continues
    # exactly where the checkpoint left off.
    step = int(optimizer.iterations.numpy())
    started = time.perf_counter()
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= total_steps:
            break
        order = np.random.default_rng([args.seed, epoch]).permutation(len(x_train))
        losses = []
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            losses.append(train_step(x_train, y_train, order[b * args.batch_size:(b + 1) * args.batch_size]))
            step += 1
            if manager is not None and step % checkpoint_every == 0:
                manager.save()
            if watchdog is not None:
                watchdog.beat()
            if guard is not None:
                guard.step_done()  # on SIGTERM: every worker saves this step and exits (code 42)
        with long_operation("evaluation"):  # not a stall (saves announce themselves)
            accuracy = evaluate(model, x_test, y_test)
        log(f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f}, test accuracy {accuracy:.4f} "
            f"({time.perf_counter() - started:.1f}s)")
    if watchdog is not None:
        watchdog.close()

    accuracy = evaluate(model, x_test, y_test)
    state = optimizer_state_report(optimizer, model)
    log(f"final test accuracy: {accuracy:.4f} after {step} steps")
    log(f"optimizer state per replica: {state['per_replica_bytes']} bytes; keras.optimizers.Adam would hold "
        f"{state['keras_adam_bytes']} bytes on every replica ({state['ratio']:.2f}x)")
    log("RESULT " + json.dumps({"test_accuracy": accuracy, "steps": step, "replicas": replicas,
                                "world_size": runtime.world_size, "backend": args.backend, **state}))
    if args.out:
        save_weights(args.out, model, runtime.rank, accuracy, step)
    return 0


def start_preemption_guard(args, optimizer, manager, caught):
    """SIGTERM -> every worker saves the current step and exits with 42. Only
    with ShardedAdam, whose collectives carry the workers' agreement."""
    from distadam.preemption import PreemptionGuard

    if not hasattr(optimizer, "collectives"):
        caught.close()  # nothing will act on a held signal: the default applies again
        if caught.received is not None:
            raise SystemExit(f"received signal {caught.received} before training started")
        return None
    return PreemptionGuard(optimizer, manager, check_every=args.preemption_check_every,
                           log=lambda message: print(message, flush=True), caught=caught)


def evaluate(model, x, y) -> float:
    # The replicated weights are identical on every worker: evaluate locally,
    # no collectives needed.
    logits = model(x, training=False)
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y))


def optimizer_state_report(optimizer, model) -> dict:
    """Optimizer-state bytes held per replica, against Keras Adam's m and v
    (two float32 copies of every trainable weight on every replica)."""
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    keras_adam_bytes = 2 * 4 * params
    if hasattr(optimizer, "state_bytes_per_device"):
        per_device = optimizer.state_bytes_per_device()
        per_replica = max(per_device.values())
    else:
        per_replica = keras_adam_bytes
    return {
        "params": params,
        "per_replica_bytes": per_replica,
        "keras_adam_bytes": keras_adam_bytes,
        "ratio": per_replica / keras_adam_bytes,
    }


def save_weights(pattern, model, rank, accuracy, steps):
    if "{rank}" not in pattern and rank != 0:
        return
    path = pattern.replace("{rank}", str(rank))
    arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    tmp = path + ".tmp.npz"
    np.savez(tmp, test_accuracy=accuracy, steps=steps, **arrays)
    os.replace(tmp, path)  # readers never see a half-written file


if __name__ == "__main__":
    sys.exit(main())
