"""The planner's numbers against the ZeRO paper, against ShardedAdam's real
variables (in process, default strategy) and against the benchmark's
measurements under MirroredStrategy(N) (benchmarks/results/results.json)."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import distadam
from distadam import planner
from distadam.__main__ import main as cli

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "results.json"


def small_model():
    # Sizes that do not divide by 3 or 4, and two dtypes' worth of buckets
    # would need a policy; one float32 bucket is what the benchmark uses.
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((13,)), keras.layers.Dense(29), keras.layers.Dense(7)])


def specs(model):
    return [planner.VariableSpec(v.path, tuple(v.shape), str(v.dtype)) for v in model.trainable_variables]


def test_reproduces_the_zero_paper_example():
    # Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, N_d = 64, K = 12 (mixed
    # precision Adam): 120 GB per device for data parallelism, 31.4 GB with P_os.
    p = planner.plan(planner.variables_from_count(7.5e9, "float16"), 64, master_weights=True)
    assert p.k_bytes_per_param == 12
    assert p.adam_total == 120e9
    assert round(p.sharded_total / 1e9, 1) == 31.4
    # ZeRO-1 moves the same bytes as data-parallel all-reduce.
    assert p.comm["zero1_reduce_scatter_all_gather"] == pytest.approx(p.comm["allreduce_bound"])


@pytest.mark.parametrize(
    "kwargs, flags",
    [
        ({}, {}),
        ({"amsgrad": True, "use_ema": True, "gradient_accumulation_steps": 3},
         {"amsgrad": True, "ema": True, "accumulation_steps": 3}),
        ({"shard_alignment": 128}, {"shard_alignment": 128}),
    ],
    ids=["default", "amsgrad_ema_accumulation", "aligned"],
)
def test_matches_sharded_adam_variables_in_process(kwargs, flags):
    model = small_model()
    optimizer = distadam.ShardedAdam(**kwargs)
    optimizer.build(model.trainable_variables)
    measured = sum(optimizer.state_bytes_per_device().values())
    p = planner.plan(specs(model), 1, **flags)
    assert p.sharded_state_bytes == measured

    reference = keras.optimizers.Adam(**{k: v for k, v in kwargs.items() if k != "shard_alignment"})
    reference.build(model.trainable_variables)
    # The step counter and learning rate are scalars outside the accounting.
    adam_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                     for v in reference.variables if v.name not in ("iteration", "learning_rate"))
    assert p.adam_state_bytes == adam_bytes


def test_matches_benchmark_measurements_per_worker_count():
    if not RESULTS.exists():
        pytest.fail(f"{RESULTS} is missing: run `python benchmarks/run_all.py` and commit its results")
    results = json.loads(RESULTS.read_text())
    compared = 0
    for n_key, run in results["mirrored"].items():
        n = int(n_key)
        for config, row in run.get("memory", {}).items():
            flags = {"amsgrad": row["optimizer_kwargs"].get("amsgrad", False),
                     "ema": row["optimizer_kwargs"].get("use_ema", False),
                     "accumulation_steps": row["optimizer_kwargs"].get("gradient_accumulation_steps")}
            variables = [planner.VariableSpec(f"v{i}", tuple(shape), "float32")
                         for i, shape in enumerate(row["model"]["variable_shapes"])]
            p = planner.plan(variables, n, **flags)
            # Exact, padding included: the same layout code decides both.
            assert set(row["sharded_bytes_per_replica"].values()) == {p.sharded_state_bytes}, (n, config)
            assert set(row["adam_bytes_per_replica"].values()) == {p.adam_state_bytes}, (n, config)
            assert p.padding_elements == row["padding_elements"]
            compared += 1
        if "bytes" in run:
            measured = run["bytes"]
            p = planner.plan(planner.variables_from_count(measured["param_bytes"] // 4, "float32"), n)
            assert measured["adam"]["bytes_sent_per_worker"] == pytest.approx(p.comm["adam_allreduce"])
            # The direct tf.distribute path reduce-scatters with an all-to-all
            # (native cost); the portable one with all-reduce + slice. The
            # step's small control all-reduce adds a few bytes the planner omits.
            native = bool(measured["sharded"]["launches_per_step"].get("all_to_all"))
            expected = p.comm["zero1_reduce_scatter_all_gather" if native else "sharded_allreduce_slice"]
            assert measured["sharded"]["bytes_sent_per_worker"] == pytest.approx(expected, rel=1e-5)
    assert {2, 3, 4} <= {int(n) for n in results["mirrored"]}, "benchmark must cover N = 2..4"
    assert compared >= 6


def test_cli_reads_a_keras_model_file(tmp_path, capsys):
    model = small_model()
    path = tmp_path / "small.keras"
    model.save(path)
    assert cli(["plan", "--model", str(path), "--workers", "3", "--amsgrad", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == model.count_params()
    expected = planner.plan(specs(model), 3, amsgrad=True)
    assert out["sharded_state_bytes"] == expected.sharded_state_bytes
    assert set(out["sharded"]) == {"params", "grads", "m", "v", "v_hat"}


def test_cli_prints_the_table(capsys):
    assert cli(["plan", "--params", "7e9", "--workers", "64", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "K = 4 bytes" in out and "ring all-reduce bound" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--params", "0", "--workers", "4"], "--params must be a positive whole number"),
        (["plan", "--params", "1e6", "--workers", "0"], "workers must be a positive integer"),
        (["plan", "--params", "1e6", "--workers", "2", "--master-weights"], "16-bit"),
        (["plan", "--model", "/nonexistent.keras", "--workers", "2"], "cannot load a Keras model"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_native_reduce_scatter_row_matches_the_all_to_all_prototype():
    """The planner's ZeRO-1 row (native reduce-scatter + all-gather) against
    the bytes traced from profile_step.py's all-to-all reduce-scatter."""
    profiles = sorted(RESULTS.parent.glob("profile_n*.json"))
    if not profiles:
        pytest.fail(f"no profile_n*.json next to {RESULTS}: run `python benchmarks/profile_step.py`")
    for path in profiles:
        profile = json.loads(path.read_text())
        measured = profile["collectives"]["sharded+all"]["bytes_sent_per_worker"]
        params = profile["params"]
        p = planner.plan(planner.variables_from_count(params, "float32"), profile["replicas"])
        assert measured == pytest.approx(p.comm["zero1_reduce_scatter_all_gather"], rel=1e-5), path.name
        assert profile["collectives"]["sharded"]["bytes_sent_per_worker"] == pytest.approx(
            p.comm["sharded_allreduce_slice"], rel=1e-5), path.name
