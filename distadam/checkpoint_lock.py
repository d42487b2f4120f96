"""The writer lock: one job at a time writes a checkpoint directory.

Checkpoints of two jobs mixed in one directory would restore a model from
pieces of both; the lock makes the second job fail at its first save instead,
naming the job that holds the directory.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import secrets
import socket
import warnings
from pathlib import Path

from distadam import checkpoint_files as files
from distadam.checkpoint_errors import CheckpointError, describe
from distadam.checkpoint_files import FormatError

__all__ = ["LOCK_FILE", "WriterLock"]

LOCK_FILE = ".distadam-writer.lock"
_MAX_LOCK_RECORD = 4096


class WriterLock:
    """Exclusive right of one job to write a checkpoint directory.

    An ``flock`` on ``.distadam-writer.lock`` held by process 0 for the
    manager's lifetime (the kernel drops it when the process dies, so a
    restarted job takes over at once), plus a record in that file naming the
    job. The record is re-read before every save and every commit: on storage
    that accepts ``flock`` without enforcing it, or when someone deletes the
    lock file, a second writer is still caught there. Managers of one process
    on one directory share the lock (one job).
    """

    _held = {}  # (st_dev, st_ino) of the directory -> WriterLock

    @classmethod
    def acquire(cls, directory: Path) -> "WriterLock":
        info = os.stat(directory)
        key = (info.st_dev, info.st_ino)
        lock = cls._held.get(key)
        if lock is None:
            lock = cls(directory)
            cls._held[key] = lock
        lock.users += 1
        lock.key = key
        return lock

    def __init__(self, directory: Path):
        self.directory = directory
        self.users = 0
        self.job = secrets.token_hex(8)
        self.enforced = True
        path = directory / LOCK_FILE
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            raise CheckpointError(f"cannot open the writer lock {path}: {error.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._describe_holder()
                os.close(self._fd)
                raise CheckpointError(
                    f"{directory} is being written by another job ({holder}). Two jobs (or two "
                    "processes that both believe they are process 0) must not share a checkpoint "
                    "directory: give each job its own, or stop the other one."
                ) from None
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.enforced = False
                # stacklevel: ShardedCheckpointManager.save, which takes the lock.
                warnings.warn(
                    f"distadam: {directory} does not support file locks ({error.strerror}); a second "
                    "job writing there is detected only at its next save, through the writer record",
                    stacklevel=5,
                )
            else:
                os.close(self._fd)
                raise CheckpointError(f"cannot lock {path}: {error.strerror}") from None
        record = json.dumps({
            "job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, record, 0)
            os.fsync(self._fd)
        except OSError as error:
            # Closing drops the flock too: a later save starts from scratch
            # instead of finding its own half-written record "held by another job".
            os.close(self._fd)
            raise CheckpointError(f"cannot write the writer record {path}: {error.strerror}"
                                  + (" (no space left on the device)" if error.errno == errno.ENOSPC else "")
                                  + "; committed checkpoints are intact and later saves will retry") from None

    def _read_record(self) -> dict:
        data = files.read_regular_file(self.directory, LOCK_FILE, _MAX_LOCK_RECORD)
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not an object")
        return record

    def _describe_holder(self) -> str:
        try:
            record = self._read_record()
            return (f"job {record.get('job')!s:.32} on host {record.get('host')!s:.64}, "
                    f"pid {record.get('pid')!s:.16}, since {record.get('since')!s:.32}")
        except (FormatError, ValueError, OSError):
            return "its writer record is unreadable"

    def verify(self) -> None:
        """Raise CheckpointError unless the writer record still names this job."""
        try:
            record = self._read_record()
        except (FormatError, ValueError, OSError) as error:
            raise CheckpointError(
                f"the writer record {self.directory / LOCK_FILE} was removed or replaced "
                f"({describe(error)}): another job may be writing this directory"
            ) from None
        if record.get("job") != self.job:
            raise CheckpointError(
                f"another job took over {self.directory} ({self._describe_holder()}); this job "
                f"({self.job}) stops saving there rather than mixing checkpoints"
            )

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._held.pop(self.key, None)
            os.close(self._fd)  # releases the flock
