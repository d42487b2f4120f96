"""The one error checkpoint code raises, and how a failure is told to the user.

Its own module because every checkpoint module raises it and
:mod:`distadam.checkpoint` (which re-exports it) imports them all.
"""

from __future__ import annotations

from distadam.checkpoint_files import FormatError

__all__ = ["CheckpointError", "describe"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written (corrupt, incomplete, for
    another model, another job writes the directory, no space, ...)."""


# The public home of the class stays distadam.checkpoint (tracebacks and
# reprs name it where users import it from).
CheckpointError.__module__ = "distadam.checkpoint"


def describe(error: BaseException) -> str:
    """``error`` for a message: our own errors already say what is wrong;
    anything else is prefixed with its type (``OSError: ...``)."""
    if isinstance(error, (FormatError, CheckpointError)):
        return str(error)
    return f"{type(error).__name__}: {error}"
