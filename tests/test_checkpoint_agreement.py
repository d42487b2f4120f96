"""Every process restores the same checkpoint (issue 13, item 8): process 0
decides, the others confirm through the optimizer's collectives, each
process hashes only the files it reads."""

import json
import re

import pytest

from test_faults import assert_no_survivors, launch


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_processes_agree_on_the_step_and_read_only_their_files(tmp_path):
    code, out, _ = launch(["--nproc", 2, "--timeout", 480, "ckpt_agree.py", tmp_path / "ckpt"], timeout=540)
    assert code == 0, out[-5000:]
    assert_no_survivors(out)
    results = [json.loads(line) for line in re.findall(r"RESULT (.*)", out)]
    by = {(r["scenario"], r["rank"]): r for r in results}
    assert len(by) == 6, out[-5000:]

    # 0. Process 0's disk is full while it takes the writer lock: every rank
    # raises a CheckpointError (nobody hangs) and the later saves work.
    rank0, rank1 = (by[("lock-enospc", rank)]["error"] for rank in (0, 1))
    assert "No space left" in rank0 and "later saves will retry" in rank0, rank0
    assert "process 0 could not lock" in rank1, rank1

    # 1. Rank 1's listing lags: it still restores what process 0 chose.
    lag = [by[("lagging-listing", rank)] for rank in (0, 1)]
    assert [r["restored"] for r in lag] == ["ckpt-000000000012"] * 2, lag
    assert [r["iterations"] for r in lag] == [12, 12]
    assert lag[0]["weights"] == lag[1]["weights"]
    assert lag[0]["warnings"] == lag[1]["warnings"] == []

    # 2. Only rank 1 reads the bad shard: both fall back to step 10 together.
    bad = [by[("one-rank-bad-file", rank)] for rank in (0, 1)]
    assert [r["restored"] for r in bad] == ["ckpt-000000000010"] * 2, bad
    assert [r["iterations"] for r in bad] == [10, 10]
    assert bad[0]["weights"] == bad[1]["weights"]
    rank0, rank1 = ("\n".join(r["warnings"]) for r in bad)
    assert "process(es) [1] could not use it" in rank0, rank0
    assert "shard-00001" not in rank0, "process 0 read a file only process 1 needs"
    assert "checksum mismatch in shard-00001-of-00002.npz" in rank1, rank1
