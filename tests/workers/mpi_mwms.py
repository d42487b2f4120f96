"""Run under plain ``mpirun -np N`` (no Horovod): mpi4py rendezvous builds
TF_CONFIG, MultiWorkerMirroredStrategy trains ShardedAdam with a custom loop,
and rank 0 compares with Keras Adam on one process over the global batch.

usage: mpirun -np N python mpi_mwms.py CASES_JSON
"""

import json
import os
import sys

import common  # noqa: F401  (sets TF logging before TF loads)
from mpi_results import emit  # noqa: E402
import reference  # noqa: E402

from distadam.mpi_rendezvous import rendezvous_tf_config  # noqa: E402

tf_config = rendezvous_tf_config()
os.environ["TF_CONFIG"] = json.dumps(tf_config)
rank = tf_config["task"]["index"]

import tensorflow as tf  # noqa: E402

import distadam  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
strategy = tf.distribute.MultiWorkerMirroredStrategy()
size = strategy.num_replicas_in_sync
local_batch = common.GLOBAL_BATCH // size


def local_rows(array, steps, worker):
    shaped = array[: steps * common.GLOBAL_BATCH].reshape(
        (steps, size, local_batch) + array.shape[1:]
    )
    return shaped[:, worker].reshape((steps * local_batch,) + array.shape[1:])


def train_sharded(case, data, steps):
    (tokens, features), targets = data

    def dataset_fn(context):
        # Each worker reads exactly its slice of every global batch (no
        # auto-sharding guesswork), so the union per step is the global batch.
        worker = context.input_pipeline_id
        rows = [local_rows(a, steps, worker) for a in (tokens, features, targets)]
        return tf.data.Dataset.from_tensor_slices(((rows[0], rows[1]), rows[2])).batch(local_batch)

    with strategy.scope():
        model = common.make_model()
        optimizer = common.configure(distadam.ShardedAdam(**common.build_kwargs(case)), case)
    dataset = strategy.distribute_datasets_from_function(dataset_fn)

    step = common.make_train_step(strategy, model, optimizer)
    batches = common.live_iterator(dataset)
    for _ in range(steps):
        step(*next(batches))
    return model, optimizer


for case in json.loads(sys.argv[1]):
    steps = case.get("steps", 30)
    data = common.make_data(steps, scale=case.get("target_scale", 1.0))
    model, optimizer = train_sharded(case, data, steps)
    if rank != 0:
        continue
    expected = reference.get(case, steps)
    emit({
        "case": case["name"],
        "workers": size,
        "tf_config": tf_config,
        "strategy": type(strategy).__name__,
        "backend": type(optimizer.collectives).__name__,
        "max_rel_diff": common.max_relative_difference(model.get_weights(), expected.weights),
        "iterations": int(optimizer.iterations.numpy()),
        "state_bytes": int(sum(optimizer.state_bytes_per_device().values())),
        "reference_state_bytes": expected.state_bytes,
        "clipped_updates": expected.clipped_updates,
        "buckets": len(optimizer.layout.buckets),
        "placements": ["replicated" if b.replicated else "sharded" for b in optimizer.layout.buckets],
        "launches": dict(optimizer.collectives.launches),
    }, rank)
common.exit_now(strategy)
