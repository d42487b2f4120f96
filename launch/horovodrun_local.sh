#!/usr/bin/env bash
# Run a Horovod training script with horovodrun: NPROC processes on this machine,
# or across the hosts of a hostfile. Defaults: 2 processes, Gloo, the Keras
# model.fit digits example (examples/train_digits_horovod.py).
#
#   launch/horovodrun_local.sh                                     # 2 local ranks
#   NPROC=4 launch/horovodrun_local.sh examples/train_digits_horovod.py --epochs 5
#   CONTROLLER=mpi launch/horovodrun_local.sh                      # over Open MPI
#   HOSTFILE=hosts NPROC=8 launch/horovodrun_local.sh my_train.py     # multi-host
#
# A hostfile lists "hostname slots=N" per line. Multi-host runs need
# passwordless ssh to every host and this repo and venv at the same path there.
# Extra horovodrun flags go in HOROVODRUN_ARGS (e.g. "--start-timeout 120").
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/common.sh
# horovodrun --mpi and the ranks find mpirun/orted and python through PATH.
export PATH="$BIN:$PATH"
if ! command -v horovodrun >/dev/null; then
  echo "horovodrun not found (next to $PY or on PATH): Horovod is built only on request: run ./dev setup horovod" \
       "(scripts/install_horovod.sh; ./dev test does it too)" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  # Open MPI refuses root unless told twice (containers, CI).
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

CONTROLLER=${CONTROLLER:-gloo}
case "$CONTROLLER" in
  gloo|mpi) ;;
  *) echo "CONTROLLER must be gloo or mpi, got '$CONTROLLER'" >&2; exit 2 ;;
esac
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "HOSTFILE '$HOSTFILE' does not exist" >&2; exit 2; }
  hosts=(-hostfile "$HOSTFILE")
else
  hosts=(-H "localhost:$NPROC")
fi
if [ $# -eq 0 ]; then
  set -- examples/train_digits_horovod.py
fi
# shellcheck disable=SC2086  # HOROVODRUN_ARGS is a list of flags
exec horovodrun -np "$NPROC" "${hosts[@]}" "--$CONTROLLER" ${HOROVODRUN_ARGS:-} "$PY" "$@"
