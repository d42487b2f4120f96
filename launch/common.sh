# Sourced by the launch scripts: one way to find the venv's Python and one
# name per setting, so every script reads the same variables.
#   DISTADAM_PYTHON  interpreter to use (default: $DISTADAM_VENV/bin/python)
#   DISTADAM_VENV    venv created by ./dev setup (default: .venv in the repository)
#   NPROC            number of worker processes / ranks (default 2)
# Each script cds to the repository root before sourcing this.
VENV=${DISTADAM_VENV:-.venv}
PY=${DISTADAM_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$VENV/bin/python" ]; then
    PY=$(cd "$VENV/bin" && pwd)/python
  else
    echo "no Python at $VENV/bin/python: run ./dev setup (or set DISTADAM_PYTHON)" >&2
    exit 1
  fi
fi
BIN=$(dirname "$PY")
if [ -n "${NP:-}" ] && [ -z "${NPROC:-}" ]; then
  echo "NP is now NPROC (as in all launch scripts); using NPROC=$NP" >&2
  NPROC=$NP
fi
NPROC=${NPROC:-2}
case "$NPROC" in
  ''|*[!0-9]*) echo "NPROC must be a whole number, got '$NPROC'" >&2; exit 2 ;;
esac
