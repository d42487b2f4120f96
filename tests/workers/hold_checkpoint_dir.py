"""Another job's process 0 on a checkpoint directory: saves a
checkpoint there (taking the writer lock), prints
"holding <pid>", and keeps it until its stdin closes.

usage: python hold_checkpoint_dir.py DIR
"""

import os
import sys

import common  # noqa: F401  (quiet TensorFlow logs)
import keras

from distadam import ShardedAdam
from distadam.checkpoint import ShardedCheckpointManager

model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
optimizer = ShardedAdam()
optimizer.build(model.trainable_variables)
manager = ShardedCheckpointManager(sys.argv[1], model, optimizer)
manager.save()  # the first save takes the directory's writer lock
print(f"holding {os.getpid()}", flush=True)
sys.stdin.read()
manager.close()
