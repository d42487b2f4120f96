#!/usr/bin/env bash
# Run a training script on N local worker processes (MultiWorkerMirroredStrategy
# over 127.0.0.1, in a private network namespace) with `distadam launch`.
# Defaults: 2 workers, the digits job.
#
#   launch/local.sh                                   # digits on 2 workers
#   NPROC=3 launch/local.sh examples/train_digits.py --epochs 5
#   launch/local.sh --timeout 600 --restarts 1 my_train.py --lr 1e-3
#
# Launcher options (see `distadam launch --help`) go before the script.
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/common.sh
if [ $# -eq 0 ]; then
  set -- examples/train_digits.py
fi
exec "$PY" -m distadam launch --nproc "$NPROC" "$@"
