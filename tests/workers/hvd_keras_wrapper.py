"""Horovod's own Keras DistributedOptimizer vs ShardedAdam on Keras 3, with
rank-specific data: rank r fits a single weight w to the target 2 * (r + 1).

Averaged gradients drive w to the mean target on every rank; a wrapper that
does not average leaves each rank at its own target. Emits one result (rank
0, see mpi_results) with every rank's final weight for each optimizer.

usage: horovodrun -np N python hvd_keras_wrapper.py
"""

import warnings

import numpy as np

import common  # noqa: F401  (sets TF logging before TF loads)
from mpi_results import emit

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402
from distadam import horovod_keras  # noqa: E402

hvd.init()
rank, size = hvd.rank(), hvd.size()
target = 2.0 * (rank + 1)
x = np.ones((64, 1), np.float32)
y = np.full((64, 1), target, np.float32)


def final_weight(optimizer, callbacks=()):
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=25, shuffle=False, verbose=0, callbacks=list(callbacks))
    return float(model.get_weights()[0].ravel()[0])


results = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import horovod.tensorflow.keras as hvd_keras

        wrapped = hvd_keras.DistributedOptimizer(keras.optimizers.Adam(0.05))
        results["horovod_keras_distributed_optimizer"] = final_weight(wrapped)
    except Exception as error:  # a future Horovod may refuse Keras 3 outright
        results["horovod_keras_error"] = f"{type(error).__name__}: {error}"

results["distadam_sharded_adam"] = final_weight(distadam.ShardedAdam(0.05), horovod_keras.callbacks())

gathered = {
    key: [float(v) for v in hvd.allgather(tf.constant([value], tf.float64), name=f"gather_{key}").numpy()]
    for key, value in sorted(results.items()) if isinstance(value, float)
}
if rank == 0:
    emit({
        "workers": size,
        "targets": [2.0 * (r + 1) for r in range(size)],
        "final_weights": gathered,
        "errors": {k: v for k, v in results.items() if not isinstance(v, float)},
    }, rank)
common.exit_now(before=hvd.shutdown)
