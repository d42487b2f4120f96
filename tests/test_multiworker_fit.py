"""Keras' own ``model.fit``/``evaluate``/``predict`` on several worker processes
(MultiWorkerMirroredStrategy under ``distadam launch``), issue 24.

One job per worker count (tests/workers/fit_multiworker.py) checks, in one
strategy: plain Keras fails as upstream (keras-team/keras#20585) before
distadam.multiworker_fit is enabled; a script whose only change is
``distadam.ShardedAdam`` trains through ``fit`` (with validation_data) to the
weights of single-device ``keras.optimizers.Adam`` on the same global batches
(global_clipnorm clipping some updates and not others, a staircase
schedule), bit-identical on every worker; the loss and metric that
``fit``/``evaluate`` report are identical on every worker and equal a
one-process evaluation of the same weights; ``predict`` returns every row of
the input in order; plain ``keras.optimizers.Adam`` after
``distadam.enable_multiworker_fit()`` does the same, with
``steps_per_execution`` > 1, and Keras' EarlyStopping and ReduceLROnPlateau
act at the same epochs on every worker (both in the 2-worker job only, for
time). The global batch (24) splits evenly over 2 and 3 workers.
"""

import json
import sys

import numpy as np
import pytest

import reference
from common import max_relative_difference
from conftest import ROOT, WORKERS, kill_group, run_process, start_process, wait_for, worker_env

TOLERANCE = 1e-5
SCHEDULE = {"initial_learning_rate": 0.01, "decay_steps": 5, "decay_rate": 0.5, "staircase": True}
STEPS = 16  # 2 epochs of 8 global batches
CASES = [
    # ShardedAdam; op-by-op update (XLA-compiling each bucket in every
    # process would be most of the job's time on 2 cores; test_equivalence
    # covers the fused update through fit).
    {"name": "sharded_adam_fit", "mode": "fit", "repeat": 2, "steps": STEPS, "schedule": SCHEDULE,
     "kwargs": {"global_clipnorm": 0.6, "fused_update": False}},
    # keras.optimizers.Adam: its clipping would be per replica (Keras clips
    # local gradients), so none here.
    {"name": "keras_adam_fit", "mode": "fit", "repeat": 2, "steps": STEPS, "schedule": SCHEDULE,
     "model": "dense"},
]


@pytest.mark.slow
@pytest.mark.timeout(520)  # hard bounds, not expectations: the job takes ~40 s on an idle machine
@pytest.mark.parametrize("workers", [2, 3])
def test_model_fit_on_worker_processes_matches_single_device_adam(tmp_path, workers):
    cases = CASES if workers == 2 else CASES[:1]
    references = start_process([sys.executable, WORKERS / "reference.py", json.dumps(cases), tmp_path])
    try:
        command = [sys.executable, "-m", "distadam.launch", "--nproc", workers, "--timeout", 420,
                   WORKERS / "fit_multiworker.py", json.dumps(cases), tmp_path]
        finished = run_process(command, 450, env=worker_env(PYTHONPATH=f"{WORKERS}:{ROOT}"))
        assert finished.code == 0, finished.out[-6000:]
        out, _ = wait_for(references, 450)
        assert references.returncode == 0, out[-3000:]
    finally:
        kill_group(references)

    for index, case in enumerate(cases):
        expected = reference.load(tmp_path / f"ref-{index}.npz")
        results = [np.load(tmp_path / f"rank{r}-{index}.npz") for r in range(workers)]
        first = results[0]
        weights = [f"w{i}" for i in range(len(expected.weights))]
        reported = sorted(k for k in first.files if k.startswith(("history_", "evaluate_")))
        assert {"history_loss", "history_val_mae", "evaluate_loss", "evaluate_mae"} <= set(reported)
        for rank, result in enumerate(results[1:], start=1):
            for key in weights + reported + ["predict"]:
                np.testing.assert_array_equal(result[key], first[key], err_msg=f"{case['name']}: rank {rank} {key}")

        assert expected.initial_moved > 1e-2  # the run trained
        worst = max_relative_difference([first[k] for k in weights], expected.weights)
        assert worst <= TOLERANCE, f"{case['name']}: {worst:.3g} from single-device Adam"
        assert int(first["iterations"]) == expected.iterations == STEPS
        if "global_clipnorm" in case.get("kwargs", {}):
            clipped, updates = expected.clipped_updates
            assert 0 < clipped < updates, f"{case['name']}: clipping must mix clipped and unclipped updates"

        # Global metrics: what fit (last epoch's validation) and evaluate
        # report equals a one-process evaluation of the final weights.
        for metric in ("loss", "mae"):
            local = float(first[f"local_{metric}"])
            for reported_value in (first[f"evaluate_{metric}"], first[f"history_val_{metric}"][-1]):
                assert float(reported_value) == pytest.approx(local, rel=TOLERANCE), (case["name"], metric)
        # predict: the whole input, in order, on every worker.
        assert first["predict"].shape == first["local_predict"].shape == (100, 2)
        np.testing.assert_allclose(first["predict"], first["local_predict"], rtol=1e-5, atol=1e-6)

    sharded = np.load(tmp_path / "rank0-0.npz")
    # Plain Keras failed as upstream does, before anything enabled the fix;
    # creating ShardedAdam in the multi-worker scope enabled it.
    assert "PerReplica" in str(sharded["plain_error"]), str(sharded["plain_error"])
    assert not bool(sharded["enabled_before"]) and bool(sharded["enabled_by_sharded_adam"])

    if workers == 2:
        # Keras' EarlyStopping and ReduceLROnPlateau on the validation loss:
        # every worker sees the same global loss, so all reduce the learning
        # rate after the same epochs (2 and 3: min_delta admits no
        # improvement after the first) and stop after the same one (3, of 6),
        # with no worker left waiting in a collective; the weights stay
        # identical and the reduced rate was used.
        runs = [np.load(tmp_path / f"rank{r}-callbacks.npz") for r in range(workers)]
        for rank, run in enumerate(runs[1:], start=1):
            for key in run.files:
                np.testing.assert_array_equal(run[key], runs[0][key], err_msg=f"callbacks: rank {rank} {key}")
        assert int(runs[0]["epochs"]) == 3 and int(runs[0]["iterations"]) == 3 * (STEPS // 2)
        np.testing.assert_allclose(runs[0]["learning_rates"], [0.01, 0.005, 0.0025], rtol=1e-6)
