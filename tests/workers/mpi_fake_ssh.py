"""ssh for the MPIJob execution test, without sshd or the network.

Each worker "pod" runs ``mpi_fake_ssh.py serve SOCKET`` where the pod runs
sshd (DISTADAM_SSHD). mpirun in the launcher "pod" uses this file as its
rsh agent (``-mca plm_rsh_agent``): ORTE runs ``AGENT HOST COMMAND...`` to
start orted on a worker, as it would run ssh. The agent hands its stdin,
stdout and stderr and the command over the worker's Unix socket
(``FAKE_SSH_HOSTS``: JSON {host: socket path}); the worker's server runs
``sh -c COMMAND`` with them, as sshd's session would, so orted and the ranks
it forks are processes of the worker pod, descendants of its PID 1. The agent
exits with the command's exit code, as ssh does.

usage: mpi_fake_ssh.py serve SOCKET [sshd options, ignored]
       mpi_fake_ssh.py [ssh options] HOST COMMAND...
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading


def serve(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    while True:
        connection, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
        session = subprocess.Popen(["/bin/sh", "-c", json.loads(message)["command"]],
                                   stdin=fds[0], stdout=fds[1], stderr=fds[2])
        for fd in fds:
            os.close(fd)
        threading.Thread(target=finish, args=(session, connection), daemon=True).start()


def finish(session, connection):
    code = session.wait()
    with connection:
        connection.sendall(struct.pack("i", code if code >= 0 else 128 - code))


def connect(host, words):
    sockets = json.loads(os.environ["FAKE_SSH_HOSTS"])
    if host not in sockets:
        print(f"mpi_fake_ssh: could not resolve hostname {host}", file=sys.stderr)
        return 255
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(sockets[host])
        socket.send_fds(connection, [json.dumps({"command": " ".join(words)}).encode()], [0, 1, 2])
        reply = b""
        while len(reply) < 4:
            chunk = connection.recv(4 - len(reply))
            if not chunk:
                return 255  # the session's server died, as a dropped ssh connection
            reply += chunk
    return struct.unpack("i", reply)[0]


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        words = sys.argv[1:]
        while words[0].startswith("-"):  # ssh options (the operator's plm_rsh_args: -o ConnectionAttempts=10)
            words = words[2:] if words[0] in ("-o", "-p", "-i", "-l") else words[1:]
        sys.exit(connect(words[0], words[1:]))
