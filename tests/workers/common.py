"""Shared pieces of the test workers: model, data, reference optimizer, steps.

Workers run in their own processes because TF allows one distribution
strategy per process (a second one collides on collective keys)."""

import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _exit_on_uncaught(exc_type, exc, tb):
    """A worker that fails exits at once with status 1 and its traceback:
    the interpreter's teardown with a TensorFlow strategy can hang for
    minutes on a loaded machine (see :func:`exit_now`)."""
    traceback.print_exception(exc_type, exc, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


sys.excepthook = _exit_on_uncaught

import inspect

import numpy as np
import tensorflow as tf
import keras

from distadam import arguments as distadam_arguments

GLOBAL_BATCH = 24
VOCAB = 30


def use_logical_cpus(n):
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    )


def make_model(seed=7, hidden_units=11, dense=False):
    """Variables of several shapes and sizes, including a sparse-gradient
    Embedding (``dense=True``: the tokens go through a Dense layer instead, so
    every element of every variable gets a gradient)."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    dense_in = keras.Input((3,), name="features")
    if dense:
        x = keras.layers.Dense(6, name="token_mix")(keras.ops.cast(tokens, "float32") / VOCAB)
    else:
        x = keras.layers.Embedding(VOCAB, 6, name="embed")(tokens)
        x = keras.layers.Flatten()(x)
    x = keras.layers.Concatenate()([x, dense_in])
    x = keras.layers.Dense(hidden_units, activation="tanh", name="hidden")(x)
    x = keras.layers.Dense(7, activation="relu", use_bias=False, name="nobias")(x)
    out = keras.layers.Dense(2, name="head")(x)
    return keras.Model([tokens, dense_in], out)


def make_data(steps, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    n = steps * GLOBAL_BATCH
    tokens = rng.integers(0, VOCAB, size=(n, 5)).astype("int32")
    features = rng.normal(size=(n, 3)).astype("float32")
    targets = (scale * rng.normal(size=(n, 2))).astype("float32")
    return (tokens, features), targets


class DenseGradientAdam(keras.optimizers.Adam):
    """Keras Adam applied to the densified gradient.

    Keras' Adam squares tf.IndexedSlices values before summing duplicate rows
    (so v gets sum(g_i^2) instead of (sum g_i)^2); Adam on the mean gradient
    of the batch is the dense update, which is what ShardedAdam computes.

    It also counts the updates whose gradient its clipping changed: Adam is
    blind to a constant gradient scale, so a clipping case proves something
    only if some updates are clipped and some are not."""

    def apply(self, grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(grads, trainable_variables)

    def build(self, variables):
        super().build(variables)
        with tf.init_scope():
            # [updates clipped, updates seen]; untracked so `variables` stays Adam's.
            object.__setattr__(self, "_clip_record", tf.Variable([0, 0], dtype=tf.int64, trainable=False))

    def _clip_gradients(self, grads):
        present = [tf.cast(g, tf.float32) for g in grads if g is not None]
        if self.global_clipnorm:
            clipped = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in present])) > self.global_clipnorm
        elif self.clipnorm:
            clipped = tf.reduce_any([tf.norm(g) > self.clipnorm for g in present])
        elif self.clipvalue:
            clipped = tf.reduce_any([tf.reduce_max(tf.abs(g)) > self.clipvalue for g in present])
        else:
            clipped = tf.constant(False)
        self._clip_record.assign_add(tf.stack([tf.cast(clipped, tf.int64), tf.constant(1, tf.int64)]))
        return super()._clip_gradients(grads)

    def clipped_updates(self):
        """[updates whose gradient clipping changed, updates]."""
        return [int(x) for x in self._clip_record.numpy()]


# ShardedAdam's own arguments, which keras.optimizers.Adam does not take
# (declared once, in distadam.arguments).
SHARDING_ARGUMENTS = tuple(sorted(set(distadam_arguments.OWN_ARGUMENTS)
                                  - set(inspect.signature(keras.optimizers.Adam.__init__).parameters)))

# The placement a case gets unless it names one: every variable's state
# sharded. ShardedAdam's default keeps Embedding tables replicated; the cases
# that test that placement say so (``"replicate": ["embed"]``), the others
# exercise the sharded path the tiny test models would otherwise leave out.
SHARD_EVERYTHING = {"replicate": []}


def build_kwargs(case, reference=False):
    """Optimizer arguments of a case; ``reference=True`` leaves out the
    sharding-only ones (for the keras.optimizers.Adam reference)."""
    kwargs = dict(case.get("kwargs", {}))
    if reference:
        kwargs = {k: v for k, v in kwargs.items() if k not in SHARDING_ARGUMENTS}
    else:
        kwargs = {**SHARD_EVERYTHING, **kwargs}
    schedule = case.get("schedule")
    if schedule:
        kwargs["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(**schedule)
    return kwargs


def configure(optimizer, case):
    if case.get("exclude_from_weight_decay"):
        optimizer.exclude_from_weight_decay(var_names=case["exclude_from_weight_decay"])
    return optimizer


def loss_fn(y, pred):
    return tf.reduce_mean(tf.square(y - pred), axis=-1)


def make_train_step(strategy, model, optimizer):
    """A tf.function running one strategy.run step on (inputs, targets), the
    loss averaged over the global batch."""

    @tf.function
    def train_step(inputs, y):
        def step_fn(inputs, y):
            with tf.GradientTape() as tape:
                pred = model(inputs, training=True)
                loss = tf.nn.compute_average_loss(loss_fn(y, pred), global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(step_fn, args=(inputs, y))

    return train_step


_LIVE_ITERATORS = []


def live_iterator(distributed_dataset):
    """An iterator over ``distributed_dataset`` kept for the process's
    lifetime: deleting a MultiWorkerMirroredStrategy iterator blocks its
    worker for up to a minute (TensorFlow 2.21, 12 processes; the other
    workers then wait for it in the next collective). Take exactly the
    batches a run needs: asking for one past the end costs as much."""
    iterator = iter(distributed_dataset)
    _LIVE_ITERATORS.append(iterator)
    return iterator


def train_custom_loop(strategy, model, optimizer, data, steps, finalize=True):
    """strategy.run + apply_gradients, the loss averaged over the global batch."""
    (tokens, features), targets = data
    dataset = tf.data.Dataset.from_tensor_slices(((tokens, features), targets)).batch(
        GLOBAL_BATCH, drop_remainder=True
    )
    dist = strategy.experimental_distribute_dataset(dataset)
    train_step = make_train_step(strategy, model, optimizer)

    batches = live_iterator(dist)
    for _ in range(steps):
        train_step(*next(batches))
    if finalize:
        optimizer.finalize_variable_values(model.trainable_variables)


def max_relative_difference(weights, reference):
    """max over tensors of ||a - b||_inf / ||b||_inf."""
    worst = 0.0
    for a, b in zip(weights, reference, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)))
    return worst


def step_launches(optimizer) -> dict:
    """Collective launches counted while tracing, over the backend and, under
    hybrid sharding, the shard-group view (which counts its across-group
    all-reduce itself)."""
    topology = optimizer.topology
    launches = dict(topology.everyone.launches)
    if topology.shard_group is not topology.everyone:
        for kind, count in topology.shard_group.launches.items():
            launches[kind] += count
    return launches


def group_ops(optimizer):
    """None without hybrid sharding, else how the group collectives run:
    "direct" (subgroup collectives), "emulated" (over all workers) or "none"
    (groups of one)."""
    view = optimizer.topology.shard_group
    if not optimizer.topology.grid.hybrid:
        return None
    if view.num_workers == 1:
        return "none"
    return "emulated" if view.emulated else "direct"


def exit_now(strategy=None, before=None):
    """End a test worker whose results are written: flush and exit at once.
    TensorFlow's interpreter teardown with a distribution strategy can take
    minutes on a loaded machine (measured: a 45 s MirroredStrategy run took
    up to 5 min when another ran beside it, idle in teardown), and a
    MultiWorkerMirroredStrategy's waits for its peers' heartbeats to stop.
    With a multi-worker ``strategy``, one collective first, as a barrier, so
    no worker leaves while another still needs it. ``before``: called last
    (e.g. ``hvd.shutdown`` or ``MPI.Finalize``: mpirun fails a rank that left
    without finalizing)."""
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    if before is not None:
        before()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
