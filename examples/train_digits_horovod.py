"""Keras 3 ``model.fit`` under Horovod with ShardedAdam: the digits data set (examples/data/).

    horovodrun -np 2 -H localhost:2 python examples/train_digits_horovod.py
    horovodrun -np 2 -H localhost:2 --mpi python examples/train_digits_horovod.py
    mpirun -np 2 python examples/train_digits_horovod.py       # Horovod over plain mpirun
    launch/horovodrun_local.sh examples/train_digits_horovod.py --epochs 5

What makes Horovod work on Keras 3 here (none of it uses horovod.tensorflow.keras,
whose DistributedOptimizer silently skips the averaging on Keras 3):

* ``hvd.init()`` before the optimizer is built: ShardedAdam then picks its
  Horovod backend, shards Adam's m and v over the ranks and averages the
  gradients, so each rank's loss is the plain mean over its own batch;
* ``distadam.horovod_keras.callbacks()``: rank 0's initial weights and
  optimizer step are broadcast when training starts, and the epoch metrics
  are averaged over ranks;
* every rank reads a disjoint, equally sized shard of the data, and the
  *global* batch is ``--batch-size``, split over the ranks.

On GPUs, also pass ``jit_compile=False`` to ``compile``: Horovod's ops have no
XLA kernels in a CPU-built Horovod (Keras only auto-enables XLA on GPU).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from train_digits import load_data  # noqa: E402  (same data and split as the main job)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None,
                        help="rank 0 saves the best weights here (a .weights.h5 path)")
    return parser.parse_args(argv)


def shard(x, y, rank, size, local_batch):
    """This rank's equal share: whole local batches only, so every rank runs
    the same number of steps (a rank with one step more would wait forever in
    a collective the others never join)."""
    per_rank = (len(x) // (size * local_batch)) * local_batch
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return x[rows], y[rows]


def main(argv=None):
    args = parse_args(argv)

    import horovod.tensorflow as hvd

    hvd.init()  # before the optimizer is built: ShardedAdam picks the Horovod backend
    import keras

    import distadam
    from distadam import horovod_keras

    rank, size = hvd.rank(), hvd.size()
    if args.batch_size % size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {size} ranks")
    local_batch = args.batch_size // size

    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    x_local, y_local = shard(x_train, y_train, rank, size, local_batch)
    x_val, y_val = shard(x_test, y_test, rank, size, local_batch)

    keras.utils.set_random_seed(args.seed + rank)  # deliberately different: the broadcast fixes it
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(args.hidden, activation="relu"),
        keras.layers.Dense(10),
    ])
    optimizer = distadam.ShardedAdam(learning_rate=args.learning_rate)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    callbacks = horovod_keras.callbacks()  # broadcast first, then metric averaging
    if args.checkpoint:
        # On every rank, not only rank 0: saving gathers the optimizer shards.
        # After MetricAverageCallback, so all ranks judge "best" on the same,
        # global metric. Only rank 0 keeps a file.
        callbacks.append(horovod_keras.ModelCheckpoint(
            args.checkpoint, monitor="val_accuracy", save_best_only=True, save_weights_only=True))

    history = model.fit(x_local, y_local, batch_size=local_batch, epochs=args.epochs,
                        validation_data=(x_val, y_val), shuffle=True,
                        callbacks=callbacks, verbose=2 if rank == 0 else 0)

    state = sum(optimizer.state_bytes_per_device().values())
    adam_bytes = 2 * sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    if rank == 0:
        print(f"optimizer state on each of {size} ranks: {state} bytes "
              f"(keras.optimizers.Adam: {adam_bytes} bytes on every rank)", flush=True)
        print("RESULT " + json.dumps({
            "ranks": size,
            "global_batch": args.batch_size,
            "val_accuracy": history.history["val_accuracy"][-1],
            "loss": history.history["loss"][-1],
            "state_bytes_per_rank": state,
            "keras_adam_state_bytes": adam_bytes,
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
