"""train_cases.py on an emulated cluster (`distadam launch --nodes`), with
two pauses for the test to look at the network from outside.

usage: python emulated_cases.py CASES_JSON OUT_DIR
  under `distadam launch --nproc N --nodes K ...`.

1. Starts the MultiWorkerMirroredStrategy (so TensorFlow's gRPC server
   listens), runs one all-reduce across every node, writes
   OUT_DIR/<rank>.ready (its PID as the machine's /proc sees it, its TF port,
   what DISTADAM_WORKERS_PER_NODE resolves to) and waits for OUT_DIR/go
   (at most 120 s): the test reads the socket, address and route tables.
2. Trains CASES_JSON exactly as train_cases.py does (that file runs as is, on
   this strategy: TensorFlow allows one per process).
3. Before exiting, writes OUT_DIR/<rank>.link: its node's eth0 byte counters
   (what crossed the emulated link).
"""

import json
import os
import runpy
import sys
import time

import common

import distadam  # noqa: E402

out_dir = sys.argv[2]
spec = distadam.resolve_cluster()
strategy = distadam.strategy_from_env(cluster=spec, communication_timeout=300)

import tensorflow as tf  # noqa: E402

from distadam.topology import workers_per_node  # noqa: E402

total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
assert int(total.numpy()) == spec.world_size, total


def write(name, payload):
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f)
    os.replace(path + ".tmp", path)


def link_counters():
    with open("/proc/self/net/dev") as table:
        for line in table.readlines()[2:]:
            name, _, fields = line.partition(":")
            if name.strip() == "eth0":
                numbers = fields.split()
                return {"rx_bytes": int(numbers[0]), "tx_bytes": int(numbers[8])}
    return None


write(f"{spec.rank}.ready", {
    "pid": int(os.readlink("/proc/self")),
    "host": spec.peers[spec.rank].rsplit(":", 1)[0],
    "port": int(spec.peers[spec.rank].rsplit(":", 1)[1]),
    "workers_per_node": workers_per_node(spec.world_size),
    "link_before": link_counters(),
})
deadline = time.monotonic() + 120
while not os.path.exists(os.path.join(out_dir, "go")) and time.monotonic() < deadline:
    time.sleep(0.1)

exit_now = common.exit_now


def record_link_then_exit(*args, **kwargs):
    write(f"{spec.rank}.link", link_counters())
    exit_now(*args, **kwargs)


# train_cases.py makes its strategy with strategy_from_env and ends with
# common.exit_now: hand it this one, and record the link on the way out.
distadam.strategy_from_env = lambda **kwargs: strategy
common.exit_now = record_link_then_exit
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_cases.py"), run_name="__main__")
