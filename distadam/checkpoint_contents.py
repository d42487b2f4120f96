"""What each file of a checkpoint of one model holds, and how big it can be.

``model.npz`` holds the model's weights (``w0``, ``w1``, ...);
``shard-<i>-of-<N>.npz`` holds, for every bucket ``b``, the element range
``range/b`` of the optimizer state it carries and each state kind's values
``<kind>/b`` (real elements only, no padding), plus ``iterations``. Each
process also lists the files it wrote, with their sizes and hashes
(``files-<process>.json``), for process 0's manifest.

Reading checks every file against its manifest entry (size, SHA-256) and
against this model (names, dtypes, shapes, ranges) before any value is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from distadam import checkpoint_files as files
from distadam.checkpoint_errors import CheckpointError, describe
from distadam.checkpoint_files import FormatError

__all__ = ["CheckpointContents", "np_dtype"]


def np_dtype(name) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16 and friends, a TensorFlow dependency

        return np.dtype(getattr(ml_dtypes, str(name)))


def _listing_name(process: int) -> str:
    return f"files-{process:05d}.json"


class CheckpointContents:
    """The files of this model's checkpoints (``model`` and a built
    :class:`distadam.ShardedAdam`), written and read."""

    def __init__(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer

    @property
    def layout(self):
        return self.optimizer.layout

    @property
    def kinds(self):
        return self.optimizer.sharded_state.kinds

    def weight_specs(self) -> list:
        """(shape, dtype) of every model weight, in ``model.weights`` order."""
        return [(tuple(int(d) for d in v.shape), np_dtype(v.dtype)) for v in self.model.weights]

    # --------------------------------------------------------------- shapes
    def shard_contents(self, old: int, old_buckets) -> dict:
        """(dtype, shape) of every array shard file ``old`` must hold, for a
        checkpoint whose manifest lists ``old_buckets``."""
        expected = {"iterations": (np.int64, ())}
        ranges = self.layout.stored_ranges(old, [entry["shard_size"] for entry in old_buckets])
        for b, (bucket, (lo, hi)) in enumerate(zip(self.layout.buckets, ranges)):
            expected[f"range/{b}"] = (np.int64, (2,))
            for kind in self.kinds:
                expected[f"{kind}/{b}"] = (np_dtype(bucket.dtype), (hi - lo,))
        return expected

    def file_bounds(self, num_shards: int, old_buckets=None) -> dict:
        """Largest size each file of a checkpoint with ``num_shards`` shards
        can have for this model (``old_buckets``: the manifest's, default this
        layout's). Only computed for a count the manifest's own file table
        (already size-capped) vouches for."""
        if old_buckets is None:
            old_buckets = [{"shard_size": b.shard_size} for b in self.layout.buckets]
        bounds = {files.MODEL_FILE: files.file_size_bound(
            [(dtype, shape) for shape, dtype in self.weight_specs()])}
        for old in range(num_shards):
            bounds[files.shard_file(old, num_shards)] = files.file_size_bound(
                list(self.shard_contents(old, old_buckets).values()))
        return bounds

    # -------------------------------------------------------------- writing
    def write_shard(self, partial: Path, shard: int, step: int) -> tuple:
        """Write shard ``shard``'s file into ``partial``; (name, (size, sha256))."""
        state = self.optimizer.sharded_state
        arrays = {}
        for b, bucket in enumerate(self.layout.buckets):
            start, stop = bucket.written_range(shard)
            arrays[f"range/{b}"] = np.asarray([start, stop], np.int64)
            for kind in state.kinds:
                values = state.read_shard(kind, b, bucket.shard_of_worker(shard))
                arrays[f"{kind}/{b}"] = values[: stop - start]
        arrays["iterations"] = np.asarray(step, np.int64)
        name = files.shard_file(shard, self.optimizer.num_shards)
        return name, files.write_npz(partial / name, arrays)

    def write_weights(self, partial: Path) -> tuple:
        weights = {f"w{i}": w for i, w in enumerate(self.model.get_weights())}
        return files.MODEL_FILE, files.write_npz(partial / files.MODEL_FILE, weights)

    def write_listing(self, partial: Path, process: int, written: dict) -> None:
        """The files ``process`` wrote ({name: (size, sha256)}), for process 0."""
        listing = {name: {"size": size, "sha256": sha} for name, (size, sha) in written.items()}
        files.write_bytes(partial / _listing_name(process), json.dumps(listing).encode())

    def merge_listings(self, partial: Path, process_count: int, per_process: int) -> dict:
        """Every process's file listing, each checked to name exactly the
        files that process owns (process p writes the shards of its workers,
        process 0 the model too); the listings are removed."""
        num_shards = self.optimizer.num_shards
        merged = {}
        for process in range(process_count):
            name = _listing_name(process)
            try:
                listing = json.loads(files.read_regular_file(partial, name, 1 << 24).decode())
            except (FormatError, ValueError) as error:
                raise CheckpointError(f"process {process}'s file list {name}: {describe(error)}") from None
            owned = range(process * per_process, min((process + 1) * per_process, num_shards))
            expected = {files.shard_file(s, num_shards) for s in owned}
            if process == 0:
                expected.add(files.MODEL_FILE)
            if not isinstance(listing, dict) or set(listing) != expected:
                raise CheckpointError(f"process {process}'s file list {name} does not name its files")
            for entry_name, entry in listing.items():
                files.require_file_entry(entry, entry_name)
            merged.update(listing)
            os.unlink(partial / name)
        return merged

    # -------------------------------------------------------------- reading
    def read_old_shard(self, path: Path, manifest: dict, old: int) -> dict:
        """Shard file ``old`` of the checkpoint at ``path``, checked."""
        sharded = manifest["sharded"]
        name = files.shard_file(old, sharded["num_shards"])
        arrays = self._read_checked(path, manifest, name, self.shard_contents(old, sharded["buckets"]))
        if int(arrays["iterations"]) != manifest["step"]:
            raise CheckpointError(f"{name} holds step {int(arrays['iterations'])}, the manifest says {manifest['step']}")
        ranges = self.layout.stored_ranges(old, [entry["shard_size"] for entry in sharded["buckets"]])
        for b, (lo, hi) in enumerate(ranges):
            if [int(x) for x in arrays[f"range/{b}"]] != [lo, hi]:
                raise CheckpointError(f"{name} holds elements {list(arrays[f'range/{b}'])} of bucket {b}, "
                                      f"expected [{lo}, {hi}]")
        return arrays

    def read_weights(self, path: Path, manifest: dict) -> list:
        specs = self.weight_specs()
        arrays = self._read_checked(path, manifest, files.MODEL_FILE,
                                    {f"w{i}": (dtype, shape) for i, (shape, dtype) in enumerate(specs)})
        return [arrays[f"w{i}"] for i in range(len(specs))]

    def _read_checked(self, path: Path, manifest: dict, name: str, contents: dict) -> dict:
        size, sha = manifest["files"][name]["size"], manifest["files"][name]["sha256"]
        data = files.read_regular_file(path, name, size, expected_size=size)
        if files.sha256_hex(data) != sha:
            raise CheckpointError(f"checksum mismatch in {name} (file corrupted)")
        return files.read_npz(data, name, contents)
