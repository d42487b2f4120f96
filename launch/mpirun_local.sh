#!/usr/bin/env bash
# Run a training script with plain mpirun: NPROC ranks on this machine, or across
# the hosts of a hostfile. Works for both kinds of script:
#
# * tf.distribute scripts (examples/train_digits.py, the default): the ranks
#   exchange host:port over mpi4py (distadam.mpi_rendezvous) and train with
#   MultiWorkerMirroredStrategy; no Horovod needed;
# * Horovod scripts (examples/train_digits_horovod.py): Horovod uses MPI.
#
#   launch/mpirun_local.sh                                      # digits, 2 ranks
#   NPROC=3 launch/mpirun_local.sh examples/train_digits.py --epochs 3
#   launch/mpirun_local.sh examples/train_digits_horovod.py
#   HOSTFILE=hosts NPROC=8 launch/mpirun_local.sh my_train.py      # multi-host
#
# A hostfile lists "hostname slots=N" per line; multi-host runs need ssh to
# every host and the repo and venv at the same path. Extra mpirun flags go in
# MPIRUN_ARGS (e.g. "--mca btl_tcp_if_include eth0").
#
# Network. TensorFlow's gRPC server binds every interface and authenticates no
# one (see distadam/launch.py). So a local run (no HOSTFILE) starts mpirun, and
# with it every rank, in a new network namespace whose only interface is
# loopback, the one `distadam launch` gives its workers: the ranks reach each
# other over its 127.0.0.1 and nothing outside the job reaches them (nor they
# anything outside). Where no namespace can be made the script refuses.
# DISTADAM_NETWORK=host runs in the machine's network instead, with a warning;
# a HOSTFILE run needs it (ranks on other hosts cannot share a namespace), so
# confine those hosts' network yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/common.sh
export PATH="$BIN:$PATH"
if ! command -v mpirun >/dev/null; then
  echo "mpirun not found (next to $PY or on PATH): Open MPI is installed only on request: run ./dev setup horovod" \
       "(Open MPI 4.1 from PyPI into the venv; ./dev test does it too)" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

network=${DISTADAM_NETWORK:-private}
case "$network" in
  private|host) ;;
  *) echo "DISTADAM_NETWORK must be private or host, got '$network'" >&2; exit 2 ;;
esac
if [ -n "${HOSTFILE:-}" ] && [ "$network" = private ]; then
  echo "HOSTFILE: ranks on several hosts cannot share a private network namespace, so their" \
       "TensorFlow gRPC servers would listen, unauthenticated, on every interface of every host." \
       "Set DISTADAM_NETWORK=host to run anyway, on hosts no untrusted machine can reach." >&2
  exit 2
fi
if [ "$network" = host ]; then
  echo "WARNING: DISTADAM_NETWORK=host: the ranks' TensorFlow gRPC servers listen on EVERY" \
       "interface, and anyone who can reach their ports can run code as you." >&2
fi

if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "HOSTFILE '$HOSTFILE' does not exist" >&2; exit 2; }
  hosts=(--hostfile "$HOSTFILE")
else
  # More ranks than cores is fine for trying things out locally.
  hosts=(--host "localhost:$NPROC" --oversubscribe)
fi
if [ $# -eq 0 ]; then
  set -- examples/train_digits.py
fi
# -x forwards the environment the ranks need on other hosts (only what is set:
# mpirun warns about the rest).
forward=(-x PATH)
for var in PYTHONPATH TF_CPP_MIN_LOG_LEVEL DISTADAM_WORKER_HOST; do
  if [ -n "${!var+x}" ]; then forward+=(-x "$var"); fi
done
# --bind-to none: each rank runs a multi-threaded TensorFlow, not one core's
# worth of work.
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags
command=(mpirun -np "$NPROC" "${hosts[@]}" --bind-to none "${forward[@]}" ${MPIRUN_ARGS:-} "$PY" "$@")
if [ "$network" = host ]; then
  exec "${command[@]}"
fi
# distadam.launch makes the namespace (refusing, with the reason, where it
# cannot) and execs mpirun inside it.
exec "$PY" -c 'import sys; from distadam.launch import exec_in_private_network as run; sys.exit(run(sys.argv[1:], prog="mpirun_local.sh"))' \
  "${command[@]}"
