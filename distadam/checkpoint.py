"""Sharded checkpoints: every worker writes only its shards, commits are
atomic, anything wrong on storage is detected and skipped, every process
restores the same step, and N workers' state restores on M.

On-disk layout (a shared filesystem: a PersistentVolume on Kubernetes, a local
directory for the local launcher)::

    <directory>/.distadam-writer.lock      who writes here (held by process 0)
    <directory>/ckpt-000000000120/
        manifest.json                      written last, by process 0; self-checksummed
        model.npz                          replicated weights, process 0
        shard-00002-of-00004.npz           optimizer state of shard 2, by its owner
        ...

Saving: a checkpoint is assembled in ``.partial-ckpt-<step>-<job>``; after
every process has written and fsynced its files (agreed through the
optimizer's collectives), process 0 writes the manifest (each file's size and
SHA-256, the layout, the job identity, and a digest over the manifest itself)
and renames the directory into place. A crash at any point leaves either no
``ckpt-<step>`` or a complete one. A failed save (``ENOSPC``, ...) removes
what it wrote, raises on every process, and leaves the manager usable.

Restoring: process 0 picks the newest checkpoint it can fully use, every
other process checks the same step (its manifest must have the same digest)
and the files it needs, and the checkpoint is assigned only when every
process confirmed; otherwise all fall back together to the next older one
(:mod:`distadam.checkpoint_files` lists exactly what is checked).

Shard files hold only real elements (no padding) with their element ranges,
so restoring with a different worker count reads, for each new shard, the
overlapping pieces of the old shards.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import warnings
from pathlib import Path

import keras
import numpy as np

from distadam import checkpoint_files as files
from distadam.checkpoint_files import FORMAT_VERSION, FormatError

__all__ = ["CheckpointError", "ShardedCheckpointManager", "FORMAT_VERSION"]

LOCK_FILE = ".distadam-writer.lock"
_MAX_LOCK_RECORD = 4096


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written (corrupt, incomplete, for
    another model, another job writes the directory, no space, ...)."""


# ----------------------------------------------------------- small helpers
def _written_range(bucket, worker: int) -> tuple:
    """Elements of ``bucket`` worker ``worker``'s shard file holds: its shard,
    or for a replicated bucket everything in worker 0's file, nothing in the
    others' (the manifest's shard_size for it is all its elements, so the
    ranges follow from it as for any bucket)."""
    if bucket.replicated:
        n = bucket.num_elements
        return (0, n) if worker == 0 else (n, n)
    return bucket.shard_range(worker)


def _needed_range(bucket, shard: int) -> tuple:
    """Elements of ``bucket`` a worker holding ``shard`` restores."""
    return (0, bucket.num_elements) if bucket.replicated else bucket.shard_range(shard)


def _chunks(value: int, count: int = 4) -> list:
    """``value`` as ``count`` 16-bit digits: each is exact in float64 even
    when summed over many workers, so integers ride an all-reduce exactly."""
    if not 0 <= value < 1 << (16 * count):
        raise ValueError(f"{value} does not fit in {16 * count} bits")
    return [(value >> (16 * i)) & 0xFFFF for i in range(count)]


def _unchunk(digits) -> int:
    return sum(int(round(float(d))) << (16 * i) for i, d in enumerate(digits))


def _np_dtype(name) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16 and friends, a TensorFlow dependency

        return np.dtype(getattr(ml_dtypes, str(name)))


def _describe(error: BaseException) -> str:
    if isinstance(error, (FormatError, CheckpointError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


class _WriterLock:
    """Exclusive right of one job to write a checkpoint directory.

    An ``flock`` on ``.distadam-writer.lock`` held by process 0 for the
    manager's lifetime (the kernel drops it when the process dies, so a
    restarted job takes over at once), plus a record in that file naming the
    job. The record is re-read before every save and every commit: on storage
    that accepts ``flock`` without enforcing it, or when someone deletes the
    lock file, a second writer is still caught there. Managers of one process
    on one directory share the lock (one job).
    """

    _held = {}  # (st_dev, st_ino) of the directory -> _WriterLock

    @classmethod
    def acquire(cls, directory: Path) -> "_WriterLock":
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
                warnings.warn(
                    f"distadam: {directory} does not support file locks ({error.strerror}); a second "
                    "job writing there is detected only at its next save, through the writer record",
                    stacklevel=4,
                )
            else:
                os.close(self._fd)
                raise CheckpointError(f"cannot lock {path}: {error.strerror}") from None
        record = json.dumps({
            "job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, record, 0)
        os.fsync(self._fd)

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
                f"({_describe(error)}): another job may be writing this directory"
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


class _Prepared:
    """Everything one process needs from a checkpoint, read and checked,
    nothing assigned yet."""

    def __init__(self, path, manifest, weights, shards):
        self.path = path
        self.manifest = manifest
        self.weights = weights
        self.shards = shards  # (kind, bucket, shard) -> values

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


class ShardedCheckpointManager:
    """Save and restore a model trained with ShardedAdam, shard by shard.

    Every process of the job must create the manager and call :meth:`save`
    and :meth:`restore` at the same point (they synchronise through the
    optimizer's own collectives).

    Args:
        directory: shared by all processes, written by this job only.
        model: the Keras model (weights are replicated; process 0 writes them).
        optimizer: a built :class:`distadam.ShardedAdam`.
        max_to_keep: committed checkpoints kept; older ones are deleted.
        read_only: only restore; :meth:`save` raises. (Restoring never
            locks; the first :meth:`save` takes the directory's writer lock.)
    """

    def __init__(self, directory, model, optimizer, max_to_keep: int = 3, read_only: bool = False):
        if type(max_to_keep) is not int or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be a positive integer, got {max_to_keep!r}")
        if not getattr(optimizer, "built", False) or not hasattr(optimizer, "sharded_state"):
            raise ValueError(
                "ShardedCheckpointManager needs a built distadam.ShardedAdam: call "
                "optimizer.build(model.trainable_variables) (under the strategy scope) first."
            )
        self.directory = Path(directory)
        self.model = model
        self.optimizer = optimizer
        self.max_to_keep = max_to_keep
        self.read_only = bool(read_only)
        collectives = optimizer.collectives
        self._collectives = collectives
        local_workers = collectives.local_worker_indices()
        self._per_process = len(local_workers)
        self.process_index = min(local_workers) // self._per_process
        # The shard each local worker holds (its position in its group under
        # hybrid sharding), and the shards this process writes: one copy of
        # each, from the workers of the first group (worker s holds shard s).
        self._local_shards = optimizer.shard_collectives.local_worker_indices()
        self._written_shards = [w for w in local_workers if w < optimizer.num_shards]
        self.process_count = collectives.num_workers // self._per_process
        self._lock = None
        self.job = None
        if not self.read_only:
            self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ ownership
    def _take_writer_lock(self) -> None:
        """At the first save, process 0 locks the directory and tells everyone
        the job identity (which names this job's partial directories); every
        process fails with the same clear error if another job holds it.
        Restoring takes no lock: several jobs may read one directory (e.g.
        resharding experiments, an evaluator), only one may write it."""
        status, problem = 1, None
        if self.process_index == 0:
            try:
                self._lock = _WriterLock.acquire(self.directory)
                self.job = self._lock.job
            except CheckpointError as error:
                status, problem = 2, str(error)
        token = int(self.job, 16) if self.job else 0
        agreed = self._from_process_0([status, *_chunks(token)])
        if agreed[0] != 1:
            raise CheckpointError(problem or (
                f"process 0 could not lock {self.directory}: another job writes there (see process 0's log)"))
        self.job = f"{_unchunk(agreed[1:]):016x}"

    def close(self) -> None:
        """Release the writer lock (also released when the process exits)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- listing
    def checkpoints(self) -> list:
        """Committed-looking checkpoint directories, oldest first (names
        exactly ``ckpt-<12-digit step>``; anything else is not ours)."""
        if not self.directory.is_dir():
            return []
        return [Path(path) for _, path in files.list_checkpoints(self.directory)]

    @property
    def latest_checkpoint(self):
        found = self.checkpoints()
        return found[-1] if found else None

    def bytes_needed(self) -> int:
        """Upper bound of the bytes one checkpoint of this model takes on
        disk: every file's largest size rounded up to 4 KiB blocks, plus the
        manifest and the per-process file lists."""
        def blocks(size):
            return -(-size // 4096) * 4096

        num_shards = self.optimizer.num_shards
        segments = sum(len(b.segments) for b in self.optimizer.layout.buckets)
        listings = blocks(256 * (num_shards + 1)) * self.process_count
        manifest = blocks(4096 + 256 * (num_shards + 1 + segments + len(self.model.weights)))
        return sum(blocks(size) for size in self._file_bounds(num_shards).values()) + manifest + listings

    # ------------------------------------------------------------------- save
    def save(self) -> Path:
        """Write a checkpoint of the current step; returns its directory.

        On failure every process raises CheckpointError, nothing of the failed
        save is left behind, and committed checkpoints are untouched (except
        those this save would have pruned anyway, when space is short)."""
        if self.read_only:
            raise CheckpointError("this manager is read-only (read_only=True)")
        if self.job is None:
            self._take_writer_lock()
        optimizer = self.optimizer
        step = int(optimizer.iterations_variable.numpy())
        final = self.directory / files.checkpoint_name(step)
        partial = self.directory / files.partial_name(step, self.job)
        needed = self.bytes_needed()

        # 1. Process 0: still ours? clean up, make room, check space.
        start, problem, free = 1, None, 0
        if self.process_index == 0:
            try:
                self._lock.verify()
                self._remove_stale_partials()
                free = self._make_room(needed)
                if free < needed:
                    start = 3
                    problem = self._space_message(step, needed, free, "refused before writing anything")
                else:
                    partial.mkdir()
            except CheckpointError as error:
                start, problem = 2, str(error)
            except OSError as error:
                start, problem = 4, f"could not start saving step {step} in {self.directory}: {_describe(error)}"
        started = self._from_process_0([start, *_chunks(min(free, (1 << 64) - 1))])
        if started[0] != 1:
            code, free = int(started[0]), _unchunk(started[1:])
            raise CheckpointError(problem or {
                2: f"process 0 stopped saving step {step}: this job no longer owns {self.directory}",
                3: self._space_message(step, needed, free, "refused before writing anything"),
            }.get(code, f"process 0 could not start saving step {step} (see its log)"))

        # 2. Every process writes and fsyncs its files.
        failure = None
        try:
            # Each process creates the directory too: on NFS a directory made
            # by another client may not be visible here yet.
            partial.mkdir(exist_ok=True)
            written = {}
            for shard in self._written_shards:
                name = files.shard_file(shard, optimizer.num_shards)
                written[name] = files.write_npz(partial / name, self._shard_arrays(shard, step))
            if self.process_index == 0:
                weights = {f"w{i}": w for i, w in enumerate(self.model.get_weights())}
                written[files.MODEL_FILE] = files.write_npz(partial / files.MODEL_FILE, weights)
            listing = {name: {"size": size, "sha256": sha} for name, (size, sha) in written.items()}
            files.write_bytes(partial / f"files-{self.process_index:05d}.json", json.dumps(listing).encode())
        except Exception as error:  # noqa: BLE001 - every failure must reach the other processes
            failure = error
        codes = np.zeros([self.process_count])
        if failure is not None:
            codes[self.process_index] = 2 if getattr(failure, "errno", None) == errno.ENOSPC else 1
        codes = self._sum(codes)
        if codes.any():
            self._abandon(partial)
            raise self._write_failure(step, needed, codes, failure) from failure

        # 3. Process 0 commits.
        committed, problem = 1, None
        if self.process_index == 0:
            try:
                manifest = self._manifest(step, self._merge_listings(partial))
                files.write_bytes(partial / files.MANIFEST, files.seal_manifest(manifest))
                files.fsync_directory(partial)
                self._lock.verify()
                if os.path.lexists(final):  # same step saved again (e.g. after a restart)
                    self._remove(final)  # a symlink planted under the name is unlinked, not followed
                os.replace(partial, final)
                files.fsync_directory(self.directory)
            except Exception as error:  # noqa: BLE001
                committed, problem = 0, _describe(error)
                self._abandon(partial)
                if getattr(error, "errno", None) == errno.ENOSPC:
                    problem = self._space_message(step, needed, self._free(), problem)
        if self._from_process_0([committed])[0] != 1:
            raise CheckpointError(f"process 0 could not commit step {step}: "
                                  + (problem or "see its log"))
        if self.process_index == 0:
            self._prune(self.max_to_keep)
        return final

    def _shard_arrays(self, shard: int, step: int) -> dict:
        optimizer = self.optimizer
        state = optimizer.sharded_state
        arrays = {}
        for b, bucket in enumerate(optimizer.layout.buckets):
            start, stop = _written_range(bucket, shard)
            arrays[f"range/{b}"] = np.asarray([start, stop], np.int64)
            for kind in state.kinds:
                values = state.read_shard(kind, b, bucket.shard_of_worker(shard))
                arrays[f"{kind}/{b}"] = values[: stop - start]
        arrays["iterations"] = np.asarray(step, np.int64)
        return arrays

    def _merge_listings(self, partial: Path) -> dict:
        """Every process's file listing, each checked to name exactly the
        files that process owns."""
        merged = {}
        for process in range(self.process_count):
            name = f"files-{process:05d}.json"
            try:
                listing = json.loads(files.read_regular_file(partial, name, 1 << 24).decode())
            except (FormatError, ValueError) as error:
                raise CheckpointError(f"process {process}'s file list {name}: {_describe(error)}") from None
            owned = range(process * self._per_process, min((process + 1) * self._per_process, self.optimizer.num_shards))
            expected = {files.shard_file(s, self.optimizer.num_shards) for s in owned}
            if process == 0:
                expected.add(files.MODEL_FILE)
            if not isinstance(listing, dict) or set(listing) != expected:
                raise CheckpointError(f"process {process}'s file list {name} does not name its files")
            for entry_name, entry in listing.items():
                files.require_file_entry(entry, entry_name)
            merged.update(listing)
            os.unlink(partial / name)
        return merged

    def _manifest(self, step: int, file_table: dict) -> dict:
        optimizer = self.optimizer
        learning_rate = optimizer.learning_rate
        lr_value = None
        if isinstance(learning_rate, keras.Variable):
            lr_value = float(learning_rate.numpy())
            lr_value = lr_value if np.isfinite(lr_value) else None
        return {
            "format": FORMAT_VERSION,
            "step": step,
            "job": self.job,
            "skipped_steps": int(optimizer.skipped_steps),
            "learning_rate_value": lr_value,
            "state_kinds": sorted(optimizer.sharded_state.kinds),
            "model": {"weights": [{"shape": list(shape), "dtype": str(dtype)} for shape, dtype in self._weight_specs()]},
            # The placement of the optimizer state this file set holds; another
            # placement (e.g. replicated state) would be a sibling section.
            "sharded": {
                "num_shards": optimizer.num_shards,
                "buckets": [
                    {
                        "dtype": bucket.dtype,
                        "num_elements": bucket.num_elements,
                        "shard_size": bucket.shard_size,
                        # A replicated bucket is written once, whole, in shard 0's
                        # file (its shard_size is all its elements); other files
                        # hold an empty range of it. Restore reads element ranges,
                        # so placements and worker counts may change in between.
                        "placement": "replicated" if bucket.replicated else "sharded",
                        "segments": [{"name": s.name, "shape": list(s.shape)} for s in bucket.segments],
                    }
                    for bucket in optimizer.layout.buckets
                ],
            },
            "files": file_table,
        }

    # ---------------------------------------------------- save: disk space
    def _free(self) -> int:
        try:
            return shutil.disk_usage(self.directory).free
        except OSError:
            return 0

    def _space_message(self, step, needed, free, what) -> str:
        return (f"saving step {step} to {self.directory}: {what}. A checkpoint of this model needs "
                f"up to {needed:,} bytes ({needed / 2**20:.1f} MiB); {free:,} bytes are free there. "
                f"Free space (or lower max_to_keep, now {self.max_to_keep}); committed checkpoints "
                "are intact and later saves will retry.")

    def _make_room(self, needed: int) -> int:
        """Free bytes after deleting, if space is short, the oldest checkpoints
        this save would prune after committing anyway (never the newest, so
        a save that still fails leaves a checkpoint to resume from)."""
        free = self._free()
        if free >= needed or self.max_to_keep < 2:
            return free
        committed = self.checkpoints()
        for stale in committed[: max(0, len(committed) - (self.max_to_keep - 1))]:
            warnings.warn(f"distadam: low on space for a checkpoint ({free:,} bytes free, up to "
                          f"{needed:,} needed): deleting {stale.name} before saving rather than after",
                          stacklevel=3)
            shutil.rmtree(stale, ignore_errors=True)
            free = self._free()
            if free >= needed:
                break
        return free

    def _remove_stale_partials(self) -> None:
        """Leftovers of crashed saves. With an enforced lock no other job is
        writing, so every partial directory is stale; otherwise only this
        job's own are removed."""
        for name in files.list_partials(self.directory):
            if self._lock.enforced or name.endswith(f"-{self.job}"):
                self._remove(self.directory / name)

    def _abandon(self, partial: Path) -> None:
        if self.process_index == 0:
            self._remove(partial)

    def _remove(self, path: Path) -> None:
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            warnings.warn(f"distadam: could not remove {path}: {error.strerror}", stacklevel=3)

    def _prune(self, keep: int) -> None:
        for stale in self.checkpoints()[:-keep]:
            try:
                shutil.rmtree(stale)
            except OSError as error:  # never fatal: the next save prunes again
                warnings.warn(f"distadam: could not delete old checkpoint {stale}: {error.strerror}",
                              stacklevel=3)

    def _write_failure(self, step, needed, codes, failure) -> CheckpointError:
        failed = [p for p, code in enumerate(codes) if code]
        own = f"; here: {_describe(failure)}" if failure is not None else ""
        message = (f"saving step {step} failed on process(es) {failed}{own}. The incomplete save was "
                   "removed; committed checkpoints are intact and later saves will retry.")
        if (codes == 2).any():
            message = self._space_message(step, needed, self._free(),
                                          f"out of space on process(es) {[p for p, c in enumerate(codes) if c == 2]}"
                                          + own)
        return CheckpointError(message)

    # ---------------------------------------------------------------- restore
    def restore(self, path=None):
        """Restore ``path`` or, by default, the newest checkpoint every
        process can use.

        Process 0 picks the checkpoint; the others confirm the same step
        (same manifest digest) and the files they read; the model and the
        optimizer are assigned only after every process confirmed. A
        checkpoint that fails anywhere, for any reason, is skipped on every
        process with a warning that says why, and the next older one is
        tried. Returns the directory restored, or None when there is no
        checkpoint at all. Raises CheckpointError if checkpoints exist but
        none is usable, or if an explicitly given ``path`` is unusable."""
        explicit = Path(path) if path is not None else None
        if self.process_index == 0:
            if explicit is not None:
                candidates = [explicit]
            else:
                candidates = list(reversed(self.checkpoints())) if self.directory.is_dir() else []
        problems = []
        any_candidate = False
        tried = 0
        while True:
            # Round: process 0 names a step it can use itself (or none left).
            chosen = None
            if self.process_index == 0:
                while tried < len(candidates) and chosen is None:
                    candidate = candidates[tried]
                    tried += 1
                    any_candidate = True
                    try:
                        chosen = self._prepare(candidate)
                    except Exception as error:  # noqa: BLE001 - any failure: skip this checkpoint
                        # Recorded, never raised here: the others wait in the
                        # collective below and must learn the outcome too.
                        problems.append(self._skip(candidate, _describe(error), explicit))
            offer = [0] * 9  # status, 4 step digits, 4 digest digits
            if chosen is not None:
                offer = [1, *_chunks(chosen.step), *_chunks(int(chosen.digest[:16], 16))]
            elif any_candidate:
                offer[0] = 2
            agreed = self._from_process_0(offer)
            if agreed[0] != 1:
                if agreed[0] == 0:
                    return None
                raise CheckpointError(self._nothing_usable(problems, explicit))
            step, digest = _unchunk(agreed[1:5]), f"{_unchunk(agreed[5:9]):016x}"

            # Everyone else reads the same step and checks it is the same one.
            problem = None
            if self.process_index != 0:
                target = explicit if explicit is not None else self.directory / files.checkpoint_name(step)
                try:
                    chosen = self._prepare(target, expected_step=step)
                    if chosen.digest[:16] != digest:
                        raise CheckpointError(f"its manifest differs from the one process 0 read "
                                              f"(digest {chosen.digest[:16]} vs {digest})")
                except Exception as error:  # noqa: BLE001
                    chosen, problem = None, _describe(error)
            failed = np.zeros([self.process_count])
            failed[self.process_index] = problem is not None
            failed = self._sum(failed)
            if not failed.any():
                self._assign(chosen)
                return chosen.path
            name = files.checkpoint_name(step)
            if problem is not None:
                problems.append(self._skip(self.directory / name, problem, explicit))
            others = [p for p, flag in enumerate(failed) if flag and p != self.process_index]
            if others:
                problems.append(self._skip(self.directory / name,
                                           f"process(es) {others} could not use it (see their logs)", explicit))
            if explicit is not None:
                raise CheckpointError(f"cannot restore {explicit}: " + "; ".join(problems))
            chosen = None

    def _skip(self, candidate: Path, reason: str, explicit) -> str:
        if explicit is None:
            warnings.warn(f"distadam: skipping checkpoint {candidate}: {reason}", stacklevel=4)
        return f"{candidate.name}: {reason}"

    def _nothing_usable(self, problems, explicit) -> str:
        if explicit is not None:
            return f"cannot restore {explicit}: " + ("; ".join(problems) or "see process 0's log")
        if self.process_index != 0 and not problems:
            return f"no usable checkpoint in {self.directory} (see process 0's log for why)"
        return f"no usable checkpoint in {self.directory}:\n  " + "\n  ".join(problems)

    def verify(self, path) -> dict:
        """Check, on this process alone, that a checkpoint is complete, intact
        and fits this model, reading every file (not only this process's);
        returns its manifest or raises CheckpointError naming the problem."""
        path = Path(path)
        manifest = self._read_manifest(path)
        for old in range(manifest["sharded"]["num_shards"]):
            self._read_old_shard(path, manifest, old)
        self._read_weights(path, manifest)
        return manifest

    # --------------------------------------------------- restore: checking
    def _prepare(self, path: Path, expected_step=None) -> _Prepared:
        """Read and check everything this process needs from ``path``;
        assigns nothing. Raises on any problem."""
        manifest = self._read_manifest(path)
        if expected_step is not None and manifest["step"] != expected_step:
            raise CheckpointError(f"it holds step {manifest['step']}, process 0 chose step {expected_step}")
        weights = self._read_weights(path, manifest)
        buckets = self.optimizer.layout.buckets
        old_buckets = manifest["sharded"]["buckets"]
        needed = set()
        for b, bucket in enumerate(buckets):
            old_size = old_buckets[b]["shard_size"]
            for shard in self._local_shards:
                start, stop = _needed_range(bucket, shard)
                if stop > start:
                    needed.update(range(start // old_size, -(-stop // old_size)))
        old_files = {old: self._read_old_shard(path, manifest, old) for old in sorted(needed)}
        shards = {}
        for kind in self.optimizer.sharded_state.kinds:
            for b, bucket in enumerate(buckets):
                old_size = old_buckets[b]["shard_size"]
                for shard in {bucket.shard_of_worker(worker) for worker in self._local_shards}:
                    start, stop = _needed_range(bucket, shard)
                    values = np.zeros([stop - start], dtype=_np_dtype(bucket.dtype))
                    if stop > start:
                        # Copy the overlap of [start, stop) with every old shard.
                        for old in range(start // old_size, -(-stop // old_size)):
                            old_start = old * old_size
                            lo, hi = max(start, old_start), min(stop, old_start + old_size)
                            piece = old_files[old][f"{kind}/{b}"]
                            values[lo - start: hi - start] = piece[lo - old_start: hi - old_start]
                    shards[(kind, b, shard)] = values
        return _Prepared(path, manifest, weights, shards)

    def _read_manifest(self, path: Path) -> dict:
        """The manifest of ``path``, authenticated and checked field by field
        against this model, before any other file is opened."""
        name = path.name
        step_in_name = files.step_of(name)
        if step_in_name is None:
            raise CheckpointError(f"{name!r} is not a checkpoint directory name (ckpt-<12 digits>)")
        if not path.is_dir():
            raise CheckpointError("it is not a directory (not visible here, or not a checkpoint)")
        if not os.path.lexists(path / files.MANIFEST):
            raise CheckpointError(f"no {files.MANIFEST} (incomplete write)")
        data = files.read_regular_file(path, files.MANIFEST, files.MAX_MANIFEST_BYTES)
        manifest = files.open_manifest(data)
        req = files.require
        step = req(manifest.get("step"), int, "step", minimum=0)
        if step != step_in_name:
            raise CheckpointError(f"the directory is named for step {step_in_name} but its manifest says {step}")
        req(manifest.get("job"), str, "job")
        skipped = req(manifest.get("skipped_steps"), int, "skipped_steps", minimum=0)
        if skipped > step:
            raise CheckpointError(f"manifest says {skipped} skipped steps out of {step}")
        if manifest.get("learning_rate_value") is not None:
            req(manifest["learning_rate_value"], float, "learning_rate_value")
        kinds = manifest.get("state_kinds")
        if not isinstance(kinds, list) or sorted(map(str, kinds)) != sorted(self.optimizer.sharded_state.kinds):
            raise CheckpointError(
                f"it holds state {kinds!r:.200}, this optimizer needs "
                f"{sorted(self.optimizer.sharded_state.kinds)} (amsgrad/use_ema/accumulation differ)"
            )
        sharded = req(manifest.get("sharded"), dict, "sharded")
        num_shards = req(sharded.get("num_shards"), int, "sharded.num_shards", minimum=1)
        self._check_buckets(sharded.get("buckets"), num_shards)
        self._check_model_table(manifest.get("model"))
        table = req(manifest.get("files"), dict, "files")
        # The count first, so a huge num_shards never builds a huge name set.
        if len(table) != num_shards + 1:
            raise CheckpointError(f"manifest lists {len(table)} files for {num_shards} shards plus {files.MODEL_FILE}")
        expected = {files.shard_file(s, num_shards) for s in range(num_shards)} | {files.MODEL_FILE}
        if set(table) != expected:
            odd = sorted(set(table) - expected)[:3]
            raise CheckpointError(f"manifest names files that are not this checkpoint's: {odd!r:.300}")
        bounds = self._file_bounds(num_shards, sharded["buckets"])
        for file_name, entry in table.items():
            size, _ = files.require_file_entry(entry, file_name)
            if size > bounds[file_name]:
                raise CheckpointError(f"manifest says {file_name} has {size} bytes; this model's "
                                      f"{file_name} holds at most {bounds[file_name]}")
        return manifest

    def _check_model_table(self, table) -> None:
        if not isinstance(table, dict) or not isinstance(table.get("weights"), list):
            raise CheckpointError("manifest has no model weight table")
        theirs = [(tuple(w.get("shape", ())) if isinstance(w, dict) and isinstance(w.get("shape"), list) else None,
                   w.get("dtype") if isinstance(w, dict) else None) for w in table["weights"]]
        ours = [(tuple(shape), str(dtype)) for shape, dtype in self._weight_specs()]
        if theirs != ours:
            raise CheckpointError("it was written for a different model (weight shapes/dtypes/order differ)")

    def _check_buckets(self, theirs, num_shards: int) -> None:
        ours = self.optimizer.layout.buckets
        if not isinstance(theirs, list) or len(theirs) != len(ours):
            raise CheckpointError("it was written for different trainable variables (bucket count differs)")
        for b, (bucket, entry) in enumerate(zip(ours, theirs)):
            if not isinstance(entry, dict) or not isinstance(entry.get("segments"), list):
                raise CheckpointError(f"manifest bucket {b} is malformed")
            shapes = [s.get("shape") if isinstance(s, dict) else None for s in entry["segments"]]
            if (entry.get("dtype") != bucket.dtype or shapes != [list(s.shape) for s in bucket.segments]
                    or entry.get("num_elements") != bucket.num_elements):
                raise CheckpointError("it was written for different trainable variables (shapes/dtypes/order)")
            size = files.require(entry.get("shard_size"), int, f"buckets[{b}].shard_size", minimum=1)
            if size * num_shards < bucket.num_elements:
                raise CheckpointError(f"manifest bucket {b}: {num_shards} shards of {size} cannot hold "
                                      f"{bucket.num_elements} elements")

    def _weight_specs(self) -> list:
        return [(tuple(int(d) for d in v.shape), _np_dtype(v.dtype)) for v in self.model.weights]

    def _old_ranges(self, old: int, old_buckets) -> list:
        ranges = []
        for bucket, entry in zip(self.optimizer.layout.buckets, old_buckets):
            size, n = entry["shard_size"], bucket.num_elements
            ranges.append((min(old * size, n), min((old + 1) * size, n)))
        return ranges

    def _shard_contents(self, old: int, old_buckets) -> dict:
        """(dtype, shape) of every array shard file ``old`` must hold."""
        expected = {"iterations": (np.int64, ())}
        for b, (bucket, (lo, hi)) in enumerate(zip(self.optimizer.layout.buckets, self._old_ranges(old, old_buckets))):
            expected[f"range/{b}"] = (np.int64, (2,))
            for kind in self.optimizer.sharded_state.kinds:
                expected[f"{kind}/{b}"] = (_np_dtype(bucket.dtype), (hi - lo,))
        return expected

    def _file_bounds(self, num_shards: int, old_buckets=None) -> dict:
        """Largest size each file of a checkpoint with ``num_shards`` shards
        can have for this model. Only computed for a count the manifest's
        own file table (already size-capped) vouches for."""
        if old_buckets is None:
            old_buckets = [{"shard_size": b.shard_size} for b in self.optimizer.layout.buckets]
        bounds = {files.MODEL_FILE: files.file_size_bound(
            [(dtype, shape) for shape, dtype in self._weight_specs()])}
        for old in range(num_shards):
            bounds[files.shard_file(old, num_shards)] = files.file_size_bound(
                list(self._shard_contents(old, old_buckets).values()))
        return bounds

    def _read_checked(self, path: Path, manifest: dict, name: str, contents: dict) -> dict:
        size, sha = manifest["files"][name]["size"], manifest["files"][name]["sha256"]
        data = files.read_regular_file(path, name, size, expected_size=size)
        if files.sha256_hex(data) != sha:
            raise CheckpointError(f"checksum mismatch in {name} (file corrupted)")
        return files.read_npz(data, name, contents)

    def _read_old_shard(self, path: Path, manifest: dict, old: int) -> dict:
        sharded = manifest["sharded"]
        name = files.shard_file(old, sharded["num_shards"])
        arrays = self._read_checked(path, manifest, name, self._shard_contents(old, sharded["buckets"]))
        if int(arrays["iterations"]) != manifest["step"]:
            raise CheckpointError(f"{name} holds step {int(arrays['iterations'])}, the manifest says {manifest['step']}")
        for b, (lo, hi) in enumerate(self._old_ranges(old, sharded["buckets"])):
            if [int(x) for x in arrays[f"range/{b}"]] != [lo, hi]:
                raise CheckpointError(f"{name} holds elements {list(arrays[f'range/{b}'])} of bucket {b}, "
                                      f"expected [{lo}, {hi}]")
        return arrays

    def _read_weights(self, path: Path, manifest: dict) -> list:
        specs = self._weight_specs()
        arrays = self._read_checked(path, manifest, files.MODEL_FILE,
                                    {f"w{i}": (dtype, shape) for i, (shape, dtype) in enumerate(specs)})
        return [arrays[f"w{i}"] for i in range(len(specs))]

    def _assign(self, prepared: _Prepared) -> None:
        optimizer = self.optimizer
        manifest = prepared.manifest
        self.model.set_weights(prepared.weights)
        for (kind, b, shard), values in prepared.shards.items():
            optimizer.sharded_state.write_shard(kind, b, shard, values)
        optimizer.iterations_variable.assign(manifest["step"])
        optimizer.skipped_steps = manifest["skipped_steps"]
        if manifest.get("learning_rate_value") is not None and isinstance(optimizer.learning_rate, keras.Variable):
            optimizer.learning_rate.assign(manifest["learning_rate_value"])

    # ------------------------------------------------------------ collectives
    def _sum(self, values) -> np.ndarray:
        """Sum over processes (each process's workers contribute the same
        values, so the workers' sum is divided by workers per process)."""
        values = np.asarray(values, np.float64)
        if self._collectives.num_workers == 1:
            return values
        # One length for every call, so the backend traces its eager
        # all-reduce once rather than once per message shape.
        padded = np.zeros([max(16, self.process_count, values.size)])
        padded[: values.size] = values
        total = np.asarray(self._collectives.all_reduce_eagerly(padded), np.float64)[: values.size]
        return np.round(total / self._per_process)

    def _from_process_0(self, values) -> np.ndarray:
        """Process 0's ``values`` on every process (one all-reduce)."""
        values = np.asarray(values, np.float64)
        return self._sum(values if self.process_index == 0 else np.zeros_like(values))

