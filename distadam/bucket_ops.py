"""TensorFlow operations on a :class:`distadam.partition.Bucket`.

The partition decides statically where every element lives; these functions
move values between the per-variable world (shapes) and the flat world
(a bucket, padded to ``num_shards * shard_size``, and one worker's shard of
it). They read variables but never write them and launch no collective.
"""

from __future__ import annotations

import math

import tensorflow as tf

from distadam.partition import Bucket


def flatten(bucket: Bucket, tensors_by_index: dict) -> tf.Tensor:
    """The bucket's variables' tensors end to end, padded: shape [padded_size].
    A variable missing from ``tensors_by_index`` contributes zeros."""
    pieces = []
    for seg in bucket.segments:
        tensor = tensors_by_index.get(seg.variable_index)
        if tensor is None:
            tensor = tf.zeros([seg.size], dtype=bucket.dtype)
        pieces.append(tf.reshape(tf.cast(tensor, bucket.dtype), [-1]))
    if bucket.padding:
        pieces.append(tf.zeros([bucket.padding], dtype=bucket.dtype))
    return tf.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]


def unflatten(bucket: Bucket, flat: tf.Tensor) -> list:
    """(variable_index, tensor shaped like the variable) for every segment of
    a flat bucket (padding ignored)."""
    pieces = tf.split(flat[: bucket.num_elements], [seg.size for seg in bucket.segments])
    return [(seg.variable_index, tf.reshape(piece, seg.shape)) for seg, piece in zip(bucket.segments, pieces)]


def own_shard(bucket: Bucket, variables, worker: tf.Tensor) -> tf.Tensor:
    """Worker ``worker``'s [shard_size] slice of the flattened ``variables``
    (indexed by ``Segment.variable_index``), padding as zeros."""
    static_worker = tf.get_static_value(worker)
    if static_worker is not None:
        # Known at trace time (Mirrored/MultiWorker replicas, Horovod ranks):
        # copy only the owned pieces, 1/N of the parameters.
        shard = int(static_worker)
        pieces = [
            tf.reshape(_value(variables[seg.variable_index]), [-1])[start:stop]
            for seg, start, stop in bucket.owned_pieces(shard)
        ]
        lo, hi = bucket.shard_range(shard)
        if bucket.shard_size > hi - lo:
            pieces.append(tf.zeros([bucket.shard_size - (hi - lo)], dtype=bucket.dtype))
        return tf.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]
    # Dynamic replica id (TPU): flatten everything and pick the row.
    flat = flatten(bucket, {seg.variable_index: _value(variables[seg.variable_index]) for seg in bucket.segments})
    return tf.gather(tf.reshape(flat, [bucket.num_shards, bucket.shard_size]), worker)


def segment_ids(bucket: Bucket, worker: tf.Tensor) -> tf.Tensor:
    """For each element of ``worker``'s shard, the position of the segment
    (variable) it belongs to, ``len(segments)`` for padding. Computed, not
    stored: a stored table would cost as much memory as a parameter copy."""
    index_dtype = tf.int64 if bucket.padded_size >= 2**31 else tf.int32
    start = tf.cast(worker, index_dtype) * bucket.shard_size
    positions = start + tf.range(bucket.shard_size, dtype=index_dtype)
    ends = tf.constant([seg.end for seg in bucket.segments], dtype=index_dtype)
    return tf.searchsorted(ends, positions, side="right", out_type=tf.int32)


def segment_mask(bucket: Bucket, ids: tf.Tensor, flags) -> tf.Tensor | None:
    """Boolean mask over a shard from one flag per segment (padding: False);
    None when every segment's flag is True (no masking needed)."""
    flags = [bool(flag) for flag in flags]
    if len(flags) != len(bucket.segments):
        raise ValueError(f"{len(flags)} flags for {len(bucket.segments)} segments")
    if all(flags):
        return None
    table = tf.constant(flags + [False], dtype=tf.bool)
    return tf.gather(table, ids)


def _value(variable):
    """A variable's current value (Keras or TF variable), or a tensor as is."""
    return tf.convert_to_tensor(variable)


# ----------------------------------------------------------- sparse gradients
def index_dtype_for(value_dtype) -> tf.DType:
    """Integer dtype whose bit pattern packs into columns of ``value_dtype``:
    sparse rows travel as one tensor, indices bitcast into extra columns."""
    value_dtype = tf.as_dtype(value_dtype)
    return tf.int64 if value_dtype.size == 8 else tf.int32


def row_width(segment) -> int:
    """Elements per row of a variable (its shape without the first axis)."""
    return int(math.prod(segment.shape[1:]))


def pack_rows(indices, values) -> tf.Tensor:
    """A sparse gradient's rows as one [M, width + k] tensor of the values'
    dtype: the row's values, then its index bitcast into k columns (k = 1 for
    32/64-bit values, 2 for 16-bit ones). One collective moves both."""
    # Widths from the static shapes, never inferred with -1: a worker can
    # have no rows at all (a global batch that does not fill every replica:
    # 24 over 11 gives three replicas none), and a -1 beside 0 rows infers
    # a wrong width, which another worker's gather then does not match.
    width = math.prod(values.shape[1:])
    rows = tf.reshape(values, [-1, width])
    index_columns = tf.bitcast(tf.cast(indices, index_dtype_for(values.dtype)), values.dtype)
    columns_per_index = math.prod(index_columns.shape[1:])  # 2 for 16-bit values, else 1
    index_columns = tf.reshape(index_columns, [-1, columns_per_index])
    return tf.concat([rows, index_columns], axis=1)


def unpack_rows(packed, width: int):
    """(indices, values [M, width]) from :func:`pack_rows`' output."""
    values = packed[:, :width]
    index_columns = packed[:, width:]
    index_dtype = index_dtype_for(packed.dtype)
    if index_columns.shape[1] == 1:
        index_columns = index_columns[:, 0]
    indices = tf.bitcast(index_columns, index_dtype)
    return indices, values


def shard_from_rows(bucket: Bucket, segment, indices, values, worker) -> tf.Tensor:
    """This worker's dense [shard_size] gradient shard from the rows of one
    variable's sparse gradient (duplicate rows add up, as densifying does).
    Elements outside the shard are dropped."""
    width = row_width(segment)
    index_dtype = tf.int64 if bucket.padded_size >= 2**31 else tf.int32
    lo = tf.cast(worker, index_dtype) * bucket.shard_size if not bucket.replicated else tf.constant(0, index_dtype)
    columns = tf.range(width, dtype=index_dtype)
    positions = segment.offset + tf.cast(indices, index_dtype)[:, None] * width + columns[None, :] - lo
    size = bucket.shard_size
    inside = (positions >= 0) & (positions < size)
    targets = tf.where(inside, positions, tf.cast(size, index_dtype))  # outside: a dump slot
    summed = tf.math.unsorted_segment_sum(tf.reshape(values, [-1]), tf.reshape(targets, [-1]), size + 1)
    return summed[:size]


def segments_finite(bucket: Bucket, flat: tf.Tensor) -> tf.Tensor:
    """Per segment of a flat bucket, whether all its elements are finite
    (padding is never looked at). Reads ``flat`` and writes one bool per
    segment."""
    return tf.stack([tf.reduce_all(tf.math.is_finite(tensor)) for _, tensor in unflatten(bucket, flat)])


class DivisibleSlices(tf.IndexedSlices):
    """An IndexedSlices that Keras' ``apply`` can divide by the loss scale
    (it divides every gradient by ``loss_scale_factor``; a plain
    IndexedSlices does not support ``/``), so sparse gradients stay sparse."""

    @classmethod
    def of(cls, slices):
        return cls(slices.values, slices.indices, slices.dense_shape)

    def __truediv__(self, scale):
        return DivisibleSlices(self.values / scale, self.indices, self.dense_shape)
