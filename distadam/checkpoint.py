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

This module orchestrates; each concern is a module of its own:
:mod:`~distadam.checkpoint_lock` (the writer lock),
:mod:`~distadam.checkpoint_protocol` (the messages processes agree with),
:mod:`~distadam.checkpoint_manifest` (building and checking manifests),
:mod:`~distadam.checkpoint_contents` (each file's arrays and size bound),
:mod:`~distadam.checkpoint_restore` (reading this process's pieces, assigning them),
:mod:`~distadam.checkpoint_space` (disk-space policy),
:mod:`~distadam.checkpoint_directory` (commit, recovery, pruning),
:mod:`~distadam.checkpoint_files` (the format read as hostile input), and the
N → M range arithmetic on the layout (:mod:`distadam.partition`).
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

from distadam import checkpoint_directory as directory_ops
from distadam import checkpoint_files as files
from distadam import checkpoint_space as space
from distadam import watchdog
from distadam.checkpoint_contents import CheckpointContents
from distadam.checkpoint_errors import CheckpointError
from distadam.checkpoint_errors import describe as _describe
from distadam.checkpoint_files import FORMAT_VERSION
from distadam.checkpoint_lock import LOCK_FILE, WriterLock
from distadam.checkpoint_manifest import build_manifest, manifest_bound, read_manifest
from distadam.checkpoint_protocol import (
    CommitStatus, CommitVote, LockAnnouncement, LockStatus, Outcome, ProcessChannel, RestoreOffer,
    RestoreStatus, SaveStart, StartStatus,
)
from distadam.checkpoint_restore import Prepared, assign, prepare

__all__ = ["CheckpointError", "ShardedCheckpointManager", "FORMAT_VERSION", "LOCK_FILE"]


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
        topology = optimizer.topology
        self._channel = ProcessChannel(topology)
        self._per_process = topology.workers_per_process
        self.process_index = topology.process_index
        self.process_count = topology.num_processes
        # The shard each local worker holds (its position in its group under
        # hybrid sharding), and the shards this process writes: one copy of
        # each, from the workers of the first group (worker s holds shard s).
        self._local_shards = topology.local_shards()
        self._written_shards = [w for w in topology.local_workers() if w < topology.group_size]
        self._contents = CheckpointContents(model, optimizer)
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
        status, problem = LockStatus.LOCKED, None
        if self.process_index == 0:
            try:
                self._lock = WriterLock.acquire(self.directory)
                self.job = self._lock.job
            except Exception as error:  # noqa: BLE001 - the others wait below and must learn it too
                status, problem = LockStatus.FAILED, _describe(error)
        agreed = self._channel.from_process_0(LockAnnouncement(status, self.job))
        if agreed.status is not LockStatus.LOCKED:
            self.job = None  # the next save tries again
            raise CheckpointError(problem or (
                f"process 0 could not lock {self.directory} (see process 0's log)"))
        self.job = agreed.job

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
        return directory_ops.committed(self.directory)

    @property
    def latest_checkpoint(self):
        found = self.checkpoints()
        return found[-1] if found else None

    def bytes_needed(self) -> int:
        """Upper bound of the bytes one checkpoint of this model takes on
        disk: every file's largest size rounded up to 4 KiB blocks, plus the
        manifest and the per-process file lists."""
        num_shards = self.optimizer.num_shards
        return space.checkpoint_bytes(self._contents.file_bounds(num_shards).values(),
                                      manifest_bound(self._contents, num_shards, self.job),
                                      num_shards, self.process_count)

    # ------------------------------------------------------------------- save
    def save(self) -> Path:
        """Write a checkpoint of the current step; returns its directory.

        On failure every process raises CheckpointError, nothing of the failed
        save is left behind, and committed checkpoints are untouched (except
        those this save would have pruned anyway, when space is short). A
        :class:`~distadam.watchdog.StallWatchdog` of this process does not
        count the save as a stall (it allows its ``long_operation_timeout``)."""
        with watchdog.long_operation(f"checkpoint save to {self.directory}"):
            return self._save()

    def _save(self) -> Path:
        if self.read_only:
            raise CheckpointError("this manager is read-only (read_only=True)")
        if self.job is None:
            self._take_writer_lock()
        step = int(self.optimizer.iterations_variable.numpy())
        final = self.directory / files.checkpoint_name(step)
        partial = self.directory / files.partial_name(step, self.job)
        needed = self.bytes_needed()

        # 1. Process 0: still ours? clean up, make room, check space.
        status, problem, free = StartStatus.STARTED, None, 0
        if self.process_index == 0:
            try:
                self._lock.verify()
                directory_ops.remove_stale_partials(self.directory, self.job, self._lock.enforced)
                directory_ops.recover_superseded(self.directory)
                free = space.make_room(self.directory, needed, self.max_to_keep)
                if free < needed:
                    status = StartStatus.NO_SPACE
                    problem = self._space_message(step, needed, free, "refused before writing anything")
                else:
                    partial.mkdir()
            except CheckpointError as error:
                status, problem = StartStatus.NOT_OWNER, str(error)
            except OSError as error:
                status = StartStatus.FAILED
                problem = f"could not start saving step {step} in {self.directory}: {_describe(error)}"
        started = self._channel.from_process_0(SaveStart(status, free))
        if started.status is not StartStatus.STARTED:
            raise CheckpointError(problem or {
                StartStatus.NOT_OWNER:
                    f"process 0 stopped saving step {step}: this job no longer owns {self.directory}",
                StartStatus.NO_SPACE:
                    self._space_message(step, needed, started.free, "refused before writing anything"),
            }.get(started.status, f"process 0 could not start saving step {step} (see its log)"))

        # 2. Every process writes and fsyncs its files.
        failure = None
        try:
            # Each process creates the directory too: on NFS a directory made
            # by another client may not be visible here yet.
            partial.mkdir(exist_ok=True)
            written = {}  # name -> (size, sha256)
            for shard in self._written_shards:
                name, written_file = self._contents.write_shard(partial, shard, step)
                written[name] = written_file
            if self.process_index == 0:
                name, written_file = self._contents.write_weights(partial)
                written[name] = written_file
            self._contents.write_listing(partial, self.process_index, written)
        except Exception as error:  # noqa: BLE001 - every failure must reach the other processes
            failure = error
        outcome = Outcome.OK
        if failure is not None:
            outcome = Outcome.NO_SPACE if getattr(failure, "errno", None) == errno.ENOSPC else Outcome.FAILED
        outcomes = self._channel.outcomes(outcome)
        if outcomes.failed:
            self._abandon(partial)
            raise self._write_failure(step, needed, outcomes, failure) from failure

        # 3. Process 0 commits.
        committed, problem = CommitStatus.COMMITTED, None
        if self.process_index == 0:
            try:
                listing = self._contents.merge_listings(partial, self.process_count, self._per_process)
                manifest = build_manifest(self._contents, step, self.job, listing)
                files.write_bytes(partial / files.MANIFEST, files.seal_manifest(manifest))
                files.fsync_directory(partial)
                self._lock.verify()
                directory_ops.commit(self.directory, partial, final, step)
            except Exception as error:  # noqa: BLE001
                committed, problem = CommitStatus.FAILED, _describe(error)
                self._abandon(partial)
                if getattr(error, "errno", None) == errno.ENOSPC:
                    problem = self._space_message(step, needed, space.free_bytes(self.directory), problem)
        if self._channel.from_process_0(CommitVote(committed)).status is not CommitStatus.COMMITTED:
            raise CheckpointError(f"process 0 could not commit step {step}: "
                                  + (problem or "see its log"))
        if self.process_index == 0:
            directory_ops.prune(self.directory, self.max_to_keep)
        return final

    def _abandon(self, partial: Path) -> None:
        if self.process_index == 0:
            directory_ops.remove(partial)

    def _space_message(self, step, needed, free, what) -> str:
        return space.space_message(self.directory, step, needed, free, what, self.max_to_keep)

    def _write_failure(self, step, needed, outcomes, failure) -> CheckpointError:
        own = f"; here: {_describe(failure)}" if failure is not None else ""
        message = (f"saving step {step} failed on process(es) {outcomes.failed}{own}. The incomplete save was "
                   "removed; committed checkpoints are intact and later saves will retry.")
        if outcomes.out_of_space:
            message = self._space_message(step, needed, space.free_bytes(self.directory),
                                          f"out of space on process(es) {outcomes.out_of_space}" + own)
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
        none is usable, or if an explicitly given ``path`` is unusable. Not a
        stall for this process's watchdog (as :meth:`save`)."""
        with watchdog.long_operation(f"checkpoint restore from {self.directory}"):
            return self._restore(path)

    def _restore(self, path):
        explicit = Path(path) if path is not None else None
        problems = []  # why each checkpoint was skipped, for the error if none is usable
        for offer, chosen in self._offers(explicit, problems):
            problem = None
            if self.process_index != 0:
                chosen, problem = self._confirm(offer, explicit)
            outcomes = self._channel.outcomes(Outcome.OK if problem is None else Outcome.FAILED)
            if not outcomes.failed:
                assign(chosen, self.model, self.optimizer)
                return chosen.path
            name = self.directory / files.checkpoint_name(offer.step)
            if problem is not None:
                problems.append(self._skip(name, problem, explicit))
            others = [p for p in outcomes.failed if p != self.process_index]
            if others:
                problems.append(self._skip(name, f"process(es) {others} could not use it (see their logs)", explicit))
            if explicit is not None:
                raise CheckpointError(f"cannot restore {explicit}: " + "; ".join(problems))
        return None  # no checkpoint at all: a fresh start

    def _offers(self, explicit, problems):
        """The checkpoints process 0 offers, round after round: each time the
        next (older) candidate it can use itself. Every process receives the
        same offers. Ends when there is no checkpoint at all; raises
        CheckpointError when there are some but none is left to offer."""
        candidates = self._candidates(explicit) if self.process_index == 0 else []
        remaining = iter(candidates)
        while True:
            chosen = None
            for candidate in remaining:  # process 0 only; the others have none
                try:
                    chosen = self._prepare(candidate)
                    break
                except Exception as error:  # noqa: BLE001 - any failure: skip this checkpoint
                    # Recorded, never raised here: the others wait in the
                    # collective below and must learn the outcome too.
                    problems.append(self._skip(candidate, _describe(error), explicit, stacklevel=6))
            offer = self._channel.from_process_0(RestoreOffer.of(chosen, had_candidates=bool(candidates)))
            if offer.status is RestoreStatus.NO_CHECKPOINT:
                return
            if offer.status is not RestoreStatus.CHOSEN:
                raise CheckpointError(self._nothing_usable(problems, explicit))
            yield offer, chosen

    def _candidates(self, explicit) -> list:
        """What process 0 tries, in order: ``explicit``, or every checkpoint, newest first."""
        if explicit is not None:
            return [explicit]
        return list(reversed(self.checkpoints())) if self.directory.is_dir() else []

    def _confirm(self, offer: RestoreOffer, explicit):
        """(prepared, None) if this process can use the checkpoint process 0
        offers, the very one process 0 read; (None, why) otherwise."""
        target = explicit if explicit is not None else directory_ops.locate(self.directory, offer.step)
        try:
            chosen = self._prepare(target, expected_step=offer.step)
            if chosen.digest[:16] != offer.digest:
                raise CheckpointError(f"its manifest differs from the one process 0 read "
                                      f"(digest {chosen.digest[:16]} vs {offer.digest})")
            return chosen, None
        except Exception as error:  # noqa: BLE001
            return None, _describe(error)

    def _skip(self, candidate: Path, reason: str, explicit, stacklevel: int = 5) -> str:
        # stacklevel: the frame the warning pointed at before restore was split
        # into helpers (callers one frame deeper pass one more).
        if explicit is None:
            warnings.warn(f"distadam: skipping checkpoint {candidate}: {reason}", stacklevel=stacklevel)
        return f"{candidate.name}: {reason}"

    def _nothing_usable(self, problems, explicit) -> str:
        if explicit is not None:
            return f"cannot restore {explicit}: " + ("; ".join(problems) or "see process 0's log")
        if self.process_index != 0 and not problems:
            return f"no usable checkpoint in {self.directory} (see process 0's log for why)"
        return f"no usable checkpoint in {self.directory}:\n  " + "\n  ".join(problems)

    def _prepare(self, path: Path, expected_step=None) -> Prepared:
        return prepare(path, self._contents, self._local_shards, self.job, expected_step)

    def verify(self, path) -> dict:
        """Check, on this process alone, that a checkpoint is complete, intact
        and fits this model, reading every file (not only this process's);
        returns its manifest or raises CheckpointError naming the problem."""
        path = Path(path)
        manifest = read_manifest(path, self._contents, self.job)
        for old in range(manifest["sharded"]["num_shards"]):
            self._contents.read_old_shard(path, manifest, old)
        self._contents.read_weights(path, manifest)
        return manifest
