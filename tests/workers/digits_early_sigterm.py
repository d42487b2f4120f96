"""examples/train_digits.py, with a SIGTERM to this worker (rank 1 only)
while the model is being built: after the strategy exists (and with it
TensorFlow's SIGTERM handler) but before the preemption guard does (issue 25,
item 8). The signal must still end the job with a checkpoint.

usage: python digits_early_sigterm.py ARGS...   (train_digits.py's arguments)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_digits  # noqa: E402

build_model = train_digits.build_model


def build_model_after_a_sigterm(*args, **kwargs):
    if os.environ.get("DISTADAM_RANK") == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return build_model(*args, **kwargs)


train_digits.build_model = build_model_after_a_sigterm
sys.exit(train_digits.main(sys.argv[1:]))
