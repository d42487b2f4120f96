"""Non-finite gradients on one replica skip the step on all replicas."""

import json

import pytest

from conftest import finish, kill_group, start_worker


# Every run of one N trains in one worker process (one strategy per process).
# The verdict is taken in the fused (XLA) update and op by op alike; the runs
# without a new kind of overflow take the op-by-op path, which compiles faster.
SKIP_RUNS = {
    "inf": {"poison": "inf"},
    "global_clipnorm": {"kwargs": {"global_clipnorm": 0.5, "fused_update": False}},
    "ema_weight_decay": {"kwargs": {"use_ema": True, "ema_overwrite_frequency": 2, "weight_decay": 0.01,
                                    "fused_update": False}},
    # Step 2 is a micro-step that only accumulates, step 5 applies the update.
    "accumulation": {"kwargs": {"gradient_accumulation_steps": 2, "fused_update": False}, "poison_steps": [2, 5]},
    "amsgrad_clipnorm_inf": {"kwargs": {"amsgrad": True, "clipnorm": 0.5}, "poison": "inf", "poison_steps": [0, 4]},
    # A finite gradient whose square overflows float32: the state would turn
    # inf, then NaN, and every later step would be skipped (the model frozen).
    "overflowing_square": {"poison": "overflow", "poison_steps": [1]},
    "overflowing_square_amsgrad": {"kwargs": {"amsgrad": True}, "poison": "overflow", "poison_steps": [2, 3]},
}
RUNS = {
    2: {"plain": {}, "loss_scale": {"wrap": "loss_scale"}, "keras_loss_scale": {"wrap": "keras_loss_scale"},
        **SKIP_RUNS},
    3: {"plain": {}},
}


@pytest.fixture(scope="module")
def results():
    """{N: {run name: result}}: one worker process per N, running its runs
    one after another."""
    procs = {n: start_worker(["nonfinite.py", n, json.dumps([{"name": k, **v} for k, v in runs.items()])])
             for n, runs in RUNS.items()}
    try:
        outs = {n: finish(proc, timeout=400) for n, proc in procs.items()}
    finally:
        for proc in procs.values():
            kill_group(proc)
    parsed = {}
    for n, proc in procs.items():
        assert proc.returncode == 0, outs[n][-5000:]
        rows = [json.loads(line[len("RESULT "):]) for line in outs[n].splitlines() if line.startswith("RESULT ")]
        parsed[n] = {row["name"]: row for row in rows}
        assert sorted(parsed[n]) == sorted(RUNS[n]), outs[n][-3000:]
    return parsed


def check_skipped_everywhere(result):
    history, poisoned = result["history"], result["poison_step"]
    for step, record in enumerate(history):
        assert record["replicas_identical"] and record["finite"], (step, record)
        assert record["unchanged"] == (step == poisoned), (step, record)
    # iterations did not advance on the poisoned step, and the schedule with it.
    assert [r["iterations"] for r in history] == [1, 2, 3, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("replicas", [2, 3])
def test_sharded_adam_skips_globally(results, replicas):
    result = results[replicas]["plain"]
    check_skipped_everywhere(result)
    assert result["skipped"] == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(SKIP_RUNS))
def test_skipped_step_leaves_no_trace(results, case):
    """A skipped step is as if its batch never came: the final weights equal
    those of a run without the poisoned batches."""
    result = results[2][case]
    poisoned = result["poison_steps"]
    assert result["skipped"] == len(poisoned)
    assert result["raw_iterations"] == result["clean_raw_iterations"] == 6 - len(poisoned)
    for step, record in enumerate(result["history"]):
        assert record["replicas_identical"] and record["finite"], (step, record)
        if step in poisoned:
            assert record["unchanged"], (step, record)
    assert result["max_difference_to_clean_run"] <= 1e-6, result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wrapped_loss_scale_is_reduced_on_every_replica(results):
    result = results[2]["loss_scale"]
    check_skipped_everywhere(result)
    scales = [r["scale"] for r in result["history"]]
    assert scales[result["poison_step"]] == scales[0] / 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_keras_loss_scale_misses_remote_nan_but_shards_stay_consistent(results):
    """Keras' own LossScaleOptimizer acts on replica 0's local check, so a NaN on
    another replica does not lower the scale; ShardedAdam still skips the step
    everywhere (which is why distadam.LossScaleOptimizer exists)."""
    result = results[2]["keras_loss_scale"]
    check_skipped_everywhere(result)
    assert result["skipped"] == 1
    scales = [r["scale"] for r in result["history"]]
    assert scales[result["poison_step"]] == scales[0]


# (Padding never decides a step: test_equivalence's "epsilon_zero_padded"
# case, epsilon=0 at N = 3, where padding computes 0/0.)


# ---------------------------------------------------------------- in process
def _variables(dtype="float32", values=(0.5, -0.25, 1.0, 2.0)):
    import keras
    import numpy as np

    return [keras.Variable(np.asarray(values, dtype)), keras.Variable(np.ones((2, 3), dtype))]


def test_float16_square_overflow_skips_the_step_and_training_goes_on():
    """float16 gradients above 256 square to inf: the step is skipped instead
    of writing v = inf (which would freeze every later step)."""
    import numpy as np
    import tensorflow as tf

    from distadam import ShardedAdam

    variables = _variables("float16")
    optimizer = ShardedAdam(learning_rate=0.01)
    good = [tf.constant([0.1, 0.2, -0.1, 0.3], tf.float16), tf.fill([2, 3], tf.constant(0.05, tf.float16))]
    huge = [tf.constant([300.0, 0.2, -0.1, 0.3], tf.float16), good[1]]
    before = [v.numpy().copy() for v in variables]
    optimizer.apply_gradients(zip(huge, variables))
    assert optimizer.skipped_steps == 1 and int(optimizer.iterations.numpy()) == 0
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, variables))
    for _ in range(3):
        optimizer.apply_gradients(zip(good, variables))
    assert optimizer.skipped_steps == 1 and optimizer.consecutive_skipped_steps == 0
    assert int(optimizer.iterations.numpy()) == 3
    assert all(np.all(np.isfinite(v.numpy())) for v in variables)
    assert not np.array_equal(before[0], variables[0].numpy())
    for kind in ("momentum", "velocity"):
        assert all(np.all(np.isfinite(s)) for s in optimizer.gather_full_state(kind))


@pytest.mark.parametrize("learning_rate, message", [
    (lambda: float("nan"), "learning rate"),
    (lambda: -0.001, "learning rate"),
    ("schedule_to_inf", "learning rate"),
])
def test_non_finite_or_negative_learning_rate_raises_on_the_step(learning_rate, message):
    import keras
    import tensorflow as tf

    from distadam import ShardedAdam

    if learning_rate == "schedule_to_inf":
        class Overflowing(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):  # 1e30 squared: inf in float32
                return tf.square(tf.constant(1e30, tf.float32)) * tf.cast(step + 1, tf.float32)

        learning_rate = Overflowing()
    variables = _variables()
    optimizer = ShardedAdam(learning_rate=learning_rate)
    grads = [tf.ones([4]), tf.ones([2, 3])]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        optimizer.apply_gradients(zip(grads, variables))
    assert optimizer.skipped_steps == 0


def test_learning_rate_that_overflows_float32_is_rejected_by_name():
    from distadam import ShardedAdam

    with pytest.raises(ValueError, match="learning_rate.*float32"):
        ShardedAdam(learning_rate=1e300)


def test_stalled_training_warns_then_raises_naming_the_variable(capfd):
    """Non-finite weights make every step skip: each skip is reported, and the
    run stops with an error naming the variable after the configured limit."""
    import numpy as np
    import tensorflow as tf

    from distadam import ShardedAdam

    variables = _variables(values=(0.5, np.nan, 1.0, 2.0))
    optimizer = ShardedAdam(max_consecutive_skips=3)
    optimizer.build(variables)
    grads = [tf.ones([4]), tf.ones([2, 3])]
    for _ in range(3):
        optimizer.apply_gradients(zip(grads, variables))
    assert optimizer.skipped_steps == optimizer.consecutive_skipped_steps == 3
    with pytest.raises(tf.errors.InvalidArgumentError, match="training has stalled") as error:
        optimizer.apply_gradients(zip(grads, variables))
    assert variables[0].path in str(error.value)
    assert "max_consecutive_skips=3" in str(error.value)
    err = capfd.readouterr().err
    assert err.count("distadam: skipped a step") >= 3, err[-2000:]
    assert variables[0].path in err
