"""TensorFlow operations on a :class:`distadam.partition.Bucket`.

The partition decides statically where every element lives; these functions
move values between the per-variable world (shapes) and the flat world
(a bucket, padded to ``num_shards * shard_size``, and one worker's shard of
it). They read variables but never write them and launch no collective.
"""

from __future__ import annotations

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
    return getattr(variable, "value", variable)
