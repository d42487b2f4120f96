"""ShardedAdam under MirroredStrategy(N) == Keras Adam on one device, global batch.

Each N runs in its own process (one strategy per process); all cases of one N
share that process. The reference is ``keras.optimizers.Adam`` on the mean
gradient of the global batch (densified: see DenseGradientAdam)."""

import json

import pytest

from conftest import finish, kill_group, start_worker
from distadam.collectives.tf_distribute import direct_collectives_requested

REPLICAS = (1, 2, 3, 4)
TOLERANCE = 1e-5
STEPS = 60

CASES = [
    {"name": "defaults"},
    {"name": "defaults_model_fit", "mode": "fit"},
    {"name": "amsgrad", "kwargs": {"amsgrad": True}},
    {"name": "weight_decay_with_exclusion", "kwargs": {"weight_decay": 0.05},
     "exclude_from_weight_decay": ["bias"]},
    # Clipping thresholds are chosen so that some updates are clipped and some
    # are not: Adam ignores a constant gradient scale, so a case clipped on
    # every step could not see a gradient-scale bug (e.g. summing instead of
    # averaging over workers).
    {"name": "clipnorm", "kwargs": {"clipnorm": 0.5}},
    {"name": "clipvalue", "kwargs": {"clipvalue": 0.4}},
    {"name": "global_clipnorm", "kwargs": {"global_clipnorm": 0.8}},
    {"name": "exponential_decay_staircase",
     "schedule": {"initial_learning_rate": 0.01, "decay_steps": 10, "decay_rate": 0.5, "staircase": True}},
    {"name": "use_ema_overwrite", "kwargs": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 7}},
    {"name": "use_ema_finalize_model_fit", "mode": "fit", "kwargs": {"use_ema": True}},
    {"name": "gradient_accumulation", "kwargs": {"gradient_accumulation_steps": 3}},
    # Keras clips the accumulated mean, not each micro-batch's gradient.
    {"name": "gradient_accumulation_global_clipnorm_model_fit", "mode": "fit",
     "kwargs": {"gradient_accumulation_steps": 2, "global_clipnorm": 0.8}},
    {"name": "loss_scale_amsgrad_global_clip_model_fit", "mode": "fit",
     "kwargs": {"loss_scale_factor": 128.0, "amsgrad": True, "global_clipnorm": 0.8,
                "weight_decay": 0.01, "learning_rate": 0.003}},
]
for case in CASES:
    case["steps"] = STEPS


def assert_clipping_mixed(case, row):
    """A clipping case must have clipped some updates and left others alone."""
    clipped, updates = row["clipped_updates"]
    assert updates == row["reference_iterations"]
    if any(k in case.get("kwargs", {}) for k in ("clipnorm", "clipvalue", "global_clipnorm")):
        assert 0 < clipped < updates, f"choose a threshold that clips some updates, not all: {row}"


@pytest.fixture(scope="module")
def results():
    """Run all N concurrently (each is a separate process), collect RESULT lines."""
    procs = {n: start_worker(["equivalence.py", n, json.dumps(CASES)]) for n in REPLICAS}
    parsed = {}
    try:
        for n, proc in procs.items():
            out = finish(proc, timeout=600)
            assert proc.returncode == 0, f"N={n} worker failed:\n{out[-6000:]}"
            for line in out.splitlines():
                if line.startswith("RESULT "):
                    row = json.loads(line[len("RESULT "):])
                    parsed[(n, row["case"])] = row
    finally:
        for proc in procs.values():
            kill_group(proc)
    return parsed


@pytest.mark.timeout(900)
@pytest.mark.parametrize("replicas", REPLICAS)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_single_device_adam(results, replicas, case):
    row = results[(replicas, case["name"])]
    # The run must actually have trained, or equality would prove nothing.
    assert row["reference_moved"] > 1e-2
    # `iterations` counts optimizer updates: micro-steps // accumulation steps.
    updates = STEPS // (case.get("kwargs", {}).get("gradient_accumulation_steps") or 1)
    assert row["iterations"] == row["reference_iterations"] == updates
    assert row["max_rel_diff"] <= TOLERANCE, row
    # Multi-replica CPU runs take the direct (all-to-all) collectives unless
    # the portable path is forced (CI runs this suite both ways).
    assert row["direct_collectives"] is (replicas > 1 and direct_collectives_requested())
    assert_clipping_mixed(case, row)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("replicas", REPLICAS)
def test_state_is_sharded(results, replicas):
    """Per-replica state <= Adam's / N + padding, cross-checked against sizes."""
    for case in CASES:
        row = results[(replicas, case["name"])]
        per_device = row["state_bytes_per_device"]
        assert len(per_device) == replicas
        total_params = sum(row["param_counts"])
        kinds = row["reference_state_bytes"] // (4 * total_params)
        # Adam keeps m, v (+v_hat, +EMA, +accumulators) per parameter, mirrored.
        assert row["reference_state_bytes"] == kinds * 4 * total_params
        padding_bytes = kinds * 4 * (replicas - 1 + 1)
        for nbytes in per_device.values():
            assert nbytes <= row["reference_state_bytes"] / replicas + padding_bytes, (case, row)
            shard_size = row["layout"][0]["elements"][1] - row["layout"][0]["elements"][0] + row["layout"][0]["padding"]
            assert nbytes == kinds * 4 * shard_size
        # Every element of every variable is owned by exactly one replica.
        owned = {}
        for entry in row["layout"]:
            for piece in entry["variables"]:
                owned.setdefault(piece["name"], []).append(tuple(piece["range"]))
        for name, ranges in owned.items():
            ranges.sort()
            assert ranges[0][0] == 0
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (name, ranges)
        sizes = sorted(r[-1][1] for r in (sorted(v) for v in owned.values()))
        assert sizes == sorted(row["param_counts"])


@pytest.mark.timeout(600)
def test_portable_collectives_match_too():
    """The portable path (all-reduce + slice, ReplicaContext.all_gather) is what
    NCCL/TPU strategies use; exercise it on CPU by switching the direct one off."""
    cases = [c for c in CASES if c["name"] in ("defaults", "clipnorm", "global_clipnorm", "use_ema_overwrite")]
    proc = start_worker(["equivalence.py", 3, json.dumps(cases)], DISTADAM_DIRECT_COLLECTIVES="0")
    try:
        out = finish(proc, timeout=500)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-5000:]
    rows = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(rows) == len(cases)
    for row in rows:
        assert row["max_rel_diff"] <= TOLERANCE, row
        assert row["direct_collectives"] is False
