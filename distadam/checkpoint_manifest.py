"""A checkpoint's manifest: written by process 0 last, read first.

The manifest names every file with its size and SHA-256, the layout and the
model the checkpoint was written for, and carries a digest over itself. It is
read as hostile input: size-capped to what this model's manifest can be,
authenticated, then checked field by field against this model before any
other file of the checkpoint is opened (the README lists every check).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np

from distadam import checkpoint_files as files
from distadam.checkpoint_contents import CheckpointContents, np_dtype
from distadam.checkpoint_errors import CheckpointError
from distadam.checkpoint_files import FORMAT_VERSION

__all__ = ["MAX_STEP", "MANIFEST_KEYS", "build_manifest", "manifest_bound", "read_manifest"]

#: The step counter is an int64 variable.
MAX_STEP = (1 << 63) - 1
#: Every key a format-2 manifest has; anything else is refused, not ignored.
MANIFEST_KEYS = ("format", "step", "job", "skipped_steps", "learning_rate_value", "state_kinds",
                 "model", "sharded", "files", "digest")


def build_manifest(contents: CheckpointContents, step: int, job, file_table: dict) -> dict:
    """The manifest of step ``step`` written by ``job`` (unsealed)."""
    optimizer = contents.optimizer
    learning_rate = optimizer.learning_rate
    lr_value = None
    if isinstance(learning_rate, keras.Variable):
        lr_value = float(learning_rate.numpy())
        lr_value = lr_value if np.isfinite(lr_value) else None
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "job": job,
        "skipped_steps": int(optimizer.skipped_steps),
        "learning_rate_value": lr_value,
        "state_kinds": sorted(contents.kinds),
        "model": {"weights": [{"shape": list(shape), "dtype": str(dtype)} for shape, dtype in contents.weight_specs()]},
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
                for bucket in contents.layout.buckets
            ],
        },
        "files": file_table,
    }


def manifest_bound(contents: CheckpointContents, num_shards: int, job) -> int:
    """Most bytes this model's sealed manifest takes with ``num_shards``
    shard files: the manifest this code writes, with the largest step and
    no files, doubled (other shard sizes, learning rates and job names
    print longer or shorter), plus one file entry per shard and the model."""
    base = len(files.seal_manifest(build_manifest(contents, MAX_STEP, job, {})))
    return min(files.MAX_MANIFEST_BYTES, 2 * base + 4096 + 256 * (num_shards + 1))


def read_manifest(path: Path, contents: CheckpointContents, job) -> dict:
    """The manifest of ``path``, authenticated and checked field by field
    against this model, before any other file is opened. (``job``: this
    manager's, which its size bound is computed with.)"""
    name = path.name
    step_in_name = files.committed_step_of(name)
    if step_in_name is None:
        raise CheckpointError(f"{name!r} is not a checkpoint directory name (ckpt-<12 digits>)")
    if not path.is_dir():
        raise CheckpointError("it is not a directory (not visible here, or not a checkpoint)")
    if not os.path.lexists(path / files.MANIFEST):
        raise CheckpointError(f"no {files.MANIFEST} (incomplete write)")
    # No bigger than this model's manifest for as many shards as the
    # directory holds files, so a crafted manifest is never parsed at length.
    shard_files = files.count_shard_files(path, files.MAX_SHARDS + 1)
    data = files.read_regular_file(path, files.MANIFEST, manifest_bound(contents, shard_files, job))
    manifest = files.open_manifest(data)
    req = files.require
    files.require_keys(manifest, MANIFEST_KEYS, "(top level)")
    step = req(manifest.get("step"), int, "step", minimum=0, maximum=MAX_STEP)
    if step != step_in_name:
        raise CheckpointError(f"the directory is named for step {step_in_name} but its manifest says {step}")
    req(manifest.get("job"), str, "job")
    skipped = req(manifest.get("skipped_steps"), int, "skipped_steps", minimum=0)
    if skipped > step:
        raise CheckpointError(f"manifest says {skipped} skipped steps out of {step}")
    if manifest.get("learning_rate_value") is not None:
        # A value the first step would choke on (negative, or beyond what
        # the variable's dtype holds) makes a restarted job crash-loop:
        # refused here, so restore falls back to an older checkpoint.
        req(manifest["learning_rate_value"], float, "learning_rate_value",
            minimum=0.0, maximum=_largest_learning_rate(contents.optimizer))
    kinds = manifest.get("state_kinds")
    if not isinstance(kinds, list) or sorted(map(str, kinds)) != sorted(contents.kinds):
        raise CheckpointError(
            f"it holds state {kinds!r:.200}, this optimizer needs "
            f"{sorted(contents.kinds)} (amsgrad/use_ema/accumulation differ)"
        )
    sharded = files.require_keys(manifest.get("sharded"), ("num_shards", "buckets"), "sharded")
    num_shards = req(sharded.get("num_shards"), int, "sharded.num_shards", minimum=1, maximum=files.MAX_SHARDS)
    _check_buckets(contents.layout.buckets, sharded.get("buckets"), num_shards)
    _check_model_table(contents, manifest.get("model"))
    table = req(manifest.get("files"), dict, "files")
    # The count first, so a huge num_shards never builds a huge name set.
    if len(table) != num_shards + 1:
        raise CheckpointError(f"manifest lists {len(table)} files for {num_shards} shards plus {files.MODEL_FILE}")
    expected = {files.shard_file(s, num_shards) for s in range(num_shards)} | {files.MODEL_FILE}
    if set(table) != expected:
        odd = sorted(set(table) - expected)[:3]
        raise CheckpointError(f"manifest names files that are not this checkpoint's: {odd!r:.300}")
    bounds = contents.file_bounds(num_shards, sharded["buckets"])
    for file_name, entry in table.items():
        size, _ = files.require_file_entry(entry, file_name)
        if size > bounds[file_name]:
            raise CheckpointError(f"manifest says {file_name} has {size} bytes; this model's "
                                  f"{file_name} holds at most {bounds[file_name]}")
    return manifest


def _largest_learning_rate(optimizer) -> float:
    learning_rate = optimizer.learning_rate
    dtype = np_dtype(getattr(learning_rate, "dtype", "float32"))
    return float(np.finfo(dtype).max) if np.issubdtype(dtype, np.floating) else float(np.finfo(np.float32).max)


def _check_model_table(contents: CheckpointContents, table) -> None:
    if not isinstance(table, dict) or not isinstance(table.get("weights"), list):
        raise CheckpointError("manifest has no model weight table")
    files.require_keys(table, ("weights",), "model")
    for i, weight in enumerate(table["weights"]):
        files.require_keys(weight, ("shape", "dtype"), f"model.weights[{i}]")
    theirs = [(tuple(w.get("shape", ())) if isinstance(w, dict) and isinstance(w.get("shape"), list) else None,
               w.get("dtype") if isinstance(w, dict) else None) for w in table["weights"]]
    ours = [(tuple(shape), str(dtype)) for shape, dtype in contents.weight_specs()]
    if theirs != ours:
        raise CheckpointError("it was written for a different model (weight shapes/dtypes/order differ)")


def _check_buckets(ours, theirs, num_shards: int) -> None:
    if not isinstance(theirs, list) or len(theirs) != len(ours):
        raise CheckpointError("it was written for different trainable variables (bucket count differs)")
    for b, (bucket, entry) in enumerate(zip(ours, theirs)):
        if not isinstance(entry, dict) or not isinstance(entry.get("segments"), list):
            raise CheckpointError(f"manifest bucket {b} is malformed")
        files.require_keys(entry, ("dtype", "num_elements", "shard_size", "placement", "segments"), f"buckets[{b}]")
        for s, segment in enumerate(entry["segments"]):
            files.require_keys(segment, ("name", "shape"), f"buckets[{b}].segments[{s}]")
        shapes = [s.get("shape") if isinstance(s, dict) else None for s in entry["segments"]]
        if (entry.get("dtype") != bucket.dtype or shapes != [list(s.shape) for s in bucket.segments]
                or entry.get("num_elements") != bucket.num_elements):
            raise CheckpointError("it was written for different trainable variables (shapes/dtypes/order)")
        size = files.require(entry.get("shard_size"), int, f"buckets[{b}].shard_size", minimum=1)
        if size * num_shards < bucket.num_elements:
            raise CheckpointError(f"manifest bucket {b}: {num_shards} shards of {size} cannot hold "
                                  f"{bucket.num_elements} elements")
