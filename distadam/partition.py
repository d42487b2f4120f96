"""Partition bookkeeping: how trainable variables map onto flat, sharded buckets.

Variables of one dtype are laid end to end in flat buckets, **last variable
first**: backpropagation produces the last layers' gradients first, so the
first bucket's reduce-scatter can run while earlier layers' gradients are
still being computed. A bucket holds at most ``bucket_elements`` elements (a
larger variable gets a bucket of its own; variables are never split).

A *sharded* bucket is padded to ``num_shards * shard_size`` and cut into
``num_shards`` contiguous, equally sized shards; shard ``r`` belongs to worker
``r``. Only the last shard(s) hold padding, so uneven sizes (e.g. 3 workers)
cost at most ``num_shards - 1`` padded elements per bucket. A *replicated*
bucket (variables whose state every worker keeps in full, e.g. an embedding
table whose sparse gradients are cheaper to exchange than its parameters) is
one shard that every worker holds.

Everything here is plain Python and static: the layout is decided once, at
build time, and is identical on every worker because it depends only on the
variables' shapes, dtypes and order and the constructor's arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Segment:
    """One trainable variable's place inside a bucket."""

    variable_index: int  # position in the optimizer's trainable-variable list
    name: str
    shape: tuple
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A flat run of same-dtype variables, split into equal contiguous shards
    (or, if ``replicated``, one shard held by every worker)."""

    dtype: str
    segments: tuple
    num_shards: int
    shard_size: int
    replicated: bool = False

    @property
    def num_elements(self) -> int:
        return self.segments[-1].end if self.segments else 0

    @property
    def padded_size(self) -> int:
        return self.num_shards * self.shard_size

    @property
    def padding(self) -> int:
        return self.padded_size - self.num_elements

    def shard_of_worker(self, worker: int) -> int:
        """The shard worker ``worker`` holds: its own, or the one shard of a
        replicated bucket."""
        return 0 if self.replicated else worker

    def shard_range(self, shard: int) -> tuple:
        """[start, stop) of real (non-padding) elements owned by ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range for {self.num_shards} shards")
        start = min(shard * self.shard_size, self.num_elements)
        stop = min((shard + 1) * self.shard_size, self.num_elements)
        return start, stop

    def owned_pieces(self, shard: int) -> list:
        """(segment, start, stop) element ranges of each variable inside ``shard``,
        with start/stop relative to the variable's own flattened values."""
        lo, hi = self.shard_range(shard)
        pieces = []
        for seg in self.segments:
            start, stop = max(lo, seg.offset), min(hi, seg.end)
            if start < stop:
                pieces.append((seg, start - seg.offset, stop - seg.offset))
        return pieces

    # Resharding: a checkpoint written by N workers restores on M. Shard files
    # hold element ranges of each bucket, so every question below is about
    # ranges, never about which worker wrote what.
    def written_range(self, worker: int) -> tuple:
        """Elements of this bucket that worker ``worker``'s shard file holds:
        its shard, or for a replicated bucket everything in worker 0's file and
        nothing in the others' (the manifest records a replicated bucket's
        shard_size as all its elements, so ``stored_range`` agrees)."""
        if self.replicated:
            n = self.num_elements
            return (0, n) if worker == 0 else (n, n)
        return self.shard_range(worker)

    def restored_range(self, shard: int) -> tuple:
        """Elements a worker holding ``shard`` restores (all of a replicated bucket)."""
        return (0, self.num_elements) if self.replicated else self.shard_range(shard)

    def stored_range(self, old_shard: int, old_shard_size: int) -> tuple:
        """Elements of this bucket that shard file ``old_shard`` of a
        checkpoint written with shards of ``old_shard_size`` holds."""
        n = self.num_elements
        return min(old_shard * old_shard_size, n), min((old_shard + 1) * old_shard_size, n)


@dataclasses.dataclass(frozen=True)
class Layout:
    """All buckets for one set of trainable variables and one worker count."""

    buckets: tuple
    num_shards: int

    @property
    def num_variables(self) -> int:
        return sum(len(b.segments) for b in self.buckets)

    def fingerprint(self) -> tuple:
        """Two 8-bit hashes of the layout (dtypes, shard sizes, variable
        shapes and order), each in 1..256. Small integers are exact in every
        float dtype a bucket can have, bfloat16 included, so the fingerprint
        can ride inside a gathered parameter bucket."""
        description = repr([
            (bucket.dtype, bucket.num_shards, bucket.shard_size, bucket.replicated,
             [seg.shape for seg in bucket.segments])
            for bucket in self.buckets
        ]).encode()
        digest = hashlib.sha256(description).digest()
        return digest[0] + 1, digest[1] + 1

    def variable_shapes(self) -> list:
        """Shape of every variable, by ``Segment.variable_index``."""
        shapes = [None] * self.num_variables
        for bucket in self.buckets:
            for seg in bucket.segments:
                shapes[seg.variable_index] = seg.shape
        return shapes

    def agreement_terms(self) -> list:
        """[h, h*h] for each fingerprint hash. Summed over N workers they equal
        N times this worker's terms on every worker exactly when all workers'
        hashes are equal (zero variance). At most 2**16 per term, so a float64
        sum is exact for any realistic N (up to 2**37 workers)."""
        return [t for h in self.fingerprint() for t in (h, h * h)]

    def agrees_with(self, summed_terms, num_workers: int) -> bool:
        """Whether ``summed_terms`` (``agreement_terms`` summed over all
        workers) shows every worker has this layout's fingerprint."""
        expected = [num_workers * t for t in self.agreement_terms()]
        return [float(t) for t in summed_terms] == [float(t) for t in expected]

    def stored_ranges(self, old_shard: int, old_shard_sizes) -> list:
        """``Bucket.stored_range`` of every bucket, given each bucket's shard
        size in the checkpoint (``old_shard_sizes``, in bucket order)."""
        return [bucket.stored_range(old_shard, size) for bucket, size in zip(self.buckets, old_shard_sizes)]

    def summary(self) -> list:
        """(dtype, [variable shapes], placement) per bucket: what workers must agree on."""
        return [(bucket.dtype, [seg.shape for seg in bucket.segments],
                 "replicated" if bucket.replicated else "sharded") for bucket in self.buckets]

    def describe(self) -> list:
        """Human-readable ownership table: one dict per (bucket, shard)."""
        rows = []
        for bucket_index, bucket in enumerate(self.buckets):
            for shard in range(bucket.num_shards):
                lo, hi = bucket.shard_range(shard)
                rows.append(
                    {
                        "bucket": bucket_index,
                        "dtype": bucket.dtype,
                        "placement": "replicated" if bucket.replicated else "sharded",
                        "shard": shard,
                        "workers": list(range(self.num_shards)) if bucket.replicated else [shard],
                        "elements": [lo, hi],
                        "padding": bucket.shard_size - (hi - lo),
                        "variables": [
                            {"name": seg.name, "range": [start, stop], "of": seg.size}
                            for seg, start, stop in bucket.owned_pieces(shard)
                        ],
                    }
                )
        return rows


def reshard_pieces(start: int, stop: int, old_shard_size: int) -> list:
    """(old shard, lo, hi) for every shard of size ``old_shard_size`` that
    overlaps the elements [start, stop): the pieces a restoring worker copies,
    ``[lo, hi)`` being bucket elements (never empty). Nothing for an empty range."""
    if stop <= start:
        return []
    pieces = []
    for old in range(start // old_shard_size, -(-stop // old_shard_size)):
        old_start = old * old_shard_size
        pieces.append((old, max(start, old_start), min(stop, old_start + old_shard_size)))
    return pieces


def _num_elements(shape) -> int:
    return int(math.prod(int(d) for d in shape))


#: Bytes per element of the float dtypes a layout meets (the planner's too).
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

#: Default cap on elements per bucket: 16 MiB of float32 (PyTorch DDP's
#: buckets are 25 MiB). Each bucket costs two collective launches per step,
#: each with a fixed latency (measured ~3.5 ms on 2 local CPU processes); a
#: step holds about two buckets' worth of temporary flat buffers, so small
#: buckets keep what ZeRO saves: measured (benchmarks/capacity.py) it fits
#: >= 1.70x Keras Adam's largest model at 4 workers, where one model-sized
#: "auto" bucket fit 0.89x.
DEFAULT_BUCKET_ELEMENTS = 1 << 22

#: ``bucket_elements="auto"``: buckets sized from the number of workers so
#: that communication stays within 5 % of one all-reduce of everything on
#: any network the planner knows (:func:`auto_bucket_elements`), for jobs
#: whose step is communication-bound and whose memory has room for the
#: larger flat buffers.
AUTO = "auto"

#: The smallest bucket "auto" makes: the default cap.
MIN_AUTO_BUCKET_ELEMENTS = DEFAULT_BUCKET_ELEMENTS


def auto_bucket_elements(num_workers: int, itemsize: int = 4) -> int:
    """Elements per bucket for ``bucket_elements="auto"`` (opt-in): enough bytes that
    the fixed latency of each bucket's collectives stays a small share of its
    transfer time (:func:`distadam.cost_model.auto_bucket_bytes`: N times the
    largest latency-bandwidth product of the presets, over the 5 % share),
    and never fewer than :data:`MIN_AUTO_BUCKET_ELEMENTS`. Grows with N: 20M
    float32 elements (80 MB) at 2 workers, 10G at 1024 (one bucket for most
    models there). The cost is temporary memory: a step holds a few buckets'
    worth of flat buffers (the gradients going out, the exchange's buffers,
    the gathered parameters); with one model-sized bucket that is more than
    the sharded state saves (benchmarks/capacity.py measured 0.89x Keras
    Adam's largest model at 4 workers, against >= 1.70x with the default)."""
    from distadam import cost_model  # pure Python; imported here to keep this module's imports light

    elements = math.ceil(cost_model.auto_bucket_bytes(num_workers) / itemsize)
    return max(MIN_AUTO_BUCKET_ELEMENTS, elements)


def resolve_bucket_elements(bucket_elements, num_workers: int, dtypes=()):
    """``bucket_elements`` as :func:`plan_layout` takes it: an integer cap,
    None (one bucket per dtype and placement) or "auto", sized for
    ``num_workers`` and the smallest element among ``dtypes`` (names; others
    count as 4 bytes)."""
    if bucket_elements != AUTO or isinstance(bucket_elements, bool):
        return bucket_elements
    sizes = [DTYPE_BYTES.get(_dtype_name(dtype), 4) for dtype in dtypes]
    return auto_bucket_elements(num_workers, min(sizes, default=4))


def plan_layout(
    variables: Sequence,
    num_shards: int,
    bucket_elements: int | None | str = DEFAULT_BUCKET_ELEMENTS,
    shard_alignment: int = 1,
    replicated: Sequence[int] = (),
    separate: Sequence[int] = (),
    min_shard_elements: int = 0,
    num_workers: int | None = None,
) -> Layout:
    """Lay out ``variables`` (anything with .shape, .dtype, .name) in buckets.

    Args:
        variables: trainable variables in the optimizer's (forward) order; they
            are laid out last to first, the order their gradients appear.
        num_shards: number of workers sharing the optimizer state.
        bucket_elements: cap on elements per bucket. ``None`` keeps one bucket
            per dtype and placement, the fewest collectives; ``"auto"`` sizes
            it for ``num_workers`` (:func:`auto_bucket_elements`). A variable
            larger than the cap gets a bucket of its own; variables are never
            split.
        shard_alignment: round the shard size up to a multiple of this (e.g. 128
            on accelerators that like aligned DMA); 1 means no extra padding.
        replicated: indices of variables whose state every worker keeps in
            full (replicated buckets); the others are sharded.
        separate: indices of variables that get a bucket of their own
            whatever their size: variables whose gradients arrive as rows
            (an embedding table's ``tf.IndexedSlices``), which a bucket of
            their own lets the optimizer exchange as rows.
        min_shard_elements: a bucket with fewer elements is replicated
            (with more than one shard); 0 shards every bucket not listed in
            ``replicated``.
        num_workers: all workers of the job, for ``"auto"`` (default:
            ``num_shards``; under hybrid sharding the collectives span more).
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    variables = list(variables)
    bucket_elements = resolve_bucket_elements(bucket_elements, num_workers or num_shards,
                                              [v.dtype for v in variables])
    if bucket_elements is not None and (
        isinstance(bucket_elements, bool) or not isinstance(bucket_elements, int) or bucket_elements < 1
    ):
        raise ValueError(
            f"bucket_elements must be a positive integer, None or \"auto\", got {bucket_elements!r}"
        )
    if isinstance(min_shard_elements, bool) or not isinstance(min_shard_elements, int) or min_shard_elements < 0:
        raise ValueError(f"min_shard_elements must be an integer >= 0, got {min_shard_elements!r}")
    if isinstance(shard_alignment, bool) or not isinstance(shard_alignment, int) or shard_alignment < 1:
        raise ValueError(
            f"shard_alignment must be a positive integer, got {shard_alignment!r}"
        )
    replicated, separate = set(replicated), set(separate)
    unknown = sorted(i for i in replicated | separate if not (isinstance(i, int) and 0 <= i < len(variables)))
    if unknown:
        raise ValueError(f"variable indices {unknown} out of range for {len(variables)} variables")

    groups = {}  # (dtype, replicated) -> list of runs of (index, variable)
    for index in reversed(range(len(variables))):
        variable = variables[index]
        key = (_dtype_name(variable.dtype), index in replicated)
        runs = groups.setdefault(key, [[]])
        if index in separate:
            runs.insert(-1, [(index, variable)])  # a run of its own; the open run stays open
            continue
        size = _num_elements(variable.shape)
        current = runs[-1]
        current_size = sum(_num_elements(v.shape) for _, v in current)
        if bucket_elements is not None and current and current_size + size > bucket_elements:
            runs.append([])
        runs[-1].append((index, variable))

    # Buckets in the order their first gradient appears (last variable first),
    # whatever their dtype and placement.
    ordered = sorted(
        ((key, run) for key, runs in groups.items() for run in runs if run),
        key=lambda item: -item[1][0][0],
    )
    buckets = []
    for (dtype, is_replicated), run in ordered:
        segments, offset = [], 0
        for index, variable in run:
            size = _num_elements(variable.shape)
            segments.append(
                Segment(
                    variable_index=index,
                    name=str(getattr(variable, "path", None) or variable.name),
                    shape=tuple(int(d) for d in variable.shape),
                    offset=offset,
                    size=size,
                )
            )
            offset += size
        if is_replicated or (num_shards > 1 and offset < min_shard_elements):
            buckets.append(Bucket(dtype, tuple(segments), 1, max(1, offset), replicated=True))
            continue
        shard_size = max(1, -(-offset // num_shards))
        shard_size = -(-shard_size // shard_alignment) * shard_alignment
        buckets.append(Bucket(dtype, tuple(segments), num_shards, shard_size))
    return Layout(tuple(buckets), num_shards)


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", dtype)
    return str(name)
