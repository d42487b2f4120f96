"""One benchmark process's set-up and its steps: the worker's strategy and
threads, its batch, a training step, and a step that runs only an
optimizer's collectives. TensorFlow is imported inside the functions, after
the worker has configured what must precede it."""

from __future__ import annotations

import os

import numpy as np


def quiet_tensorflow() -> None:
    """TensorFlow's C++ INFO and WARNING lines drown the workers' output.
    The level is read once, when TensorFlow loads: call this before the first
    ``import tensorflow`` (or keras). run_all.py sets it in the children's
    environment as well; this covers a worker started by hand."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def multiprocess_worker(inter_op_threads: int):
    """Set up one worker process of the multi-process benchmarks; returns
    (strategy, workers, rank).

    One compute thread per worker process (intra-op, and inter-op unless
    ``inter_op_threads`` is 0: TensorFlow's default): ops run one at a time,
    as on a GPU's compute stream, while collectives progress on their own
    threads; and the shared cores are not oversubscribed."""
    import tensorflow as tf

    import distadam

    tf.config.threading.set_intra_op_parallelism_threads(1)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    strategy = distadam.strategy_from_env(communication_timeout=300)
    return strategy, strategy.num_replicas_in_sync, int(os.environ.get("DISTADAM_RANK", "0"))


def multiprocess_batch(strategy, spec, rank):
    """This worker's own (x, y) batch for ``spec``, on its device."""
    import tensorflow as tf

    rng = np.random.default_rng(rank)
    batch = spec["batch"]
    kind, shape = spec["x"][0], spec["x"][1]
    if kind == "ids":
        x = rng.integers(0, spec["x"][2], size=(batch,) + shape).astype("int32")
    else:
        x = rng.normal(size=(batch,) + shape).astype("float32")
    y = rng.normal(size=(batch,) + spec["y"]).astype("float32")
    return strategy.experimental_distribute_values_from_function(lambda ctx: (tf.constant(x), tf.constant(y)))


def _gradient_step(strategy, model, global_batch, finish):
    """A traced custom-loop step: the loss averaged over the global batch, its
    gradients, then ``finish(loss, grads)`` (the step's returned value)."""
    import tensorflow as tf

    @tf.function
    def step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                error = tf.reshape(model(x, training=True) - y, [tf.shape(y)[0], -1])
                loss = tf.nn.compute_average_loss(tf.reduce_mean(tf.square(error), axis=1),
                                                  global_batch_size=global_batch)
            return finish(loss, tape.gradient(loss, model.trainable_variables))

        return strategy.run(replica_fn, args=(x, y))

    return step


def multiprocess_step(strategy, model, optimizer, global_batch):
    """One training step (custom loop, loss averaged over the global batch);
    ``optimizer=None`` computes the gradients and consumes them, nothing else."""
    import tensorflow as tf

    def finish(loss, grads):
        if optimizer is None:
            # Consume every gradient so none of the backward pass is pruned.
            return loss + tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads]) * 0.0
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return _gradient_step(strategy, model, global_batch, finish)


def multiprocess_exchange_step(strategy, model, global_batch, exchange):
    """A step that computes the gradients and runs ``exchange(grads)`` (the
    collectives of one optimizer, without its math), consuming everything so
    nothing is pruned. Timed next to the full steps it tells how much of a
    step is forward/backward + communication alone: the least any optimizer
    using those collectives can take on this transport."""
    import tensorflow as tf

    def finish(loss, grads):
        received = exchange(grads)
        return loss + tf.add_n([tf.reduce_sum(tf.reshape(r, [-1])[:1]) for r in received]) * 0.0

    return _gradient_step(strategy, model, global_batch, finish)


def keras_exchange(grads):
    """What Keras Adam communicates under a strategy
    (``TFOptimizer._all_reduce_sum_gradients``): one replica-context
    all-reduce of the gradient list (packed; IndexedSlices are all-gathered)."""
    import tensorflow as tf

    reduced = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
    return [tf.convert_to_tensor(g.values if isinstance(g, tf.IndexedSlices) else g) for g in reduced]


def sharded_exchange(optimizer):
    """What a built ShardedAdam communicates in a step, read from its public
    layout and backends: per bucket the reduce-scatter (or, for a replicated
    bucket, the all-reduce; for a sparse gradient, the row all-gather) and the
    all-gather of the new shard, for which the gradient shard stands in. No
    Adam math, no finite check, no assignment."""
    import tensorflow as tf

    from distadam import bucket_ops

    everyone, group = optimizer.topology.everyone, optimizer.topology.shard_group

    def exchange(grads):
        received = []
        for bucket in optimizer.layout.buckets:
            segment = bucket.segments[0]
            sparse = grads[segment.variable_index] if len(bucket.segments) == 1 else None
            if isinstance(sparse, tf.IndexedSlices):
                rows = everyone.all_gather_rows(bucket_ops.pack_rows(sparse.indices, sparse.values))
                if not bucket.replicated:
                    indices, values = bucket_ops.unpack_rows(rows, bucket_ops.row_width(segment))
                    shard = bucket_ops.shard_from_rows(bucket, segment, indices, values, group.worker_index())
                    rows = group.all_gather(shard)
                received.append(rows)
                continue
            flat = bucket_ops.flatten(bucket, {seg.variable_index: tf.convert_to_tensor(grads[seg.variable_index])
                                               for seg in bucket.segments})
            if bucket.replicated:
                received.append(everyone.all_reduce_sum(flat))
            else:
                received.append(group.all_gather(group.reduce_scatter_sum(flat)))
        return received

    return exchange


def use_logical_cpus(count: int) -> None:
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )


def runner(strategy, step, x, y):
    """A runner for timing.interleaved_timing: one step, waited for by
    fetching this worker's loss (the step's collectives line every worker
    up, so the fetch returns when the whole step is done)."""
    return lambda: float(strategy.experimental_local_results(step(x, y))[0])
