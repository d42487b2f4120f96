"""A worker that starts its MultiWorkerMirroredStrategy (and so TensorFlow's
gRPC server), runs one collective to prove the cluster works, then reports
where it listens and waits, so the test can read the socket table.

usage: listen_probe.py DIR    writes DIR/<rank>.ready (its PID as the machine's
/proc sees it, and its TF port), then waits for DIR/stop (at most 120 s).
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import distadam  # noqa: E402

directory = sys.argv[1]
spec = distadam.resolve_cluster()
strategy = distadam.strategy_from_env(cluster=spec, communication_timeout=60)

import tensorflow as tf  # noqa: E402

total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
assert int(total.numpy()) == spec.world_size, total

port = int(spec.peers[spec.rank].rsplit(":", 1)[1])
ready = os.path.join(directory, f"{spec.rank}.ready")
with open(ready + ".tmp", "w") as f:
    json.dump({"pid": int(os.readlink("/proc/self")), "port": port}, f)
os.replace(ready + ".tmp", ready)

deadline = time.monotonic() + 120
while not os.path.exists(os.path.join(directory, "stop")) and time.monotonic() < deadline:
    time.sleep(0.1)
