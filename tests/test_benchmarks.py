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
    code, out = _run([BENCH / "run_all.py", "--quick", "--no-plots", "--out", out_dir, "--timeout", "120"], timeout=170)
    assert code == 0, out[-6000:]
    return out_dir / "results.json"


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
