"""Sharded checkpoints: every worker writes only its shards, commits are
atomic, corruption is detected, and N workers' state restores on M.

On-disk layout (a shared filesystem: a PersistentVolume on Kubernetes, a local
directory for the local launcher)::

    <directory>/ckpt-000000000120/
        manifest.json                      written last, by process 0
        model.npz                          replicated weights, process 0
        shard-00002-of-00004.npz           optimizer state of shard 2, by its owner
        ...

A checkpoint directory is first assembled as ``.partial-ckpt-<step>``; after
every process has written and fsynced its files (a barrier), process 0 writes
the manifest with every file's SHA-256 and renames the directory into place.
A crash at any point leaves either no ``ckpt-<step>`` or a complete one, and
restore skips (with a warning) any checkpoint whose files are missing or whose
checksums do not match, falling back to the previous one.

Shard files hold only real elements (no padding) with their element ranges,
so restoring with a different worker count reads, for each new shard, the
overlapping pieces of the old shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import keras
import numpy as np

FORMAT_VERSION = 1
_PREFIX = "ckpt-"
_PARTIAL = ".partial-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupt, incomplete or for another model)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class ShardedCheckpointManager:
    """Save and restore a model trained with ShardedAdam, shard by shard.

    Every process of the job must call :meth:`save` and :meth:`restore` at the
    same point (they synchronise through the optimizer's own collectives).

    Args:
        directory: shared by all processes.
        model: the Keras model (weights are replicated; process 0 writes them).
        optimizer: a built :class:`distadam.ShardedAdam`.
        max_to_keep: committed checkpoints kept; older ones are deleted.
    """

    def __init__(self, directory, model, optimizer, max_to_keep: int = 3):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
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
        collectives = optimizer.collectives
        self._collectives = collectives
        self._local_shards = collectives.local_worker_indices()
        per_process = len(self._local_shards)
        self.process_index = min(self._local_shards) // per_process
        self.process_count = collectives.num_workers // per_process
        self.directory.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- listing
    def checkpoints(self) -> list:
        """Committed checkpoint directories, oldest first."""
        found = [p for p in self.directory.glob(f"{_PREFIX}*") if p.is_dir()]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))

    @property
    def latest_checkpoint(self):
        found = self.checkpoints()
        return found[-1] if found else None

    # ------------------------------------------------------------------- save
    def save(self) -> Path:
        """Write a checkpoint of the current step; returns its directory."""
        optimizer = self.optimizer
        step = int(optimizer.iterations_variable.numpy())
        name = f"{_PREFIX}{step:012d}"
        final = self.directory / name
        partial = self.directory / f"{_PARTIAL}{name}"
        if self.process_index == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a crash during an earlier save
        self._barrier()
        partial.mkdir(parents=True, exist_ok=True)

        written = {}
        for shard in self._local_shards:
            path = partial / f"shard-{shard:05d}-of-{optimizer.num_shards:05d}.npz"
            arrays = self._shard_arrays(shard)
            _write_atomically(path, lambda handle: np.savez(handle, **arrays))
            written[path.name] = _sha256(path)
        if self.process_index == 0:
            weights = {f"w{i}": w for i, w in enumerate(self.model.get_weights())}
            path = partial / "model.npz"
            _write_atomically(path, lambda handle: np.savez(handle, **weights))
            written[path.name] = _sha256(path)
        listing = partial / f"files-{self.process_index:05d}.json"
        _write_atomically(listing, lambda handle: handle.write(json.dumps(written).encode()))

        self._barrier()  # every process has written and fsynced its files
        if self.process_index == 0:
            files = {}
            for process in range(self.process_count):
                files.update(json.loads((partial / f"files-{process:05d}.json").read_text()))
            manifest = self._manifest(step, files)
            _write_atomically(partial / "manifest.json",
                              lambda handle: handle.write(json.dumps(manifest, indent=1).encode()))
            _fsync_directory(partial)
            if final.exists():  # same step saved again (e.g. after a restart)
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_directory(self.directory)
            for stale in self.checkpoints()[: -self.max_to_keep]:
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()  # nobody races ahead of the commit
        return final

    def _shard_arrays(self, shard: int) -> dict:
        optimizer = self.optimizer
        state = optimizer.sharded_state
        arrays = {}
        for kind in state.kinds:
            for b in range(len(optimizer.layout.buckets)):
                arrays[f"{kind}/{b}"] = state.read_shard(kind, b, shard)
        arrays["iterations"] = np.asarray(optimizer.iterations_variable.numpy())
        return arrays

    def _manifest(self, step: int, files: dict) -> dict:
        optimizer = self.optimizer
        learning_rate = optimizer.learning_rate
        return {
            "format": FORMAT_VERSION,
            "step": step,
            "num_shards": optimizer.num_shards,
            "skipped_steps": optimizer.skipped_steps,
            "learning_rate_value": float(learning_rate.numpy()) if isinstance(learning_rate, keras.Variable) else None,
            "state_kinds": sorted(optimizer.sharded_state.kinds),
            "buckets": [
                {
                    "dtype": bucket.dtype,
                    "num_elements": bucket.num_elements,
                    "shard_size": bucket.shard_size,
                    "segments": [{"name": s.name, "shape": list(s.shape)} for s in bucket.segments],
                }
                for bucket in optimizer.layout.buckets
            ],
            "files": files,
        }

    # ---------------------------------------------------------------- restore
    def restore(self, path=None):
        """Restore ``path`` or, by default, the newest usable checkpoint.

        Unusable checkpoints (missing files, checksum mismatch, another model)
        are skipped with a warning that says why. Returns the directory
        restored, or None when there is no checkpoint at all. Raises
        CheckpointError if checkpoints exist but none is usable, or if an
        explicitly given ``path`` is unusable."""
        candidates = [Path(path)] if path is not None else list(reversed(self.checkpoints()))
        if not candidates:
            return None
        problems = []
        for candidate in candidates:
            try:
                manifest = self.verify(candidate)
            except CheckpointError as error:
                if path is not None:
                    raise
                warnings.warn(f"distadam: skipping checkpoint {candidate}: {error}", stacklevel=2)
                problems.append(f"{candidate.name}: {error}")
                continue
            self._load(candidate, manifest)
            self._barrier()
            return candidate
        raise CheckpointError("no usable checkpoint in " + str(self.directory) + ":\n  " + "\n  ".join(problems))

    def verify(self, path) -> dict:
        """Check a checkpoint is complete, intact and fits this model; returns
        its manifest or raises CheckpointError naming the problem."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise CheckpointError("no manifest.json (incomplete write)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"unreadable manifest.json ({error})") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        for name, expected in manifest["files"].items():
            file_path = path / name
            if not file_path.exists():
                raise CheckpointError(f"missing file {name}")
            if _sha256(file_path) != expected:
                raise CheckpointError(f"checksum mismatch in {name} (file corrupted)")
        expected_shards = {f"shard-{s:05d}-of-{manifest['num_shards']:05d}.npz" for s in range(manifest["num_shards"])}
        if not expected_shards <= set(manifest["files"]):
            raise CheckpointError("manifest does not list every shard")
        ours = self.optimizer.layout.buckets
        theirs = manifest["buckets"]
        if [(b.dtype, [list(s.shape) for s in b.segments]) for b in ours] != [
            (b["dtype"], [s["shape"] for s in b["segments"]]) for b in theirs
        ]:
            raise CheckpointError("it was written for different trainable variables (shapes/dtypes/order)")
        if set(manifest["state_kinds"]) != set(self.optimizer.sharded_state.kinds):
            raise CheckpointError(
                f"it holds state {manifest['state_kinds']}, this optimizer needs "
                f"{sorted(self.optimizer.sharded_state.kinds)} (amsgrad/use_ema/accumulation differ)"
            )
        return manifest

    def _load(self, path: Path, manifest: dict) -> None:
        optimizer = self.optimizer
        with np.load(path / "model.npz") as weights:
            self.model.set_weights([weights[f"w{i}"] for i in range(len(weights.files))])
        old_shards = manifest["num_shards"]
        old_files = {}

        def old_file(index):
            if index not in old_files:
                old_files[index] = np.load(path / f"shard-{index:05d}-of-{old_shards:05d}.npz")
            return old_files[index]

        state = optimizer.sharded_state
        try:
            for kind in state.kinds:
                for b, bucket in enumerate(optimizer.layout.buckets):
                    old_size = manifest["buckets"][b]["shard_size"]
                    for shard in self._local_shards:
                        start, stop = bucket.shard_range(shard)
                        values = np.zeros([stop - start], dtype=bucket.dtype)
                        # Copy the overlap of [start, stop) with every old shard.
                        for old in range(start // old_size, -(-stop // old_size) if stop > start else 0):
                            old_start = old * old_size
                            lo, hi = max(start, old_start), min(stop, old_start + old_size)
                            piece = old_file(old)[f"{kind}/{b}"]
                            values[lo - start: hi - start] = piece[lo - old_start: hi - old_start]
                        state.write_shard(kind, b, shard, values)
        finally:
            for handle in old_files.values():
                handle.close()
        optimizer.iterations_variable.assign(manifest["step"])
        optimizer.skipped_steps = manifest.get("skipped_steps", 0)
        if manifest.get("learning_rate_value") is not None and isinstance(optimizer.learning_rate, keras.Variable):
            optimizer.learning_rate.assign(manifest["learning_rate_value"])

    def _barrier(self) -> None:
        if self._collectives.num_workers > 1:
            self._collectives.all_reduce_eagerly(np.ones([1], np.float32))
