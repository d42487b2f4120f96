"""Disk-space policy of checkpoint saves: how much one checkpoint can take,
how much is free, making room by pruning early, and the message that says
both numbers when space is short.

A save that runs out of space halfway costs the time to write it and leaves
nothing; checking first (and deleting what the save would prune anyway) turns
most of those into a clear refusal before anything is written.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from distadam import checkpoint_directory

__all__ = ["checkpoint_bytes", "free_bytes", "make_room", "space_message"]

_BLOCK = 4096


def _blocks(size: int) -> int:
    """``size`` rounded up to whole filesystem blocks."""
    return -(-size // _BLOCK) * _BLOCK


def checkpoint_bytes(file_bounds, manifest_bound: int, num_shards: int, process_count: int) -> int:
    """Upper bound of the bytes one checkpoint takes on disk: every file's
    largest size (``file_bounds``) and the manifest's, rounded up to blocks,
    plus the per-process file lists."""
    listings = _blocks(256 * (num_shards + 1)) * process_count
    return sum(_blocks(size) for size in file_bounds) + _blocks(manifest_bound) + listings


def free_bytes(directory: Path) -> int:
    """Free bytes where ``directory`` is (0 if that cannot be told)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def space_message(directory: Path, step: int, needed: int, free: int, what: str, max_to_keep: int) -> str:
    return (f"saving step {step} to {directory}: {what}. A checkpoint of this model needs "
            f"up to {needed:,} bytes ({needed / 2**20:.1f} MiB); {free:,} bytes are free there. "
            f"Free space (or lower max_to_keep, now {max_to_keep}); committed checkpoints "
            "are intact and later saves will retry.")


def make_room(directory: Path, needed: int, max_to_keep: int) -> int:
    """Free bytes after deleting, if space is short, the oldest checkpoints
    a save would prune after committing anyway (never the newest, so a
    save that still fails leaves a checkpoint to resume from)."""
    free = free_bytes(directory)
    if free >= needed or max_to_keep < 2:
        return free
    found = checkpoint_directory.committed(directory)
    for stale in found[: max(0, len(found) - (max_to_keep - 1))]:
        # stacklevel: the caller of ShardedCheckpointManager.save, as before the split.
        warnings.warn(f"distadam: low on space for a checkpoint ({free:,} bytes free, up to "
                      f"{needed:,} needed): deleting {stale.name} before saving rather than after",
                      stacklevel=4)
        shutil.rmtree(stale, ignore_errors=True)
        free = free_bytes(directory)
        if free >= needed:
            break
    return free
