"""The planner's numbers against the ZeRO paper, against ShardedAdam's real
variables (in process, default strategy) and against the benchmark's
measurements under MirroredStrategy(N) (benchmarks/results/results.json)."""

import json
import subprocess
import sys
import zipfile
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
        (["plan", "--params", "0", "--workers", "4"], "argument --params: expected a positive whole number"),
        (["plan", "--params", "1e6", "--workers", "0"], "argument --workers: expected a whole number from 1"),
        (["plan", "--params", "1e6", "--workers", "2", "--master-weights"], "16-bit"),
        (["plan", "--model", "/nonexistent.keras", "--workers", "2"], "cannot load a Keras model"),
        # Issue 14: no traceback, and the flag is named.
        (["plan", "--params", "inf", "--workers", "2"], "argument --params: expected a positive whole number"),
        (["plan", "--params", "nan", "--workers", "2"], "argument --params: expected a positive whole number"),
        (["plan", "--params", "1e400", "--workers", "2"], "argument --params: expected a positive whole number"),
        (["plan", "--params", "1.5", "--workers", "2"], "argument --params: expected a positive whole number"),
        (["plan", "--params", "1_000", "--workers", "2"], "argument --params: expected a positive whole number"),
        (["plan", "--params", "1e6", "--workers", "\uff12"], "argument --workers: expected a whole number"),
        (["plan", "--params", "1e6", "--workers", "10000000"], "argument --workers: expected a whole number"),
        (["plan", "--params", "1e6", "--workers", "2", "--accumulation", "1"], "argument --accumulation"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_variables_from_count_rejects_non_finite_by_flag_name():
    for bad in (float("inf"), float("nan"), 0.5, -3.0, 1e16):
        with pytest.raises(ValueError, match="--params must be a positive whole number"):
            planner.variables_from_count(bad, "float32")


def keras_file_declaring(path, layers, input_dim):
    """A .keras zip with only config.json (and metadata): what the model
    declares, not weights: the file stays a few kB whatever the shapes."""
    config = {"module": "keras", "class_name": "Sequential", "registered_name": None, "config": {
        "name": "declared", "trainable": True, "dtype": "float32",
        "layers": [{"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
                    "config": {"batch_shape": [None, input_dim], "dtype": "float32", "name": "input"}}] + layers}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("metadata.json", json.dumps({"keras_version": keras.__version__}))
    return path


PLAN_RSS = r"""
import resource, subprocess, sys
result = subprocess.run([sys.executable, "-m", "distadam", "plan", "--model", sys.argv[1], "--workers", "8",
                         "--json"], capture_output=True, text=True, timeout=150)
print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(result.stdout)
print(result.stderr[-2000:], file=sys.stderr)
"""


@pytest.mark.timeout(180)
def test_plan_model_reads_shapes_without_allocating_weights(tmp_path):
    """A file of a few kB declaring Dense 20000x20000 (1.6 GB of float32 weights):
    planning it must not allocate them. Peak RSS of the planner process,
    measured by a wrapper (TensorFlow alone is ~0.6 GB)."""
    dense = lambda name, units: {"module": "keras.layers", "class_name": "Dense", "registered_name": None,  # noqa: E731
                                 "config": {"name": name, "units": units}}
    path = keras_file_declaring(tmp_path / "big.keras", [dense("big", 20000), dense("head", 10)], 20000)
    assert path.stat().st_size < 20_000
    result = subprocess.run([sys.executable, "-c", PLAN_RSS, str(path)], capture_output=True, text=True,
                            timeout=170, cwd=Path(__file__).resolve().parents[1])
    code, peak_kib = map(int, result.stdout.split("\n", 1)[0].split())
    assert peak_kib < 1200 * 1024, f"planning a declared 1.6 GB model peaked at {peak_kib / 1024:.0f} MiB"
    assert code == 0, result.stderr
    plan = json.loads(result.stdout.split("\n", 1)[1])
    assert plan["params"] == 20000 * 20000 + 20000 + 20000 * 10 + 10


def test_plan_model_rejects_what_is_not_a_model(tmp_path):
    not_zip = tmp_path / "x.keras"
    not_zip.write_bytes(b"\x89HDF\r\n")
    no_config = tmp_path / "empty.keras"
    with zipfile.ZipFile(no_config, "w") as archive:
        archive.writestr("metadata.json", "{}")
    lambda_layer = keras_file_declaring(tmp_path / "lambda.keras", [{
        "module": "keras.layers", "class_name": "Lambda", "registered_name": None,
        "config": {"name": "l", "function": {"class_name": "__lambda__", "config": {"code": "x", "defaults": None,
                                                                                  "closure": None}}}}], 3)
    for path in (not_zip, no_config, lambda_layer):
        with pytest.raises(ValueError, match="cannot load a Keras model"):
            planner.variables_from_model(str(path))


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


def test_placements_show_the_memory_and_bytes_trade_off():
    """A table with sparse gradients: sharded keeps 1/N of its state but
    gathers the whole table every step; replicated keeps it all but moves only
    the rows (as Keras Adam does)."""
    dense = planner.VariableSpec("dense/kernel", (1000, 100), "float32")
    table = planner.VariableSpec("table/embeddings", (50_000, 32), "float32")
    p = planner.plan([dense, table], 4, rows_per_step=512, replicate=[])
    (row,) = p.placements
    assert row["name"] == "table/embeddings"
    elements, itemsize, n = 50_000 * 32, 4, 4
    assert row["state_sharded"] == 2 * itemsize * elements // n
    assert row["state_replicated"] == row["state_adam"] == 2 * itemsize * elements
    rows = 512 * (32 * itemsize + 4) * (n - 1)
    assert row["bytes_replicated"] == row["bytes_adam"] == rows
    assert row["bytes_sharded"] == rows + elements * itemsize * (n - 1) / n
    # The layout the optimizer builds by default: the table's bucket is
    # replicated (as replicate=["table"] does), the dense one sharded.
    replicated = planner.plan([dense, table], 4, rows_per_step=512)
    assert replicated.options["replicated_buckets"] == 1
    assert planner.plan([dense, table], 4, rows_per_step=512, replicate=["table"]).sharded == replicated.sharded
    assert replicated.sharded_state_bytes == 2 * itemsize * (-(-100_000 // n) + elements)
    assert replicated.comm["sharded_as_configured"] < p.comm["sharded_as_configured"]


def test_plan_matches_the_optimizer_with_placements():
    import keras

    import distadam

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(300, 8),
                              keras.layers.Flatten(), keras.layers.Dense(5)])
    for kwargs in ({}, {"replicate": []}, {"replicate": ["dense"]}, {"row_sparse": []},
                   {"replicate": [], "min_shard_elements": 100}):
        optimizer = distadam.ShardedAdam(**kwargs)
        optimizer.build(model.trainable_variables)
        p = planner.plan(specs(model), 1, **kwargs)
        assert p.sharded_state_bytes == sum(optimizer.state_bytes_per_device().values()), kwargs
        assert p.options["buckets"] == len(optimizer.layout.buckets), kwargs
        assert p.options["replicated_buckets"] == sum(b.replicated for b in optimizer.layout.buckets), kwargs



def test_cli_table_and_rows_flags(capsys):
    assert cli(["plan", "--params", "1e6", "--table", "1e5x16", "--rows-per-step", "256", "--workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "table0/embeddings" in out and "replicated (replicate=[...])" in out and "256 rows" in out
    with pytest.raises(SystemExit):
        cli(["plan", "--params", "1e6", "--table", "1e5y16", "--workers", "8"])


@pytest.mark.parametrize("flags", [{}, {"amsgrad": True}, {"ema": True, "accumulation_steps": 2},
                                   {"amsgrad": True, "ema": True, "accumulation_steps": 3}])
def test_state_kinds_are_named_once_for_optimizer_and_planner(flags):
    """cost_model.STATE_KINDS is the one list of state kinds: the optimizer's
    names, in its order, and the planner's keys for them."""
    from distadam import cost_model

    model = small_model()
    optimizer = distadam.ShardedAdam(amsgrad=flags.get("amsgrad", False), use_ema=flags.get("ema", False),
                                     gradient_accumulation_steps=flags.get("accumulation_steps"))
    optimizer.build(model.trainable_variables)
    assert list(optimizer.sharded_state.kinds) == cost_model.state_kinds(**flags)
    p = planner.plan(specs(model), 1, **flags)
    assert list(p.sharded)[2:] == [cost_model.STATE_KINDS[k] for k in optimizer.sharded_state.kinds]


def test_placement_defaults_are_the_optimizers():
    import inspect

    signature = inspect.signature(distadam.ShardedAdam.__init__).parameters
    assert tuple(signature["replicate"].default) == planner.EMBEDDINGS
    assert tuple(signature["row_sparse"].default) == planner.EMBEDDINGS


def test_model_reading_without_the_private_keras_list(tmp_path, monkeypatch):
    """The fallback when keras.src moves: the shapes are still read (only the
    clean-up of Keras' deferred-variable list is skipped)."""
    from distadam import planner_input

    model = small_model()
    path = tmp_path / "small.keras"
    model.save(path)
    monkeypatch.setattr(planner_input, "deferred_variables", lambda: None)
    read = planner.variables_from_model(str(path))
    assert [(v.shape, v.dtype) for v in read] == [(v.shape, v.dtype) for v in specs(model)]
