"""An mpirun rank that listens the way TensorFlow's gRPC server does, on every
interface (``0.0.0.0``), then reports where, so a test can read the socket
table while it listens. No TensorFlow and no MPI calls: what is under test is
which network namespace the launch script puts the ranks in, not TensorFlow.

usage: mpi_listen_probe.py DIR    writes DIR/<rank>.ready ({"pid": the PID as
the machine's /proc names it, "port": the listening port}), then waits for
DIR/stop (at most 60 s).
"""

import json
import os
import socket
import sys
import time

directory = sys.argv[1]
rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("0.0.0.0", 0))  # what grpc_server_lib.cc does: every interface
server.listen()
ready = os.path.join(directory, f"{rank}.ready")
with open(ready + ".tmp", "w") as f:
    json.dump({"pid": int(os.readlink("/proc/self")), "port": server.getsockname()[1]}, f)
os.replace(ready + ".tmp", ready)
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(directory, "stop")) and time.monotonic() < deadline:
    time.sleep(0.05)
