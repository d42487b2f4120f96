"""Non-finite gradients on one replica skip the step on all replicas."""

import json

import pytest

from conftest import finish, kill_group, start_worker


def run(replicas, wrap):
    proc = start_worker(["nonfinite.py", replicas, wrap])
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
