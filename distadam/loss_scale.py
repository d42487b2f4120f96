"""Dynamic loss scaling whose skip decision is global across workers."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="distadam")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """``keras.optimizers.LossScaleOptimizer`` for a ShardedAdam inner optimizer.

    Keras checks finiteness of each replica's *local* gradients and, under
    MirroredStrategy, acts on replica 0's answer, so a NaN produced on another
    replica neither lowers the loss scale nor skips the step there. Here the
    non-finite counts are summed across workers (one scalar all-reduce through
    the inner optimizer's backend), so every worker skips and rescales together.
    """

    def check_finite(self, grads):
        """True when no worker's gradients hold a NaN/Inf: the non-finite
        counts are summed across workers, so all decide alike."""
        bad = tf.add_n([
            tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(tf.convert_to_tensor(g))), tf.float32))
            for g in grads
            if g is not None
        ])
        inner = self.inner_optimizer
        collectives = inner.collectives if getattr(inner, "built", False) else None
        if collectives is not None and collectives.num_workers > 1:
            bad = collectives.all_reduce_sum(bad, name="loss_scale_nonfinite")
        return tf.equal(bad, 0.0)
