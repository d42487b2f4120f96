"""The backend interface is complete: a backend written in one file, outside
distadam, and registered by name, runs everything ShardedAdam does (the step,
consolidation, Keras-format saving, EMA finalisation, sharded checkpoints)."""

import numpy as np
import pytest

from distadam.collectives import Collectives, backend_class, register_backend
from test_mpi import mpirun, requires_mpi, run_job

TOLERANCE = 1e-5


@requires_mpi
@pytest.mark.timeout(420)
@pytest.mark.parametrize("workers", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_backend_in_one_file_runs_everything(tmp_path, workers):
    job = run_job(mpirun(workers, "one_file_backend.py", tmp_path / "ckpt"), timeout=360)
    assert job.code == 0, job.out[-6000:]
    assert [row["rank"] for row in job.rows] == list(range(workers)), job.out[-4000:]
    for row in job.rows:
        assert row["backend"] == "MPI4PyCollectives"
        assert row["workers"] == workers
        # Two sharded buckets: the dense layers' (one reduce-scatter, one
        # parameter all-gather) and the Embedding's, whose IndexedSlices rows
        # are all-gathered packed before its parameters are; plus the one
        # all-reduce of the global norm's statistics.
        assert row["buckets"] == 2, row
        assert row["launches"] == {"reduce_scatter": 1, "all_reduce": 1, "all_gather": 3}, row
        assert row["iterations"] == 24
        assert row["reference_moved"] > 1e-2
        clipped, updates = row["clipped_updates"]
        assert 0 < clipped < updates, f"clipping must mix clipped and unclipped updates: {row}"
        for key in ("weights_diff_before_ema", "weights_diff_after_ema", "saved_state_diff"):
            assert row[key] <= TOLERANCE, (key, row)
        assert row["saved_keys"] is True
        assert row["restored_state_diff"] == 0.0 and row["restored_weights_diff"] == 0.0, row
        assert row["restored_iterations"] == 24
        # m, v, v_hat, EMA: four shards of each bucket's ceil(elements / workers).
        assert row["state_elements"] == 4 * row["shard_elements"], row
        assert 0 <= row["shard_elements"] * workers - row["param_elements"] < workers * row["buckets"], row


def test_an_incomplete_backend_cannot_be_instantiated():
    class GatherOnlyInSteps(Collectives):
        num_workers = 1

        def worker_index(self):
            return 0

        def _reduce_scatter_sum(self, flat, name):
            return flat

        def _all_reduce_sum(self, values, name):
            return values

        def _all_gather(self, shard, name):
            return shard

        def all_reduce_eagerly(self, values):
            return np.asarray(values)

    with pytest.raises(TypeError, match="all_gather_eagerly"):
        GatherOnlyInSteps()


@pytest.mark.parametrize("name, target, match", [
    ("auto", "m:C", "auto"),
    ("", "m:C", "non-empty"),
    ("x", "module_without_class", "package.module:Class"),
    ("x", ":C", "package.module:Class"),
])
def test_register_backend_rejects_bad_names(name, target, match):
    with pytest.raises(ValueError, match=match):
        register_backend(name, target)


def test_registered_target_must_be_a_collectives_subclass(monkeypatch):
    from distadam import collectives

    monkeypatch.setitem(collectives.BACKENDS, "not-a-backend", "json:JSONDecoder")
    with pytest.raises(TypeError, match="not a Collectives subclass"):
        backend_class("not-a-backend")
