"""MultiWorkerMirroredStrategy, 2 and 4 processes on 127.0.0.1: same weights as one process."""

import json

import numpy as np
import pytest

from conftest import finish, free_ports, kill_group, start_worker
from distadam.collectives.tf_distribute import direct_collectives_requested

# Every test here runs MultiWorkerMirroredStrategy's collectives, whose path
# DISTADAM_DIRECT_COLLECTIVES=0 switches: CI's second leg runs them again.
pytestmark = pytest.mark.collectives

TOLERANCE = 1e-5


# Clipping thresholds clip some updates and not others (a mix, so a
# gradient-scale bug shows). Each run's cases train one after another in the
# same worker processes.
RUNS = {
    "two_workers": (2, [
        {"name": "global_clipnorm_schedule", "kwargs": {"global_clipnorm": 0.6},
         "schedule": {"initial_learning_rate": 0.01, "decay_steps": 10, "decay_rate": 0.5, "staircase": True}},
    ]),
    # Hybrid sharding over 4 processes: groups of 2 (subgroup collectives
    # across processes; per-variable norms counted once; EMA) and of 4 (the
    # default: one group).
    "four_workers_groups_of_2_and_4": (4, [
        {"name": "groups_of_2_clipnorm_ema", "kwargs": {"shard_group_size": 2, "clipnorm": 0.5, "use_ema": True}},
        {"name": "groups_of_4_global_clipnorm_schedule", "kwargs": {"shard_group_size": 4, "global_clipnorm": 0.6},
         "schedule": {"initial_learning_rate": 0.01, "decay_steps": 10, "decay_rate": 0.5, "staircase": True}},
    ]),
}


@pytest.mark.timeout(500)
@pytest.mark.parametrize("run", sorted(RUNS))
def test_workers_match_single_process(tmp_path, run):
    workers, cases = RUNS[run]
    ports = ",".join(map(str, free_ports(workers)))
    procs = [start_worker(["mwms.py", r, ports, json.dumps(cases), tmp_path / f"rank{r}"]) for r in range(workers)]
    try:
        for r, proc in enumerate(procs):
            log = finish(proc, timeout=420)
            assert proc.returncode == 0, f"rank {r} failed:\n{log[-5000:]}"
    finally:
        for proc in procs:
            kill_group(proc)
    for index, case in enumerate(cases):
        results = [np.load(tmp_path / f"rank{r}-{index}.npz") for r in range(workers)]
        check_case(case, workers, results)


def check_case(case, workers, results):
    shards = case["kwargs"].get("shard_group_size", workers)
    n_weights = sum(1 for k in results[0].files if k.startswith("w"))
    for r in range(1, workers):
        for i in range(n_weights):
            np.testing.assert_array_equal(results[r][f"w{i}"], results[0][f"w{i}"])
    for i in range(n_weights):
        ours, ref = results[0][f"w{i}"], results[0][f"ref{i}"]
        assert np.max(np.abs(ours - ref)) <= TOLERANCE * max(np.max(np.abs(ref)), 1e-12), (case["name"], i)
    clipped, updates = results[0]["clipped_updates"]
    assert 0 < clipped < updates == 30, "clipping must mix clipped and unclipped updates"
    kinds = 3 if case["kwargs"].get("use_ema") else 2
    for result in results:
        assert int(result["iterations"]) == 30
        assert int(result["state_bytes"]) <= int(results[0]["reference_state_bytes"]) / shards + kinds * 4 * shards
        assert int(result["num_shards"]) == shards
        # Groups smaller than the world use subgroup collectives, unless the
        # portable path is forced (CI's second leg): then the emulation.
        expected = ("direct" if direct_collectives_requested() else "emulated") if shards < workers else ""
        assert str(result["group_ops"]) == expected


@pytest.mark.timeout(300)
def test_workers_with_different_trainable_sets_fail_clearly(tmp_path):
    """One worker froze a layer: every worker refuses to train, naming the cause."""
    workers = 2
    ports = ",".join(map(str, free_ports(workers)))
    case = {"mismatch": True, "build_eagerly": True, "steps": 3}
    procs = [start_worker(["mwms.py", r, ports, json.dumps(case), tmp_path / f"r{r}"])
             for r in range(workers)]
    try:
        logs = [finish(proc, timeout=180) for proc in procs]
    finally:
        for proc in procs:
            kill_group(proc)
    for proc, log in zip(procs, logs):
        assert proc.returncode != 0
        assert "workers disagree on the trainable variables" in log, log[-3000:]
