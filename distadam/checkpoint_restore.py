"""What one process restores from a checkpoint: read and check everything it
needs (the weights, and for each shard its workers hold the overlapping
pieces of the checkpoint's shards, however many workers wrote them), then,
only once every process could do the same, assign it.

Split in two so that nothing is assigned on any process unless every process
confirmed the checkpoint: a half-restored job would train from a mix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np

from distadam.checkpoint_contents import CheckpointContents, np_dtype
from distadam.checkpoint_errors import CheckpointError
from distadam.checkpoint_manifest import read_manifest
from distadam.partition import reshard_pieces

__all__ = ["Prepared", "assign", "prepare"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything one process needs from a checkpoint, read and checked,
    nothing assigned yet."""

    path: Path
    manifest: dict
    weights: list
    shards: dict  # (kind, bucket, shard) -> values

    @property
    def step(self) -> int:
        return self.manifest["step"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


def prepare(path: Path, contents: CheckpointContents, local_shards, job, expected_step=None) -> Prepared:
    """Read and check everything the workers holding ``local_shards`` need
    from ``path``; assigns nothing. Raises on any problem. (``job``: the
    manager's, for the manifest's size bound.)"""
    manifest = read_manifest(path, contents, job)
    if expected_step is not None and manifest["step"] != expected_step:
        raise CheckpointError(f"it holds step {manifest['step']}, process 0 chose step {expected_step}")
    weights = contents.read_weights(path, manifest)
    buckets = contents.layout.buckets
    old_sizes = [entry["shard_size"] for entry in manifest["sharded"]["buckets"]]
    needed = set()
    for bucket, old_size in zip(buckets, old_sizes):
        for shard in local_shards:
            needed.update(old for old, _, _ in reshard_pieces(*bucket.restored_range(shard), old_size))
    old_files = {old: contents.read_old_shard(path, manifest, old) for old in sorted(needed)}
    shards = {}
    for kind in contents.kinds:
        for b, (bucket, old_size) in enumerate(zip(buckets, old_sizes)):
            for shard in {bucket.shard_of_worker(worker) for worker in local_shards}:
                start, stop = bucket.restored_range(shard)
                values = np.zeros([stop - start], dtype=np_dtype(bucket.dtype))
                for old, lo, hi in reshard_pieces(start, stop, old_size):
                    old_start = old * old_size
                    values[lo - start: hi - start] = old_files[old][f"{kind}/{b}"][lo - old_start: hi - old_start]
                shards[(kind, b, shard)] = values
    return Prepared(path, manifest, weights, shards)


def assign(prepared: Prepared, model, optimizer) -> None:
    """Put ``prepared`` into the model and the optimizer."""
    manifest = prepared.manifest
    model.set_weights(prepared.weights)
    for (kind, b, shard), values in prepared.shards.items():
        optimizer.sharded_state.write_shard(kind, b, shard, values)
    optimizer.iterations_variable.assign(manifest["step"])
    optimizer.skipped_steps = manifest["skipped_steps"]
    if manifest.get("learning_rate_value") is not None and isinstance(optimizer.learning_rate, keras.Variable):
        optimizer.learning_rate.assign(manifest["learning_rate_value"])
