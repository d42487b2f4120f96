"""How the processes of a job agree on a save or a restore.

Checkpoint decisions are taken by process 0 (lock, room to save, commit, the
step to restore) or by every process for itself (its files written, its
pieces readable), and every process must act on the same outcome, or some
would wait forever in the next collective. The only channel every backend
offers is the optimizer's eager all-reduce of a float vector, so each message
below is a frozen dataclass that ``encode()``\\ s to such a vector and
``decode()``\\ s from the sum. Integers ride as 16-bit digits (exact in float64
even summed over many workers); statuses are enums, with an unknown value read
as the failure the receiver would have assumed anyway.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

__all__ = [
    "CommitStatus", "CommitVote", "LockAnnouncement", "LockStatus", "Outcome", "ProcessChannel",
    "ProcessOutcomes", "RestoreOffer", "RestoreStatus", "SaveStart", "StartStatus",
]

_DIGITS = 4  # 16-bit digits per integer: 64 bits (steps, free bytes, job tokens, digests)


def _to_digits(value: int, count: int = _DIGITS) -> list:
    """``value`` as ``count`` 16-bit digits, least significant first."""
    if not 0 <= value < 1 << (16 * count):
        raise ValueError(f"{value} does not fit in {16 * count} bits")
    return [(value >> (16 * i)) & 0xFFFF for i in range(count)]


def _from_digits(digits) -> int:
    return sum(int(round(float(d))) << (16 * i) for i, d in enumerate(digits))


def _status(kind, value, otherwise):
    """``value`` as a member of the enum ``kind``, or ``otherwise``."""
    value = float(value)
    if math.isfinite(value) and int(round(value)) in kind._value2member_map_:
        return kind(int(round(value)))
    return otherwise


class LockStatus(enum.IntEnum):
    LOCKED = 1
    FAILED = 2


class StartStatus(enum.IntEnum):
    STARTED = 1
    NOT_OWNER = 2  # the writer record names another job
    NO_SPACE = 3
    FAILED = 4  # anything else (process 0's error says what)


class CommitStatus(enum.IntEnum):
    FAILED = 0
    COMMITTED = 1


class RestoreStatus(enum.IntEnum):
    NO_CHECKPOINT = 0  # the directory holds none: a fresh start
    CHOSEN = 1
    NONE_USABLE = 2


class Outcome(enum.IntEnum):
    """One process's result of a phase every process runs."""

    OK = 0
    FAILED = 1
    NO_SPACE = 2


@dataclasses.dataclass(frozen=True)
class LockAnnouncement:
    """Process 0 took the writer lock (or not) and names the job (a 64-bit
    hex token, which also names the job's partial directories)."""

    status: LockStatus
    job: str | None = None

    def encode(self) -> list:
        return [int(self.status), *_to_digits(int(self.job, 16) if self.job else 0)]

    @classmethod
    def decode(cls, values) -> "LockAnnouncement":
        return cls(_status(LockStatus, values[0], LockStatus.FAILED), f"{_from_digits(values[1:]):016x}")


@dataclasses.dataclass(frozen=True)
class SaveStart:
    """Process 0 may (or may not) start a save; the free bytes it saw, so a
    refusal for space reads the same on every process."""

    status: StartStatus
    free: int = 0

    def encode(self) -> list:
        return [int(self.status), *_to_digits(min(self.free, (1 << 64) - 1))]

    @classmethod
    def decode(cls, values) -> "SaveStart":
        return cls(_status(StartStatus, values[0], StartStatus.FAILED), _from_digits(values[1:]))


@dataclasses.dataclass(frozen=True)
class CommitVote:
    """Process 0 committed the save (or not)."""

    status: CommitStatus

    def encode(self) -> list:
        return [int(self.status)]

    @classmethod
    def decode(cls, values) -> "CommitVote":
        return cls(_status(CommitStatus, values[0], CommitStatus.FAILED))


@dataclasses.dataclass(frozen=True)
class RestoreOffer:
    """The checkpoint process 0 can use itself: its step and the first 16
    hex digits of its manifest digest, which the others' copy must match."""

    status: RestoreStatus
    step: int = 0
    digest: str = "0" * 16

    @classmethod
    def of(cls, prepared, had_candidates: bool) -> "RestoreOffer":
        """The offer for ``prepared`` (anything with .step and .digest), or
        None left: NONE_USABLE, or NO_CHECKPOINT if there never was one."""
        if prepared is not None:
            return cls(RestoreStatus.CHOSEN, prepared.step, prepared.digest[:16])
        return cls(RestoreStatus.NONE_USABLE if had_candidates else RestoreStatus.NO_CHECKPOINT)

    def encode(self) -> list:
        return [int(self.status), *_to_digits(self.step), *_to_digits(int(self.digest, 16))]

    @classmethod
    def decode(cls, values) -> "RestoreOffer":
        return cls(_status(RestoreStatus, values[0], RestoreStatus.NONE_USABLE),
                   _from_digits(values[1:1 + _DIGITS]), f"{_from_digits(values[1 + _DIGITS:1 + 2 * _DIGITS]):016x}")


@dataclasses.dataclass(frozen=True)
class ProcessOutcomes:
    """Every process's :class:`Outcome` of one phase, by process index; each
    process fills in its own slot, the sum carries them all."""

    outcomes: tuple

    @classmethod
    def own(cls, outcome: Outcome, process: int, count: int) -> "ProcessOutcomes":
        return cls(tuple(outcome if p == process else Outcome.OK for p in range(count)))

    def encode(self) -> list:
        return [int(outcome) for outcome in self.outcomes]

    @classmethod
    def decode(cls, values) -> "ProcessOutcomes":
        return cls(tuple(_status(Outcome, v, Outcome.FAILED) for v in values))

    @property
    def failed(self) -> list:
        """Processes whose phase failed, for any reason."""
        return [p for p, outcome in enumerate(self.outcomes) if outcome is not Outcome.OK]

    @property
    def out_of_space(self) -> list:
        return [p for p, outcome in enumerate(self.outcomes) if outcome is Outcome.NO_SPACE]


class ProcessChannel:
    """Process-level messages over the optimizer's collectives, which work
    per worker: each process's workers all contribute the same values."""

    def __init__(self, topology):
        # Agreements span every worker of the job, whatever the sharding.
        self._collectives = topology.everyone
        self.per_process = topology.workers_per_process
        self.process_index = topology.process_index
        self.process_count = topology.num_processes

    def from_process_0(self, message):
        """Process 0's ``message`` (of the same type) on every process, in one all-reduce."""
        values = np.asarray(message.encode(), np.float64)
        return type(message).decode(self._sum(values if self.process_index == 0 else np.zeros_like(values)))

    def outcomes(self, outcome: Outcome) -> ProcessOutcomes:
        """Every process's outcome, given this one's."""
        own = ProcessOutcomes.own(outcome, self.process_index, self.process_count)
        return ProcessOutcomes.decode(self._sum(own.encode()))

    def _sum(self, values) -> np.ndarray:
        """Sum over processes (the workers' sum divided by workers per process)."""
        values = np.asarray(values, np.float64)
        if self._collectives.num_workers == 1:
            return values
        # One length for every call, so the backend traces its eager
        # all-reduce once rather than once per message shape.
        padded = np.zeros([max(16, self.process_count, values.size)])
        padded[: values.size] = values
        total = np.asarray(self._collectives.all_reduce_eagerly(padded), np.float64)[: values.size]
        return np.round(total / self.per_process)
