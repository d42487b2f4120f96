"""Non-finite gradients on one replica skip the step on all replicas."""

import json

import pytest

from conftest import finish, kill_group, start_worker


def run(replicas, wrap, options=None):
    proc = start_worker(["nonfinite.py", replicas, wrap, json.dumps(options or {})])
    try:
        out = finish(proc, timeout=240)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-5000:]
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def check_skipped_everywhere(result):
    history, poisoned = result["history"], result["poison_step"]
    for step, record in enumerate(history):
        assert record["replicas_identical"] and record["finite"], (step, record)
        assert record["unchanged"] == (step == poisoned), (step, record)
    # iterations did not advance on the poisoned step, and the schedule with it.
    assert [r["iterations"] for r in history] == [1, 2, 3, 3, 4, 5]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("replicas", [2, 3])
def test_sharded_adam_skips_globally(replicas):
    result = run(replicas, "plain")
    check_skipped_everywhere(result)
    assert result["skipped"] == 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [
    {"poison": "inf"},
    {"kwargs": {"global_clipnorm": 0.5}},
    {"kwargs": {"use_ema": True, "ema_overwrite_frequency": 2, "weight_decay": 0.01}},
    # Step 2 is a micro-step that only accumulates, step 5 applies the update.
    {"kwargs": {"gradient_accumulation_steps": 2}, "poison_steps": [2, 5]},
    {"kwargs": {"amsgrad": True, "clipnorm": 0.5}, "poison": "inf", "poison_steps": [0, 4]},
], ids=["inf", "global_clipnorm", "ema_weight_decay", "accumulation", "amsgrad_clipnorm_inf"])
def test_skipped_step_leaves_no_trace(case):
    """A skipped step is as if its batch never came: the final weights equal
    those of a run without the poisoned batches."""
    result = run(2, "plain", case)
    poisoned = result["poison_steps"]
    assert result["skipped"] == len(poisoned)
    assert result["raw_iterations"] == result["clean_raw_iterations"] == 6 - len(poisoned)
    for step, record in enumerate(result["history"]):
        assert record["replicas_identical"] and record["finite"], (step, record)
        if step in poisoned:
            assert record["unchanged"], (step, record)
    assert result["max_difference_to_clean_run"] <= 1e-6, result


@pytest.mark.timeout(300)
def test_wrapped_loss_scale_is_reduced_on_every_replica():
    result = run(2, "loss_scale")
    check_skipped_everywhere(result)
    scales = [r["scale"] for r in result["history"]]
    assert scales[result["poison_step"]] == scales[0] / 2


@pytest.mark.timeout(300)
def test_keras_loss_scale_misses_remote_nan_but_shards_stay_consistent():
    """Keras' own LossScaleOptimizer acts on replica 0's local check, so a NaN on
    another replica does not lower the scale; ShardedAdam still skips the step
    everywhere (which is why distadam.LossScaleOptimizer exists)."""
    result = run(2, "keras_loss_scale")
    check_skipped_everywhere(result)
    assert result["skipped"] == 1
    scales = [r["scale"] for r in result["history"]]
    assert scales[result["poison_step"]] == scales[0]
