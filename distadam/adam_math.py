"""Adam, clipping, weight decay and EMA as pure functions on flat shards.

Each function takes tensors and returns new tensors; nothing here reads or
writes a variable, knows about workers, or launches a collective. The
arithmetic follows ``keras.optimizers.Adam`` operation by operation (same
order, same casts), so a shard update is bit-for-bit the slice of the dense
update wherever the inputs agree.
"""

from __future__ import annotations

import tensorflow as tf


def adam_update(param, grad, m, v, v_hat, *, step, learning_rate, beta_1, beta_2, epsilon):
    """One Adam step. ``v_hat`` is None unless AMSGrad is on.

    Returns (param, m, v, v_hat)."""
    dtype = param.dtype
    lr = tf.cast(learning_rate, dtype)
    grad = tf.cast(grad, dtype)
    local_step = tf.cast(step, dtype)
    beta_1_power = tf.pow(tf.cast(beta_1, dtype), local_step)
    beta_2_power = tf.pow(tf.cast(beta_2, dtype), local_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)

    m = m + (grad - m) * (1 - beta_1)
    v = v + (tf.square(grad) - v) * (1 - beta_2)
    denominator_v = v
    if v_hat is not None:
        v_hat = tf.maximum(v_hat, v)
        denominator_v = v_hat
    param = param - (m * alpha) / (tf.sqrt(denominator_v) + epsilon)
    return param, m, v, v_hat


def decoupled_weight_decay(param, *, weight_decay, learning_rate):
    """AdamW-style decay as Keras applies it before the Adam step."""
    dtype = param.dtype
    return param - param * tf.cast(weight_decay, dtype) * tf.cast(learning_rate, dtype)


def clip_by_value(grad, clipvalue):
    return tf.clip_by_value(grad, -clipvalue, clipvalue)


# Norm clipping on sharded gradients: each worker computes partial sums of
# squares over its shard; summed over workers (one small all-reduce) they are
# the sums over the whole reduced gradient, so the clip is the one a single
# device would apply.

def total_sum_of_squares(shards):
    """Partial sum of squares over a worker's gradient shards (float32 scalar)."""
    return tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in shards])


def segment_sums_of_squares(shard, segment_ids, num_segments):
    """Partial sum of squares per variable over one shard: float32
    [num_segments]. ``segment_ids`` maps each element to its variable's
    position, ``num_segments`` marking padding (dropped)."""
    sums = tf.math.unsorted_segment_sum(tf.square(tf.cast(shard, tf.float32)), segment_ids, num_segments + 1)
    return sums[:num_segments]


def clip_by_global_norm(shards, global_sum_of_squares, clip_norm):
    """Scale every shard by ``clip_norm / max(global norm, clip_norm)``."""
    scale = global_norm_scale(global_sum_of_squares, clip_norm)
    return [g * tf.cast(scale, g.dtype) for g in shards]


def clip_by_variable_norm(shard, segment_ids, segment_sums, clip_norm):
    """Clip each variable's part of ``shard`` to norm ``clip_norm`` given its
    global sum of squares (``segment_sums``, one per variable)."""
    divisor = per_variable_norm_divisor(segment_sums, clip_norm)
    divisor = tf.concat([divisor, [clip_norm]], axis=0)  # padding's segment: unchanged
    return shard * tf.cast(clip_norm, shard.dtype) / tf.cast(tf.gather(divisor, segment_ids), shard.dtype)


def global_norm_scale(sum_of_squares, clip_norm):
    """Factor that clips to ``clip_norm`` given the global sum of squares.

    NaN when the norm is not finite, as in Keras, so a bad step is visible."""
    use_norm = tf.sqrt(sum_of_squares)
    scale_for_finite = clip_norm * tf.minimum(1.0 / use_norm, 1.0 / clip_norm)
    return scale_for_finite + (use_norm - use_norm)


def per_variable_norm_divisor(sum_of_squares, clip_norm):
    """``max(||g_i||, clip_norm)`` per variable, with Keras' NaN-safe norm."""
    positive = sum_of_squares > 0
    safe = tf.where(positive, sum_of_squares, tf.ones_like(sum_of_squares))
    norm = tf.where(positive, tf.sqrt(safe), sum_of_squares)
    return tf.maximum(norm, clip_norm)


def ema_update(average, param, *, momentum, not_first_step):
    """Keras' model-weight EMA: the first step copies the weights."""
    dtype = param.dtype
    momentum = tf.cast(not_first_step, dtype) * momentum
    return momentum * average + (1 - momentum) * param
