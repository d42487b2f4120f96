"""Several MirroredStrategy instances, one after another, in one process
(issue 25, item 4): what a notebook comparing optimizers, a tuner or a
harness does. TensorFlow gives every strategy instance group key 1 and
instance keys from 100, so collectives of different types or dtypes under two
strategies met on one key ("Collective instance 100 expected type 0 ... got
type 2"); distadam's collectives now have keys of their own per strategy.

usage: python two_strategies.py N

Trains the same model on the same data with `model.fit` under a fresh
MirroredStrategy(N) each time: Keras Adam, ShardedAdam (global_clipnorm,
eager all-reduces through a checkpoint-style call), ShardedAdam in groups of
N/2, ShardedAdam with SwapEMAWeights, then the pair Keras Adam / ShardedAdam
under the mixed_bfloat16 policy. Prints "RESULT {json}": each run's final
weights' largest relative difference from its one-device reference.
"""

import json
import sys

import common

replicas = int(sys.argv[1])
common.use_logical_cpus(replicas)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

rng = np.random.default_rng(0)
x = rng.normal(size=(96, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(96, 1))).astype("float32")


def train(make_optimizer, mirrored=True, swap_ema=False):
    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)]) if mirrored
                else tf.distribute.get_strategy())
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = make_optimizer()
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    if swap_ema:
        # Validation with the EMA weights swapped in, training on the raw ones.
        history = model.fit(x[:72], y[:72], batch_size=24, epochs=3, shuffle=False, verbose=0,
                            validation_data=(x[72:], y[72:]), callbacks=[keras.callbacks.SwapEMAWeights()])
        return [w.copy() for w in model.get_weights()], history.history["val_loss"]
    model.fit(x, y, batch_size=24, epochs=3, shuffle=False, verbose=0)
    if isinstance(optimizer, distadam.ShardedAdam):
        # An eager all-reduce (float64) as checkpoints and EMA finalize use.
        optimizer.collectives.all_reduce_eagerly(np.ones([16]))
    return [w.copy() for w in model.get_weights()]


def difference(weights, reference):
    return max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))
               for a, b in zip(weights, reference))


# References on one device (Keras Adam under a strategy clips each replica's
# gradient, not the global one). clipnorm 0.5: the first updates are clipped,
# later ones not (Adam ignores a constant scale: only a mix tells clipping
# apart from none).
plain = train(lambda: keras.optimizers.Adam(0.01), mirrored=False)
clipped = train(lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.5), mirrored=False)
# Op-by-op updates (fused_update=False): the keys are the point here, and
# XLA-compiling every bucket for every replica of every strategy is most of
# the time such a process takes.
result = {
    "keras": difference(train(lambda: keras.optimizers.Adam(0.01)), plain),
    "sharded": difference(train(lambda: distadam.ShardedAdam(0.01, global_clipnorm=0.5, fused_update=False)),
                          clipped),
}
if replicas % 2 == 0:
    # Hybrid sharding: subgroup keys of their own too (groups of 1 at N=2).
    result["sharded_in_groups"] = difference(train(lambda: distadam.ShardedAdam(
        0.01, global_clipnorm=0.5, shard_group_size=replicas // 2, fused_update=False)), clipped)
result["clipping_changed_the_result"] = difference(plain, clipped)

# keras.callbacks.SwapEMAWeights (it reads _model_variables_moving_average):
# validation losses on the EMA weights and the final (EMA) weights equal Keras
# Adam's with the same callback on one device.
ema_weights, ema_val = train(lambda: keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.5),
                             mirrored=False, swap_ema=True)
weights, val = train(lambda: distadam.ShardedAdam(0.01, use_ema=True, ema_momentum=0.5, fused_update=False),
                     swap_ema=True)
result["sharded_swap_ema_weights"] = difference(weights, ema_weights)
result["sharded_swap_ema_val_loss"] = max(abs(a - b) / abs(b) for a, b in zip(val, ema_val))
result["swap_ema_changed_the_result"] = difference(ema_weights, plain)

# Keras Adam under a new strategy after the ShardedAdam ones (the other
# direction of the collision), then ShardedAdam again, in mixed precision.
keras.mixed_precision.set_global_policy("mixed_bfloat16")
mixed_reference = train(lambda: keras.optimizers.Adam(0.01))
result["sharded_mixed_bfloat16"] = difference(train(lambda: distadam.ShardedAdam(0.01, fused_update=False)),
                                              mixed_reference)
print("RESULT " + json.dumps(result), flush=True)
common.exit_now(None)
