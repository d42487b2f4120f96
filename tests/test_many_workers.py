"""Beyond 10 workers: ShardedAdam == single-device Keras Adam.

From 11 workers on TensorFlow ranks the members of a collective group by the
lexicographic order of their task names ("task:10" < "task:2"), so a gather
returns workers 0, 1, 10, 11, 2, ... and an all-to-all delivers row r to that
ranking's r-th worker (distadam.collectives.member_order). Before the fix,
12 worker processes ended ~1.0 (relative) away from Keras Adam, silently.

Each run trains several cases on one strategy: 12 processes under `distadam
launch` (MultiWorkerMirroredStrategy: the ranking differs from worker order),
and 13 logical CPUs in one process (MirroredStrategy: devices of one task rank
by number; one replica gets no rows of the global batch; and a process
holding 13 members of a group reduce-scatters by all-reduce, TensorFlow's
all-to-all buffer names being ambiguous from 11 ranks on). The member-order logic itself is checked without
TensorFlow's runtime below, at 11, 12 and 16 workers.
"""

import json
import sys

import numpy as np
import pytest

import reference
from common import max_relative_difference
from conftest import ROOT, WORKERS, kill_group, run_process, start_process, wait_for, worker_env
from distadam.collectives import member_order
from distadam.collectives.member_order import MemberOrder, MemberOrderUnknown
from distadam.collectives.tf_distribute import direct_collectives_requested

TOLERANCE = 1e-5
STEPS = 15
SCHEDULE = {"initial_learning_rate": 0.01, "decay_steps": 5, "decay_rate": 0.5, "staircase": True}


def task_devices(tasks, job="worker", devices=1):
    return [f"/job:{job}/replica:0/task:{t}/device:CPU:{d}" for t in range(tasks) for d in range(devices)]


# ----------------------------------------------------------- the ranking rule
@pytest.mark.parametrize("tasks, expected", [
    (10, list(range(10))),
    (11, [0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9]),
    (12, [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]),
    (16, [0, 1, 10, 11, 12, 13, 14, 15, 2, 3, 4, 5, 6, 7, 8, 9]),
])
def test_tensorflow_ranks_tasks_by_name(tasks, expected):
    assert member_order.tensorflow_rank_order(task_devices(tasks)).ranked == tuple(expected)


def test_tensorflow_ranks_devices_of_one_task_by_number():
    # One process, 12 logical CPUs: "CPU:10" ranks after "CPU:9".
    names = [f"/job:localhost/replica:0/task:0/device:CPU:{d}" for d in range(12)]
    assert member_order.tensorflow_rank_order(names).is_identity


def test_tensorflow_ranking_with_a_chief_and_several_devices_per_task():
    # Replica ids: the chief's devices, then worker 0's, ... (MultiWorkerMirroredStrategy).
    names = task_devices(1, job="chief", devices=2) + task_devices(11, devices=2)
    ranked = member_order.tensorflow_rank_order(names).ranked
    # chief (replicas 0, 1), then worker tasks 0, 1, 10, 2, ... by name.
    assert ranked[:6] == (0, 1, 2, 3, 4, 5)
    assert ranked[6:8] == (22, 23)  # worker task 10 = replicas 22, 23
    assert ranked[8:10] == (6, 7)   # worker task 2


def test_member_order_round_trips_rows():
    import tensorflow as tf

    order = member_order.tensorflow_rank_order(task_devices(12))
    by_worker = tf.reshape(tf.range(12 * 3), [12, 3])  # row w: worker w's shard
    # What a gather returns (rank order) comes back in worker order.
    gathered = tf.gather(by_worker, order.ranked)
    np.testing.assert_array_equal(order.rows_to_worker_order(gathered), by_worker)
    np.testing.assert_array_equal(order.flat_to_worker_order(tf.reshape(gathered, [-1])),
                                  tf.reshape(by_worker, [-1]))
    # Rows meant for worker w reach rank rank_of[w], i.e. worker w.
    sent = order.rows_to_rank_order(by_worker)
    for rank, worker in enumerate(order.ranked):
        np.testing.assert_array_equal(sent[rank], by_worker[worker])
    assert order.list_to_worker_order(list(order.ranked)) == list(range(12))


@pytest.mark.parametrize("observed", [[0, 1, 1], [0, 2], [0.5, 1.0]])
def test_a_probe_that_is_not_a_permutation_fails_loudly(observed):
    with pytest.raises(MemberOrderUnknown):
        member_order.from_probe(observed)


def test_devices_that_disagree_on_a_ranking_fail_loudly():
    with pytest.raises(MemberOrderUnknown, match="different member orders"):
        member_order.agreed([MemberOrder((0, 1, 2)), MemberOrder((0, 2, 1))])


@pytest.mark.parametrize("dtype, index_columns", [("float32", 1), ("float16", 2)])
def test_a_worker_without_sparse_rows_sends_rows_of_the_right_width(dtype, index_columns):
    """A worker without rows packs [0, width + index columns], the widths
    taken from the static shapes (see the 11-device test below for the
    failure an inferred width caused), and rows round-trip."""
    import tensorflow as tf

    from distadam import bucket_ops

    # Traced with the empty shape known statically, as a replica's step is.
    pack = tf.function(bucket_ops.pack_rows)
    assert pack(tf.zeros([0], tf.int32), tf.zeros([0, 6], dtype)).shape == (0, 6 + index_columns)
    packed = pack(tf.constant([4, 1]), tf.reshape(tf.range(12, dtype=dtype), [2, 6]))
    indices, values = bucket_ops.unpack_rows(packed, 6)
    assert indices.numpy().tolist() == [4, 1] and values.shape == (2, 6)


# ------------------------------------------------------------ real training
# Lazy cases build inside the traced step (the ranking is predicted and the
# first step's gathers check it); eager ones probe it at build.
PROCESS_CASES = [
    {"name": "embedding_row_sparse_eager_global_clipnorm_schedule_ema", "build": "eager",
     "kwargs": {"global_clipnorm": 0.8, "use_ema": True}, "schedule": SCHEDULE},
    {"name": "dense_groups_of_4_lazy_clipnorm_amsgrad", "model": "dense", "build": "lazy",
     "kwargs": {"shard_group_size": 4, "clipnorm": 0.5, "amsgrad": True, "fused_update": False}},
]
LOGICAL_DEVICE_CASES = [
    {"name": "embedding_row_sparse_lazy_global_clipnorm", "build": "lazy", "kwargs": {"global_clipnorm": 0.8}},
]
for case in PROCESS_CASES + LOGICAL_DEVICE_CASES:
    case["steps"] = STEPS


def check_case(case, results, reference, workers):
    first = results[0]
    weights = [f"w{i}" for i in range(len(reference.weights))]
    for rank, result in enumerate(results[1:], start=1):
        for key in weights:
            np.testing.assert_array_equal(result[key], first[key], err_msg=f"rank {rank} differs from rank 0")
    assert max_relative_difference([first[k] for k in weights], reference.weights) <= TOLERANCE, case["name"]
    assert reference.initial_moved > 100 * TOLERANCE
    kwargs = case.get("kwargs", {})
    if "clipnorm" in kwargs or "global_clipnorm" in kwargs:
        clipped, updates = reference.clipped_updates
        assert 0 < clipped < updates, f"{case['name']}: clipping must mix clipped and unclipped updates"
    assert int(first["iterations"]) == reference.iterations == STEPS and int(first["replicas"]) == workers
    source = str(first["member_order_source"])
    assert source == ("probed" if case["build"] == "eager" else "predicted"), source
    if kwargs.get("shard_group_size"):
        assert str(first["group_ops"]) == ("direct" if direct_collectives_requested() else "emulated")
    assert bool(first["direct"]) == direct_collectives_requested()


def run_cases(tmp_path, command, cases, env, timeout):
    """Run the job and, beside it, the references; return them."""
    references = start_process([sys.executable, WORKERS / "reference.py", json.dumps(cases), tmp_path])
    try:
        finished = run_process([*command, json.dumps(cases), tmp_path], timeout, env=env)
        assert finished.code == 0, finished.out[-6000:]
        out, _ = wait_for(references, timeout)
        assert references.returncode == 0, out[-3000:]
    finally:
        kill_group(references)
    return [reference.load(tmp_path / f"ref-{index}.npz") for index in range(len(cases))]


@pytest.mark.collectives
@pytest.mark.timeout(600)
def test_twelve_worker_processes_match_single_device_adam(tmp_path):
    workers = 12
    references = run_cases(
        tmp_path, [sys.executable, "-m", "distadam.launch", "--nproc", workers, "--timeout", 540,
                   WORKERS / "many_workers.py"], PROCESS_CASES, worker_env(PYTHONPATH=f"{WORKERS}:{ROOT}"), 580)
    for index, case in enumerate(PROCESS_CASES):
        results = [np.load(tmp_path / f"rank{r}-{index}.npz") for r in range(workers)]
        # The ranking this test is about: TensorFlow's, not worker order.
        assert tuple(results[0]["member_order"]) == (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)
        check_case(case, results, references[index], workers)


@pytest.mark.collectives
@pytest.mark.timeout(400)
def test_thirteen_logical_devices_match_single_device_adam(tmp_path):
    """13 replicas in one process. The global batch of 24 leaves the last one
    without rows (TensorFlow gives 12 replicas 2 each), whose sparse-gradient
    exchange once packed a wrong width and failed every worker's gather (as at
    11 and 16 worker processes). And TensorFlow's all-to-all would mix up the
    buffers of 13 local members: the reduce-scatter must all-reduce instead."""
    workers = 13
    references = run_cases(tmp_path, [sys.executable, WORKERS / "many_workers.py"], LOGICAL_DEVICE_CASES,
                           worker_env(DISTADAM_LOGICAL_DEVICES=workers), timeout=380)
    for index, case in enumerate(LOGICAL_DEVICE_CASES):
        result = np.load(tmp_path / f"rank0-{index}.npz")
        assert MemberOrder(tuple(result["member_order"])).is_identity
        check_case(case, [result], references[index], workers)


@pytest.mark.timeout(200)
def test_a_wrong_member_order_stops_the_first_step_loudly(tmp_path):
    """Built inside the traced step, the ranking is predicted; if the
    prediction is wrong the first step's gathers show it and the step fails
    before anything is written, naming the remedy."""
    case = {"name": "mispredicted", "build": "lazy", "mispredict": True, "steps": 2}
    finished = run_process([sys.executable, WORKERS / "many_workers.py", json.dumps([case]), tmp_path], 180,
                           env=worker_env(DISTADAM_LOGICAL_DEVICES=4))
    assert finished.code != 0
    assert "shards out of worker order" in finished.out, finished.out[-3000:]
    assert "optimizer.build(model.trainable_variables)" in finished.out
    assert not (tmp_path / "rank0-0.npz").exists()
