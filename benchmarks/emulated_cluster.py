"""What one link of ``distadam launch --nodes`` carries: TCP from node 0 to
node 1 of an emulated cluster (distadam.emulated_cluster), one stream, timed.

    python benchmarks/emulated_cluster.py --rate 200mbit --seconds 3
    python benchmarks/emulated_cluster.py --rate 200mbit --both-ways

Runs in a private network namespace of its own (as the launcher does; root,
or a user namespace), so the only traffic is between the namespaces it made.
Prints one JSON line: the configured rate and the measured Mbit/s (payload,
after the first half second: TCP's slow start is not the link's rate);
``--both-ways`` sends node 1 -> node 0 at the same time (full duplex: each
direction should still carry the rate). No TensorFlow.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distadam import emulated_cluster, launch  # noqa: E402

CHUNK = 256 * 1024
WARMUP = 0.5


def enter(namespace: int) -> None:
    """Move this thread into a node (network namespaces are per thread)."""
    if ctypes.CDLL(None, use_errno=True).setns(namespace, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def receiver(cluster, node, port_box, ready, results, key):
    enter(cluster.namespaces[node])
    with socket.socket() as server:
        server.bind((cluster.address(node), 0))
        server.listen(1)
        port_box.append(server.getsockname()[1])
        ready.set()
        conn, _ = server.accept()
        with conn:
            total, start, counted_from, counted = 0, time.monotonic(), None, 0
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                now = time.monotonic()
                total += len(data)
                if counted_from is None and now - start >= WARMUP:
                    counted_from, counted = now, 0
                elif counted_from is not None:
                    counted += len(data)
                    last = now
            results[key] = counted * 8 / (last - counted_from) / 1e6 if counted_from else float("nan")


def sender(cluster, node, address, port, seconds):
    enter(cluster.namespaces[node])
    payload = b"\0" * CHUNK
    with socket.create_connection((address, port), timeout=10) as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(payload)


def stream(cluster, source, target, seconds, results, key):
    ports, ready = [], threading.Event()
    recv = threading.Thread(target=receiver, args=(cluster, target, ports, ready, results, key))
    recv.start()
    ready.wait(10)
    send = threading.Thread(target=sender, args=(cluster, source, cluster.address(target), ports[0], seconds))
    send.start()
    return [recv, send]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=emulated_cluster.parse_rate, default=None,
                        help="link rate (e.g. 200mbit; default: unshaped)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--both-ways", action="store_true")
    args = parser.parse_args()
    launch.Sandbox(private_network=True)  # before any thread (a user namespace needs one thread)
    cluster = emulated_cluster.EmulatedCluster(2, args.rate)
    try:
        results = {}
        threads = stream(cluster, 0, 1, args.seconds, results, "node0->node1")
        if args.both_ways:
            threads += stream(cluster, 1, 0, args.seconds, results, "node1->node0")
        for thread in threads:
            thread.join(args.seconds + 30)
    finally:
        cluster.close()
    print(json.dumps({"configured_mbit": None if args.rate is None else args.rate / 1e6,
                      "seconds": args.seconds,
                      "measured_mbit": {k: round(v, 1) for k, v in sorted(results.items())}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
