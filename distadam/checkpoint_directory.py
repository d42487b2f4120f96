"""Housekeeping of a checkpoint directory, done by process 0: listing the
committed checkpoints, committing a finished save (replacing a committed copy
of the same step safely), recovering from a save that crashed while doing so,
removing leftovers of crashed saves, and pruning old checkpoints.

Nothing here fails a save by itself: a file that cannot be removed is warned
about (the next save tries again).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from distadam import checkpoint_files as files

__all__ = ["commit", "committed", "locate", "prune", "recover_superseded", "remove", "remove_stale_partials"]

# The warnings below keep pointing at the frames they did when this code was
# part of ShardedCheckpointManager (their stacklevels count from here).


def committed(directory: Path) -> list:
    """Committed-looking checkpoint directories, oldest first (names exactly
    ``ckpt-<12-digit step>``, or a superseded copy standing in for one)."""
    if not directory.is_dir():
        return []
    return [Path(path) for _, path in files.list_checkpoints(directory)]


def locate(directory: Path, step: int) -> Path:
    """Where the committed checkpoint of ``step`` is (its superseded name
    while an interrupted replacement is not yet recovered)."""
    final = directory / files.checkpoint_name(step)
    aside = directory / files.superseded_name(step)
    return aside if not os.path.lexists(final) and os.path.lexists(aside) else final


def commit(directory: Path, partial: Path, final: Path, step: int) -> None:
    """Rename the finished save into place. A committed copy of the same
    step (the SIGTERM save right after a periodic one, or a re-save after a
    restart) is moved aside first and removed only once the new one is
    committed: a failure or a kill in between leaves the old copy, which
    listing and restore find under its superseded name."""
    aside = directory / files.superseded_name(step)
    if os.path.lexists(final):
        if final.is_symlink() or not final.is_dir():
            remove(final)  # a symlink planted under the name is unlinked, not followed
        else:
            remove(aside)  # a leftover of an older replacement: final is newer
            os.replace(final, aside)
    try:
        os.replace(partial, final)
        files.fsync_directory(directory)
    except BaseException:
        if os.path.lexists(aside) and not os.path.lexists(final):
            os.replace(aside, final)
        raise
    remove(aside)


def recover_superseded(directory: Path) -> None:
    """Put back a committed checkpoint that a crashed save had moved
    aside (its replacement never committed), or drop the copy if the
    replacement did commit."""
    for name in files.list_superseded(directory):
        step = files.committed_step_of(name)
        final = directory / files.checkpoint_name(step) if step is not None else None
        if final is not None and not os.path.lexists(final) and (directory / name).is_dir() \
                and not (directory / name).is_symlink():
            os.replace(directory / name, final)
        else:
            remove(directory / name)


def remove_stale_partials(directory: Path, job: str, lock_enforced: bool) -> None:
    """Leftovers of crashed saves. With an enforced lock no other job is
    writing, so every partial directory is stale; otherwise only this
    job's own are removed."""
    for name in files.list_partials(directory):
        if lock_enforced or name.endswith(f"-{job}"):
            remove(directory / name)


def remove(path: Path) -> None:
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        warnings.warn(f"distadam: could not remove {path}: {error.strerror}", stacklevel=4)


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` committed checkpoints."""
    for stale in committed(directory)[:-keep]:
        try:
            shutil.rmtree(stale)
        except OSError as error:  # never fatal: the next save prunes again
            warnings.warn(f"distadam: could not delete old checkpoint {stale}: {error.strerror}",
                          stacklevel=4)
