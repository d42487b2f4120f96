"""The member order of a collective group, and the failure of a wrong one.

From 11 workers on TensorFlow ranks the members of a collective group by the
lexicographic order of their task names ("task:10" < "task:2"), so a gather
returns workers 0, 1, 10, 11, 2, ... and an all-to-all delivers row r to that
ranking's r-th worker (distadam.collectives.member_order). Before the fix, 12
worker processes ended ~1.0 (relative) away from Keras Adam, silently. The
training runs at 11+ workers are in test_multiworker.py; here: the ranking
rule at 11, 12 and 16 workers, the conversions, the checks that make an
unknown order fail loudly, and the sparse rows of a worker without any.
"""

import json
import sys

import numpy as np
import pytest

from conftest import WORKERS, run_process, worker_env
from distadam.collectives import member_order
from distadam.collectives.member_order import MemberOrder, MemberOrderUnknown


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
    taken from the static shapes (test_multiworker's 13-device run shows the
    failure an inferred width caused), and rows round-trip."""
    import tensorflow as tf

    from distadam import bucket_ops

    # Traced with the empty shape known statically, as a replica's step is.
    pack = tf.function(bucket_ops.pack_rows)
    assert pack(tf.zeros([0], tf.int32), tf.zeros([0, 6], dtype)).shape == (0, 6 + index_columns)
    packed = pack(tf.constant([4, 1]), tf.reshape(tf.range(12, dtype=dtype), [2, 6]))
    indices, values = bucket_ops.unpack_rows(packed, 6)
    assert indices.numpy().tolist() == [4, 1] and values.shape == (2, 6)


@pytest.mark.timeout(200)
def test_a_wrong_member_order_stops_the_first_step_loudly(tmp_path):
    """Built inside the traced step, the ranking is predicted; if the
    prediction is wrong the first step's gathers show it and the step fails
    before anything is written, naming the remedy."""
    case = {"name": "mispredicted", "build": "lazy", "mispredict": True, "steps": 2}
    finished = run_process([sys.executable, WORKERS / "train_cases.py", json.dumps([case]), tmp_path], 180,
                           env=worker_env(DISTADAM_LOGICAL_DEVICES=4))
    assert finished.code != 0
    assert "shards out of worker order" in finished.out, finished.out[-3000:]
    assert "optimizer.build(model.trainable_variables)" in finished.out
    assert not (tmp_path / "rank0-0.npz").exists()
