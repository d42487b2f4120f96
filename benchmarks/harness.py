"""Shared pieces of the benchmark workers: models, state accounting, the
collective cost model and interleaved timing.

Workers run one distribution set-up per process (TensorFlow allows one
MirroredStrategy per process), so this module is imported by each worker after
it has configured its logical devices.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# --------------------------------------------------------------------- models
# The benchmark models are deliberately plain MLPs: their parameter count is
# easy to state and to reproduce in the planner, and by choosing widths and
# batch size one model is dominated by the optimizer update (many parameters,
# tiny batch) and the other by the forward/backward matmuls (few parameters,
# large batch).

MODELS = {
    # ~3.2M float32 parameters, 2 examples per replica: the per-step cost is the
    # Adam math and the gradient/parameter traffic, not the matmuls.
    "update_bound": {"input_dim": 256, "widths": [1024, 1024, 1024, 256], "batch_per_replica": 2},
    # ~0.2M parameters, 1024 examples per replica: the matmuls dominate.
    "compute_bound": {"input_dim": 256, "widths": [256, 256, 256, 64], "batch_per_replica": 1024},
    # Uneven sizes (not divisible by 3 or 8) so padding shows up in the
    # memory measurement; small so eight replicas build in seconds.
    "memory": {"input_dim": 37, "widths": [129, 61, 10], "batch_per_replica": 4},
}


def _embedding_model(vocab=200_000, dim=32, ids=16):
    def make():
        import keras

        keras.utils.set_random_seed(0)
        tokens = keras.Input((ids,), dtype="int32")
        x = keras.layers.Embedding(vocab, dim, name="table")(tokens)
        x = keras.layers.GlobalAveragePooling1D()(x)
        x = keras.layers.Dense(64, activation="relu")(x)
        return keras.Model(tokens, keras.layers.Dense(8)(x))
    return make


def _transformer_model(length=64, d=128, heads=4, hidden=512):
    def make():
        import keras

        keras.utils.set_random_seed(0)
        inputs = keras.Input((length, d))
        x = keras.layers.LayerNormalization()(inputs)
        x = keras.layers.MultiHeadAttention(heads, d // heads)(x, x)
        x = keras.layers.Add()([inputs, x])
        y = keras.layers.LayerNormalization()(x)
        y = keras.layers.Dense(hidden, activation="gelu")(y)
        y = keras.layers.Dense(d)(y)
        return keras.Model(inputs, keras.layers.Add()([x, y]))
    return make


# The multi-process benchmark's models (per-worker batch): what decides speed
# when every worker has its own device.
MULTIPROCESS_MODELS = {
    # MLP 64-1024-1024-1024-256, 2.4M params, 2 examples: the update and the
    # gradient/parameter traffic dominate.
    "dense_update_bound": {"make": lambda: mlp(64, [1024, 1024, 1024, 256]), "batch": 2,
                           "x": ("float", (64,)), "y": (256,)},
    # MLP 64-512-256-256-16, 0.23M params, 256 examples: the matmuls dominate.
    "dense_compute_bound": {"make": lambda: mlp(64, [512, 256, 256, 16]), "batch": 256,
                            "x": ("float", (64,)), "y": (16,)},
    # Embedding(200k, 32) -> mean of 16 ids -> Dense 64 -> 8: a table whose
    # gradient is a few rows (tf.IndexedSlices).
    "embedding": {"make": _embedding_model(), "batch": 32, "x": ("ids", (16,), 200_000), "y": (8,)},
    # One pre-norm Transformer block (4-head attention + MLP, LayerNorms),
    # d=128, length 64.
    "transformer": {"make": _transformer_model(), "batch": 8, "x": ("float", (64, 128)), "y": (64, 128)},
}


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

    everyone, group = optimizer.collectives, optimizer.shard_collectives

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


def mlp(input_dim, widths, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((input_dim,))]
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        layers.append(keras.layers.Dense(width, activation=None if last else "relu", name=f"dense{i}"))
    return keras.Sequential(layers)


def many_variables_model(num_variables, seed=0):
    """A model with exactly ``num_variables`` small trainable variables (pairs
    of kernel+bias in parallel Dense heads, plus one bias-free head when odd),
    for counting collectives as the variable count grows."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    heads = [keras.layers.Dense(2, name=f"head{i}")(inputs) for i in range(num_variables // 2)]
    if num_variables % 2:
        heads.append(keras.layers.Dense(2, use_bias=False, name="odd_head")(inputs))
    out = heads[0] if len(heads) == 1 else keras.layers.Add()(heads)
    model = keras.Model(inputs, out)
    assert len(model.trainable_variables) == num_variables, len(model.trainable_variables)
    return model


def model_summary(model) -> dict:
    by_dtype = {}
    for v in model.trainable_variables:
        dtype = str(v.dtype)
        by_dtype[dtype] = by_dtype.get(dtype, 0) + int(np.prod(v.shape))
    return {
        "num_variables": len(model.trainable_variables),
        "params": sum(by_dtype.values()),
        "params_by_dtype": by_dtype,
        "param_bytes": sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.trainable_variables),
        "variable_shapes": [list(map(int, v.shape)) for v in model.trainable_variables],
    }


# ------------------------------------------------------------ state accounting
def _components(variable):
    """(device, tensor) for each local copy of a Keras/TF variable: one per
    replica for mirrored and per-replica variables, one otherwise."""
    value = getattr(variable, "value", variable)
    copies = getattr(value, "values", None)
    if copies is None:
        return [(value.device, value)]
    return [(c.device, c) for c in copies]


def optimizer_state_bytes(optimizer, model_variables=()) -> dict:
    """Bytes of optimizer state held on each local device, read from the real
    variable copies. Left out: the iteration counter and a learning-rate
    variable (scalars every optimizer keeps replicated) and any model variable
    that ``optimizer.variables`` lists (a tracking slip must not be mistaken
    for optimizer state; :func:`tracked_model_variables` reports it)."""
    # ``_iterations`` is the variable; with gradient accumulation the public
    # ``iterations`` is a derived tensor.
    counter = getattr(optimizer, "_iterations", optimizer.iterations)
    skip = {id(counter)} | {id(v) for v in model_variables}
    learning_rate = getattr(optimizer, "_learning_rate", None)
    if learning_rate is not None and hasattr(learning_rate, "assign"):
        skip.add(id(learning_rate))
    totals = {}
    for variable in optimizer.variables:
        if id(variable) in skip:
            continue
        for device, copy in _components(variable):
            nbytes = int(np.prod(copy.shape)) * copy.dtype.size
            totals[device] = totals.get(device, 0) + nbytes
    return totals


def tracked_model_variables(optimizer, model_variables) -> list:
    """Paths of model variables that appear in ``optimizer.variables``."""
    ids = {id(v) for v in model_variables}
    return [v.path for v in optimizer.variables if id(v) in ids]


def _short_device(device: str) -> str:
    # "/job:localhost/replica:0/task:0/device:CPU:3" -> "CPU:3"
    return device.rsplit("device:", 1)[-1] if "device:" in device else device


def by_short_device(totals: dict) -> dict:
    return {_short_device(k): v for k, v in sorted(totals.items())}


# ------------------------------------------------------ collectives and bytes
# Graph op types that launch a collective, and what they do.
COLLECTIVE_KINDS = {
    "CollectiveReduceV2": "all_reduce",
    "CollectiveReduce": "all_reduce",
    "CollectiveGatherV2": "all_gather",
    "CollectiveGather": "all_gather",
    "CollectiveReduceScatterV2": "reduce_scatter",
    "CollectiveAllToAllV2": "all_to_all",
    "CollectiveAllToAllV3": "all_to_all",
    "NcclAllReduce": "all_reduce",
    "HorovodAllreduce": "all_reduce",
    "HorovodGroupedAllreduce": "all_reduce",
    "HorovodAllgather": "all_gather",
    "HorovodGroupedAllgather": "all_gather",
    "HorovodAlltoall": "all_to_all",
    "HorovodReducescatter": "reduce_scatter",
    "HorovodGroupedReducescatter": "reduce_scatter",
    "HorovodBroadcast": "broadcast",
}


def traced_collectives(graph):
    """Every collective op in a traced step graph, with the bytes of its
    (per-worker) input, or ``None`` where the graph leaves the size dynamic
    (TensorFlow's all-gather pads its input to a size it learns at run time;
    :func:`fill_dynamic_sizes` supplies those). Raises if a collective hides
    inside a nested function body (cond/while), where it would be missed."""
    ops = []
    for op in graph.get_operations():
        kind = COLLECTIVE_KINDS.get(op.type)
        if kind is None:
            continue
        nbytes = 0
        for tensor in op.inputs[: _num_data_inputs(op)]:
            if not tensor.shape.is_fully_defined():
                nbytes = None
                break
            nbytes += int(np.prod(tensor.shape.as_list())) * tensor.dtype.size
        ops.append({"op": op.type, "kind": kind, "bytes": nbytes, "device": op.device})

    library = graph.as_graph_def().library
    nested = sum(
        1 for fn in library.function for node in fn.node_def if node.op in COLLECTIVE_KINDS
    )
    if nested:
        raise ValueError(
            f"{nested} collective op(s) inside nested function bodies: the byte accounting "
            "only sees the top-level step graph"
        )
    return ops


class CallRecorder:
    """Records the per-worker input size of every collective a distadam
    backend issues while a step is traced, by wrapping its private
    implementation methods on the instance (the public methods keep counting
    ``launches``)."""

    METHODS = {"_reduce_scatter_sum": "reduce_scatter", "_all_reduce_sum": "all_reduce", "_all_gather": "all_gather",
               "_all_gather_rows": "all_gather"}

    def __init__(self, collectives):
        self.calls = []
        for method, kind in self.METHODS.items():
            original = getattr(collectives, method)

            def wrapped(tensor, name, _original=original, _kind=kind):
                shape = tensor.shape
                if not shape.is_fully_defined():
                    raise ValueError(f"{_kind} input has a dynamic shape {shape}")
                self.calls.append((_kind, int(np.prod(shape.as_list())) * tensor.dtype.size))
                return _original(tensor, name)

            setattr(collectives, method, wrapped)

    def bytes_of(self, kind):
        return [nbytes for k, nbytes in self.calls if k == kind]


def fill_dynamic_sizes(ops, recorder):
    """Give dynamically shaped graph collectives the sizes the backend saw.
    Only TensorFlow's all-gather of equal shards produces them (one data
    gather per ``all_gather`` call, padded to the largest shard = the shard),
    so the counts must agree exactly; the byte total per kind is then exact
    whatever the pairing."""
    dynamic = [op for op in ops if op["bytes"] is None]
    if not dynamic:
        return ops
    kinds = {op["kind"] for op in dynamic}
    if kinds != {"all_gather"}:
        raise ValueError(f"dynamic-shaped collectives of kinds {sorted(kinds)}: no size source")
    sizes = recorder.bytes_of("all_gather") if recorder else []
    if len(sizes) != len(dynamic):
        raise ValueError(
            f"{len(dynamic)} dynamic-shaped all-gathers in the graph but the backend issued "
            f"{len(sizes)} all_gather calls: cannot attribute sizes"
        )
    for op, nbytes in zip(dynamic, sorted(sizes)):
        op["bytes"] = nbytes
    return ops


def _num_data_inputs(op):
    # Grouped Horovod ops take several tensors; every other collective has the
    # data first, then group size/keys/ordering tokens.
    if op.type.startswith("HorovodGrouped"):
        return int(op.get_attr("num_tensors"))
    return 1


# Bytes each worker *sends* for one collective over ``n`` workers, for the
# bandwidth-optimal ring algorithms TensorFlow's CPU collectives (RingReducer,
# RingGatherer) and Horovod's Gloo/MPI ring all-reduce implement. ``nbytes`` is
# the per-worker input: the full buffer for an all-reduce, the local shard for
# an all-gather, the full (padded) buffer for a reduce-scatter.
def ring_bytes_sent(kind: str, nbytes: int, n: int) -> float:
    if n == 1:
        return 0.0
    if kind == "all_reduce":  # reduce-scatter phase + all-gather phase
        return 2.0 * nbytes * (n - 1) / n
    if kind == "reduce_scatter":
        return nbytes * (n - 1) / n
    if kind == "all_gather":  # forwards the n-1 shards it does not own
        return float(nbytes * (n - 1))
    if kind == "all_to_all":
        return nbytes * (n - 1) / n
    if kind == "broadcast":
        return float(nbytes)
    raise ValueError(f"no cost model for collective kind {kind!r}")


def allreduce_bound(param_bytes: int, n: int) -> float:
    """Bytes sent per worker by a ring all-reduce of the gradients, 2Ψ(N−1)/N:
    the lower bound for exchanging a full gradient among N workers."""
    return 2.0 * param_bytes * (n - 1) / n


def collective_summary(ops, workers_in_graph: int, n: int) -> dict:
    """Per-worker launches and bytes for one step. Under MirroredStrategy one
    graph holds every replica's ops, so counts are divided by the replicas in
    the graph (each replica launches the same collectives)."""
    launches, sizes = {}, {}
    sent = 0.0
    for op in ops:
        launches[op["kind"]] = launches.get(op["kind"], 0) + 1
        sizes.setdefault(op["kind"], []).append(op["bytes"])
        sent += ring_bytes_sent(op["kind"], op["bytes"], n)
    per_worker = {k: v / workers_in_graph for k, v in launches.items()}
    for kind, value in per_worker.items():
        if value != int(value):
            raise ValueError(f"{kind} launches {launches[kind]} not divisible by {workers_in_graph} replicas")
    return {
        "launches_per_step": {k: int(v) for k, v in sorted(per_worker.items())},
        "total_launches_per_step": int(sum(per_worker.values())),
        "bytes_sent_per_worker": sent / workers_in_graph,
        "collective_input_bytes": {k: sorted(set(v)) for k, v in sorted(sizes.items())},
    }


# --------------------------------------------------------------------- timing
def interleaved_timing(runners: dict, repetitions: int, steps: int, warmup: int) -> dict:
    """Time each runner (name -> callable running one synchronous step) in
    interleaved blocks. Block order alternates A,B / B,A so slow drift of the
    machine (other jobs on a shared box) hits both alike; the ratio is taken
    per repetition, between adjacent blocks, and summarised by its median and
    inter-quartile range."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples = {name: [] for name in names}
    for rep in range(repetitions):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                runners[name]()
                times.append(time.perf_counter() - start)
            samples[name].append(statistics.median(times))
    return samples


def ratio_stats(numerator, denominator) -> dict:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    q = np.percentile(ratios, [25, 50, 75])
    return {
        "median": float(q[1]),
        "q25": float(q[0]),
        "q75": float(q[2]),
        "iqr": float(q[2] - q[0]),
        "repetitions": len(ratios),
    }


def time_stats(samples) -> dict:
    q = np.percentile(samples, [25, 50, 75])
    return {"median_s": float(q[1]), "q25_s": float(q[0]), "q75_s": float(q[2])}
