"""tf.distribute jobs of several worker processes (MultiWorkerMirroredStrategy
under `distadam launch`) and of many logical devices: the same weights as
single-device Keras Adam, bit-identical on every worker.

One job per worker count, training its cases one after another on one strategy
(tests/workers/train_cases.py); the references train beside the job
(tests/workers/reference.py) so no worker waits for one between collectives.

* 2 and 4 processes: the global norm with a staircase schedule; hybrid groups
  of 2 (subgroup collectives across processes, norms counted once, EMA) and 4;
  the portable collectives (groups of 2 emulated over all workers).
* 12 processes: TensorFlow ranks the members of a group by the lexicographic
  order of their task names (0, 1, 10, 11, 2, ...), which every gather and
  all-to-all must map back to worker order (distadam.collectives.member_order):
  before that fix 12 workers ended ~1.0 away from Keras Adam, silently. A
  row-sparse Embedding with EMA (probed order), a dense model in groups of 4
  (predicted order; groups 8-11 rank 10, 11, 8, 9), and the portable path.
* 13 logical devices in one process: one replica gets no rows of the global
  batch, and TensorFlow's all-to-all would mix up the buffers of 13 local
  members (see distadam._tf_internals.UNAMBIGUOUS_ALL_TO_ALL_GROUP).
"""

import json
import sys

import numpy as np
import pytest

import reference
from common import max_relative_difference
from conftest import ROOT, WORKERS, kill_group, run_process, start_process, wait_for, worker_env
from distadam.collectives.member_order import MemberOrder
from distadam.collectives.tf_distribute import direct_collectives_requested

pytestmark = pytest.mark.slow  # every test here starts a multi-process job (./dev test --fast skips)

TOLERANCE = 1e-5
SCHEDULE = {"initial_learning_rate": 0.01, "decay_steps": 5, "decay_rate": 0.5, "staircase": True}

# Clipping thresholds clip some updates and not others (a mix, so a
# gradient-scale bug shows). "lazy": the optimizer is first built inside the
# traced step (the member order is predicted and the first step's gathers
# check it; the layout check rides on them too); "eager": built before (probed).
# Beyond two processes the update runs op by op (fused_update=False): XLA
# compiling each bucket in every process is most of a job's time on 2 cores,
# and what these jobs test is the exchange (test_equivalence covers XLA).
JOBS = {
    "two_processes": (2, 30, [
        {"name": "global_clipnorm_schedule", "build": "lazy", "kwargs": {"global_clipnorm": 0.6},
         "schedule": SCHEDULE},
    ]),
    "four_processes_in_groups": (4, 30, [
        {"name": "groups_of_2_clipnorm_ema", "build": "lazy",
         "kwargs": {"shard_group_size": 2, "clipnorm": 0.5, "use_ema": True, "fused_update": False}},
        {"name": "groups_of_4_global_clipnorm_schedule", "build": "lazy",
         "kwargs": {"shard_group_size": 4, "global_clipnorm": 0.6, "fused_update": False}, "schedule": SCHEDULE},
        {"name": "portable_groups_of_2_global_clipnorm", "build": "eager", "portable": True,
         "kwargs": {"shard_group_size": 2, "global_clipnorm": 0.6, "fused_update": False}},
    ]),
    "twelve_processes": (12, 15, [
        {"name": "embedding_row_sparse_eager_global_clipnorm_schedule_ema", "build": "eager",
         "kwargs": {"global_clipnorm": 0.8, "use_ema": True, "fused_update": False}, "schedule": SCHEDULE},
        {"name": "dense_groups_of_4_lazy_clipnorm_amsgrad", "model": "dense", "build": "lazy",
         "kwargs": {"shard_group_size": 4, "clipnorm": 0.5, "amsgrad": True, "fused_update": False}},
        {"name": "portable_embedding_groups_of_4_eager", "build": "eager", "portable": True,
         "kwargs": {"shard_group_size": 4, "fused_update": False}},
    ]),
}
LOGICAL_DEVICES = 13
LOGICAL_DEVICE_CASES = [
    {"name": "embedding_row_sparse_lazy_global_clipnorm", "build": "lazy",
     "kwargs": {"global_clipnorm": 0.8, "fused_update": False},
     "steps": 10},
]
for _workers, _steps, _cases in JOBS.values():
    for _case in _cases:
        _case["steps"] = _steps


def run_job(tmp_path, command, cases, env, timeout):
    """Run the job and, beside it, the references; return the references."""
    references = start_process([sys.executable, WORKERS / "reference.py", json.dumps(cases), tmp_path])
    try:
        finished = run_process([*command, json.dumps(cases), tmp_path], timeout, env=env)
        assert finished.code == 0, finished.out[-6000:]
        out, _ = wait_for(references, timeout)
        assert references.returncode == 0, out[-3000:]
    finally:
        kill_group(references)
    return [reference.load(tmp_path / f"ref-{index}.npz") for index in range(len(cases))]


def launch(workers, timeout):
    return [sys.executable, "-m", "distadam.launch", "--nproc", workers, "--timeout", timeout,
            WORKERS / "train_cases.py"]


def check_case(case, results, expected, workers):
    first = results[0]
    weights = [f"w{i}" for i in range(len(expected.weights))]
    for rank, result in enumerate(results[1:], start=1):
        for key in weights:
            np.testing.assert_array_equal(result[key], first[key], err_msg=f"rank {rank} differs from rank 0")
    # The run must have trained, or equality would prove nothing.
    assert expected.initial_moved > 1e-2
    worst = max_relative_difference([first[k] for k in weights], expected.weights)
    assert worst <= TOLERANCE, f"{case['name']}: {worst:.3g} from single-device Adam"
    kwargs = case.get("kwargs", {})
    if "clipnorm" in kwargs or "global_clipnorm" in kwargs:
        clipped, updates = expected.clipped_updates
        assert 0 < clipped < updates, f"{case['name']}: clipping must mix clipped and unclipped updates"
    assert int(first["iterations"]) == expected.iterations == case["steps"]
    assert int(first["replicas"]) == workers
    assert str(first["member_order_source"]) == ("probed" if case["build"] == "eager" else "predicted")
    direct = direct_collectives_requested() and not case.get("portable")
    assert bool(first["direct"]) == direct
    shards = kwargs.get("shard_group_size", workers)
    if shards == "auto":  # resolved from the workers per node the launcher announced
        shards = case["expected_group_size"]
    if shards < workers:
        assert str(first["group_ops"]) == ("direct" if direct else "emulated")
    # Adam's m, v (and EMA) divided over the shards, plus padding.
    kinds = 2 + bool(kwargs.get("amsgrad")) + bool(kwargs.get("use_ema"))
    for result in results:
        assert int(result["num_shards"]) == shards
        for nbytes in result["state_bytes"]:
            assert nbytes <= expected.state_bytes / shards + kinds * 4 * shards * 4


@pytest.mark.timeout(700)
@pytest.mark.parametrize("job", sorted(JOBS))
def test_worker_processes_match_single_device_adam(tmp_path, job):
    workers, _, cases = JOBS[job]
    references = run_job(tmp_path, launch(workers, 600), cases, worker_env(PYTHONPATH=f"{WORKERS}:{ROOT}"), 650)
    for index, case in enumerate(cases):
        results = [np.load(tmp_path / f"rank{r}-{index}.npz") for r in range(workers)]
        if workers == 12:  # the ranking this job is about: TensorFlow's, not worker order
            assert tuple(results[0]["member_order"]) == (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)
        check_case(case, results, references[index], workers)


@pytest.mark.timeout(400)
def test_thirteen_logical_devices_match_single_device_adam(tmp_path):
    """13 replicas in one process. The global batch of 24 leaves the last one
    without rows (TensorFlow gives 12 replicas 2 each), whose sparse-gradient
    exchange once packed a wrong width and failed every worker's gather (as at
    11 and 16 worker processes). And TensorFlow's all-to-all would mix up the
    buffers of 13 local members: the reduce-scatter must all-reduce instead."""
    references = run_job(tmp_path, [sys.executable, WORKERS / "train_cases.py"], LOGICAL_DEVICE_CASES,
                         worker_env(DISTADAM_LOGICAL_DEVICES=LOGICAL_DEVICES), 380)
    for index, case in enumerate(LOGICAL_DEVICE_CASES):
        result = np.load(tmp_path / f"rank0-{index}.npz")
        assert MemberOrder(tuple(result["member_order"])).is_identity  # one task: devices by number
        check_case(case, [result], references[index], LOGICAL_DEVICES)


@pytest.mark.timeout(300)
def test_workers_with_different_trainable_sets_fail_clearly(tmp_path):
    """One worker froze a layer: every worker refuses to train, naming the cause."""
    case = {"name": "mismatch", "mismatch": True, "build": "eager", "steps": 3}
    finished = run_process([*launch(2, 200), json.dumps([case]), tmp_path], 240,
                           env=worker_env(PYTHONPATH=f"{WORKERS}:{ROOT}"))
    assert finished.code != 0
    for rank in range(2):
        assert f"[rank {rank}]" in finished.out
    assert "workers disagree on the trainable variables" in finished.out, finished.out[-3000:]
