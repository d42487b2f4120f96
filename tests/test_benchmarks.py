"""CI guard for the benchmark's noise-free claims: a small run of the memory
and collective-count measurements (MirroredStrategy N = 1, 2, 3 in separate
processes) must pass benchmarks/check.py. Times are never asserted."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import check  # noqa: E402
import report  # noqa: E402


def _run(args, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH), str(ROOT), os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    finished = run_process([sys.executable, *args], timeout, cwd=ROOT, env=env)
    return finished.code, finished.out


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    code, out = _run([BENCH / "run_all.py", "--quick", "--no-plots", "--out", out_dir, "--timeout", "120"], timeout=240)
    assert code == 0, out[-6000:]
    return out_dir / "results.json"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_quick_benchmark_passes_the_regression_check(quick_results):
    results = json.loads(quick_results.read_text())
    assert {"1", "2", "3"} <= set(results["mirrored"])
    assert [r["replicas"] for r in report.memory_rows(results)] == [1, 2, 3]
    counts = {r["variables"] for r in report.collective_rows(results)}
    assert counts == {10, 100}
    code, out = _run([BENCH / "check.py", quick_results], timeout=60)
    assert code == 0, out
    assert "FAIL" not in out and "ok  " in out


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_check_fails_when_a_guard_regresses(quick_results):
    results = json.loads(quick_results.read_text())
    assert not check.check(results).failures

    fat = copy.deepcopy(results)  # state no longer sharded on N=2
    row = fat["mirrored"]["2"]["memory"]["default"]
    row["sharded_bytes_per_replica"] = dict(row["adam_bytes_per_replica"])
    row["sharded_reported_bytes_per_replica"] = dict(row["adam_bytes_per_replica"])
    assert any("memory default N=2" in f for f in check.check(fat).failures)

    chatty = copy.deepcopy(results)  # one collective per variable
    entry = chatty["mirrored"]["2"]["collectives"]["100"]["sharded"]
    entry["total_launches_per_step"] = 100
    entry["backend_launches_per_step"] = {"reduce_scatter": 50, "all_gather": 50}
    assert any("constant over variable counts" in f for f in check.check(chatty).failures)

    wasteful = copy.deepcopy(results)  # reduce-scatter sends twice its all-reduce
    wasteful["mirrored"]["2"]["bytes"]["sharded"]["ratio_to_bound"] = 2.5
    assert any(f.startswith("bytes") for f in check.check(wasteful).failures)


def test_committed_results_pass_the_check():
    committed = BENCH / "results" / "results.json"
    if not committed.exists():
        pytest.fail(f"{committed} is missing: run `python benchmarks/run_all.py` and commit its results")
    assert not check.check(json.loads(committed.read_text())).failures


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_quick_benchmark_times_and_fits_the_collectives(quick_results):
    """The collective section runs end to end (2 processes, three sizes in
    quick mode): measurements through ShardedAdam's own backend, the fit and
    the predicted-vs-measured rows. Times are never asserted."""
    from distadam import cost_model

    results = json.loads(quick_results.read_text())
    section = results["collectives"]
    assert set(section["runs"]) == {"2"}
    run = section["runs"]["2"]
    assert run["workers"] == 2 and run["direct_collectives"] is True
    kinds = ("all_reduce", "reduce_scatter", "all_gather")
    assert sorted((r["kind"], r["requested_elements"]) for r in run["rows"]) == sorted(
        (k, s) for k in kinds for s in (1024, 16384, 262144))
    assert all(len(r["times_s"]) == 3 and r["bytes"] == 4 * r["elements"] for r in run["rows"])
    fit = section["model"]
    assert fit == report.collective_model(section)
    assert fit["total"] == 9 and fit["alpha_s"] >= 0 and fit["beta_s_per_byte"] >= 0
    for row in fit["rows"]:
        assert row["predicted_s"] == pytest.approx(cost_model.predict(
            row["kind"], row["workers"], row["bytes"], fit["alpha_s"], fit["beta_s_per_byte"]))
    assert "alpha-beta model vs measurement" in report.markdown(results)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_runs_the_one_process_per_worker_headline(quick_results):
    """The headline section end to end on one small model (2 worker
    processes under the launcher): both optimizers, the communication
    floors, and the report. The floor of ShardedAdam's collectives must
    launch exactly the collectives its step launches, or it measures
    something else; check.py guards that. Times are never asserted."""
    results = json.loads(quick_results.read_text())
    entry = results["multiprocess"]["2"]["models"]["dense_compute_bound"]
    assert set(entry["ratios"]) == {"default", "small_buckets_whole"}
    assert set(entry["floors"]["ratios"]) == {"grads_only", "keras_collectives", "sharded_collectives"}
    launches = entry["optimizers"]["default"]["launches_per_step"]
    assert launches["reduce_scatter"] == launches["all_gather"] == 1
    assert entry["floors"]["sharded_collectives_launches"] == launches
    assert "ZeRO-1 floor" in "\n".join(report.multiprocess_markdown(results))
    lines = check.check(results).lines
    assert any(line.startswith("ok") and "the floor launches ShardedAdam's collectives" in line for line in lines)

    skewed = copy.deepcopy(results)  # a floor that skips the all-gather
    skewed["multiprocess"]["2"]["models"]["dense_compute_bound"]["floors"]["sharded_collectives_launches"][
        "all_gather"] = 0
    assert any("the floor launches" in f for f in check.check(skewed).failures)


def test_collective_model_reports_every_measurement():
    """report.collective_model on made-up measurements: exact data give a
    zero-error fit; one slow row is flagged, the others stay within the bar."""
    from distadam import cost_model

    alpha, beta = 2e-3, 5e-9
    runs = {}
    for n in (2, 3):
        rows = []
        for kind in ("all_reduce", "reduce_scatter", "all_gather"):
            for size in (1024, 1 << 20):
                full = -(-size // n) * n
                rows.append({"kind": kind, "requested_elements": size, "elements": full, "bytes": 4 * full,
                             "median_s": cost_model.predict(kind, n, 4 * full, alpha, beta)})
        runs[str(n)] = {"workers": n, "rows": rows, "repetitions": 5}
    section = {"runs": runs, "machine": {"date_utc": "now", "git_commit": "abc", "loadavg_1min_start": 0.1}}
    fit = report.collective_model(section)
    assert (fit["alpha_s"], fit["beta_s_per_byte"]) == pytest.approx((alpha, beta), rel=1e-9)
    assert fit["within_bar"] == fit["total"] == 12 and fit["max_abs_relative_error"] < 1e-9
    runs["3"]["rows"][0]["median_s"] *= 3  # one collective three times slower than the model
    fit = report.collective_model(section)
    assert fit["within_bar"] == 11
    section["model"] = fit
    text = "\n".join(report.collective_markdown({"collectives": section}))
    assert sum("✗" in cell for line in text.splitlines() if line.startswith("| ")
               for cell in line.split(" | ")) == 1
    assert "11 of 12 predictions are within 25%" in text


def test_horovod_rows_have_their_own_table():
    """horovodrun runs one process per rank, so its rows transfer to a
    cluster: they are not listed under the one-host (logical devices)
    caption, which says its rows are not cluster speed."""
    results = json.loads((BENCH / "results" / "results.json").read_text())
    text = report.markdown(results)
    one_host = text.split("**The cost of redundant updates on one host**", 1)[1].split("\n\n**", 1)[0]
    assert "horovodrun" not in one_host
    table = "\n".join(report.horovod_markdown(results))
    assert table in text and table.count("| horovodrun -np 2 (") == 4, table
    skipped = {"mirrored": {}, "horovod": {"not_measured": "skipped (--quick / --no-horovod)"}}
    assert report.horovod_markdown(skipped) == ["Horovod column: skipped (--quick / --no-horovod)."]


@pytest.mark.parametrize("flags", [["--only-horovod", "--only-collectives"], ["--only-multiprocess", "--quick"]])
def test_run_all_refuses_two_partial_runs_at_once(flags, capsys):
    import run_all

    with pytest.raises(SystemExit) as exit_info:
        run_all.main(flags)
    assert exit_info.value.code == 2
    assert "choose one of" in capsys.readouterr().err


# ------------------------------------------------ the profiler's private seam
from harness import profiler  # noqa: E402

# A framework_op_stats table as TensorBoard's plugin returns it ([host, device]).
_TABLE = json.dumps([{
    "cols": [{"id": "type"}, {"id": "operation"}, {"id": "total_self_time"}],
    "rows": [{"c": [{"v": "MatMul"}, {"v": "dense/MatMul"}, {"v": 3000.0}]},
             {"c": [{"v": "AllToAll"}, {"v": "a2a"}, {"v": 1000.0}]},
             {"c": [{"v": "IDLE"}, {"v": "IDLE"}, {"v": 500.0}]}],
}, {"cols": [], "rows": []}])


def test_profile_summary_reads_the_plugins_table():
    summary = profiler.summarize(_TABLE, profile_steps=2, top=1)
    assert summary["busy_ms_per_step"] == pytest.approx(2.0) and summary["idle_ms_per_step"] == pytest.approx(0.25)
    assert summary["by_op_type"] == [{"op": "MatMul", "ms_per_step": 1.5}]


def test_profile_falls_back_to_an_error_when_the_private_converter_moves(monkeypatch, tmp_path):
    """The fallback of the benchmarks' one private TensorFlow import, run:
    the module gone (ImportError) or its function changed (TypeError) gives
    the variant an error entry instead of failing the benchmark."""
    # TensorFlow's own profiler imports the real module, so the move is
    # simulated by looking for it elsewhere.
    monkeypatch.setattr(profiler, "PLUGIN_MODULE", "tensorflow.python.profiler.internal._moved_away")
    assert profiler.framework_op_stats([]) is None
    calls = []
    assert profiler.op_profile(lambda: calls.append(1), tmp_path / "trace", profile_steps=2, top=3) == \
        {"error": "profiler plugin could not convert the trace"}
    assert calls == [1, 1]  # the steps ran; only the summary is missing
    moved = type(sys)("moved_plugin")
    moved.xspace_to_tools_data = lambda xplanes, tool: (b"", True)  # a new signature
    monkeypatch.setattr(profiler, "PLUGIN_MODULE", "moved_plugin")
    monkeypatch.setitem(sys.modules, "moved_plugin", moved)
    assert profiler.framework_op_stats(["x.xplane.pb"]) is None


def test_the_private_converter_is_where_this_tensorflow_keeps_it():
    """Fails when TensorFlow moves it, so the fallback above is not silently
    all a benchmark ever gets."""
    import importlib

    plugin = importlib.import_module(profiler.PLUGIN_MODULE)
    assert callable(plugin.xspace_to_tools_data)


# ------------------------------------------- the capacity benchmark's search
import capacity  # noqa: E402


@pytest.mark.parametrize("limit, expected", [(1000, (960, 1024)), (2000, (1984, 2048)), (10_000, (4096, None)),
                                             (10, (None, 64))])
def test_capacity_search_brackets_the_largest_fitting_width(limit, expected):
    """Pure logic, no TensorFlow: grow or shrink from the start, then bisect
    to one resolution step; the answer is (largest fitting, smallest failing)."""
    tried = []
    found = capacity.search_largest(lambda w: tried.append(w) or w <= limit, 1500, low=64, high=4096, resolution=64)
    assert found == expected
    assert all(w % 64 == 0 and 64 <= w <= 4096 for w in tried) and len(tried) == len(set(tried))
    assert capacity.predicted_ratio(2) == pytest.approx(4 / 3) and capacity.predicted_ratio(4) == pytest.approx(1.6)
    assert capacity.params_for(2048, 4) == 4 * (2048 * 2048 + 2048)
