"""ShardedAdam: Keras' Adam with its state partitioned across workers (ZeRO-1).

One step, on every worker:

1. flatten the local gradients into one flat buffer per dtype bucket;
2. reduce-scatter (sum) each bucket: the worker receives only its shard of the
   summed gradient (Keras' ``train_step`` already scaled the loss by 1/N, so the
   sum is the global mean, exactly as with Keras' own all-reduce);
3. clip on the global picture: per-shard partial sums of squares are combined
   with one small all-reduce (per-variable sums for ``clipnorm``, the total for
   ``global_clipnorm``);
4. apply weight decay and the Adam update to the worker's shard of the
   parameters with its shard of ``m``, ``v`` (and ``v_hat``), writing nothing
   yet;
5. all-gather the updated parameter shards. A non-finite gradient element
   makes the parameter it updates non-finite, so every worker now sees whether
   any worker's shard went bad and all decide alike: skip the step, or write
   the state shards and the replicated model variables, identical everywhere.

Collectives per step: one reduce-scatter and one all-gather per bucket, plus
one small all-reduce in total when clipping by norm, whatever the number of
variables.
"""

from __future__ import annotations

import hashlib
import numbers
import typing

import keras
import numpy as np
import tensorflow as tf

from keras.src.utils import tracking as keras_tracking  # Keras' own build() uses it too

from distadam import adam_math
from distadam.comm import resolve_backend
from distadam.partition import Layout, plan_layout


def _require_real(name, value, *, low=None, high=None, high_open=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}: {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {name}={value!r}")
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {name}={value!r}")
    if high is not None and (value >= high if high_open else value > high):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"`{name}` must be {bound}, got {name}={value!r}")


@keras.saving.register_keras_serializable(package="distadam")
class ShardedAdam(keras.optimizers.Optimizer):
    """Drop-in for ``keras.optimizers.Adam`` that shards ``m``/``v``/``v_hat``
    (and the EMA weights and gradient accumulators) across workers.

    Takes every argument ``keras.optimizers.Adam`` takes, with the same
    defaults, plus:

    Args:
        backend: ``"auto"`` (tf.distribute when a strategy is active, Horovod
            when it is initialised and no strategy is), ``"tf.distribute"`` or
            ``"horovod"``.
        bucket_elements: optional cap on elements per flat bucket. ``None``
            (default) keeps one bucket per dtype: the fewest collectives.
        shard_alignment: round shard sizes up to a multiple of this.
        skip_nonfinite: if a gradient holds NaN/Inf on any worker, skip the
            step on every worker (weights, state and ``iterations`` unchanged)
            so shards never diverge. Keras' Adam would write NaN weights.
            Decided from the gathered parameters, so it costs no collective;
            it also skips steps while the weights themselves are non-finite.

    Gradients are summed across workers once, inside the optimizer, as Keras
    does; ``model.fit`` scales the loss by 1/N so the sum is the mean. In a
    custom loop scale the per-replica loss by 1/global_batch (e.g.
    ``tf.nn.compute_average_loss``), as with any tf.distribute optimizer.
    Sparse gradients (``tf.IndexedSlices``) are densified into the bucket.
    Under Horovod (no strategy scales the loss) gradients are averaged over
    ranks instead: keep the loss a local mean (see ``distadam.comm.horovod``).
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        backend="auto",
        bucket_elements=None,
        shard_alignment=1,
        skip_nonfinite=True,
        **kwargs,
    ):
        # Keras checks these itself but accepts values PyTorch's Adam rejects.
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            _require_real("learning_rate", learning_rate, low=0.0)
            learning_rate = float(learning_rate)
        _require_real("beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        _require_real("beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        _require_real("epsilon", epsilon, low=0.0)
        if not isinstance(amsgrad, (bool, np.bool_)):
            raise TypeError(f"`amsgrad` must be a bool, got {type(amsgrad).__name__}: {amsgrad!r}")
        _require_real("weight_decay", weight_decay, low=0.0, allow_none=True)
        for arg_name, value in (
            ("clipnorm", clipnorm),
            ("clipvalue", clipvalue),
            ("global_clipnorm", global_clipnorm),
        ):
            _require_real(arg_name, value, low=0.0, allow_none=True)
        _require_real("ema_momentum", ema_momentum, low=0.0, high=1.0)
        if ema_overwrite_frequency is not None and (
            isinstance(ema_overwrite_frequency, bool)
            or not isinstance(ema_overwrite_frequency, numbers.Integral)
            or ema_overwrite_frequency < 1
        ):
            raise ValueError(
                "`ema_overwrite_frequency` must be an integer >= 1 or None, got "
                f"ema_overwrite_frequency={ema_overwrite_frequency!r}"
            )
        _require_real("loss_scale_factor", loss_scale_factor, allow_none=True)
        if loss_scale_factor is not None and loss_scale_factor <= 0:
            raise ValueError(f"`loss_scale_factor` must be > 0, got loss_scale_factor={loss_scale_factor!r}")
        if gradient_accumulation_steps is not None and (
            isinstance(gradient_accumulation_steps, bool)
            or not isinstance(gradient_accumulation_steps, numbers.Integral)
        ):
            raise TypeError(
                "`gradient_accumulation_steps` must be an integer >= 2 or None, got "
                f"{gradient_accumulation_steps!r}"
            )
        if not isinstance(skip_nonfinite, (bool, np.bool_)):
            raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}")
        if not isinstance(backend, str):
            raise TypeError(f"`backend` must be a string, got {backend!r}")
        if bucket_elements is not None and (
            isinstance(bucket_elements, bool)
            or not isinstance(bucket_elements, numbers.Integral)
            or bucket_elements < 1
        ):
            raise ValueError(f"`bucket_elements` must be a positive integer or None, got {bucket_elements!r}")
        if (
            isinstance(shard_alignment, bool)
            or not isinstance(shard_alignment, numbers.Integral)
            or shard_alignment < 1
        ):
            raise ValueError(f"`shard_alignment` must be a positive integer, got {shard_alignment!r}")

        super().__init__(
            learning_rate=learning_rate,
            name=name or "sharded_adam",
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = bool(amsgrad)
        self.backend = backend
        self.bucket_elements = None if bucket_elements is None else int(bucket_elements)
        self.shard_alignment = int(shard_alignment)
        self.skip_nonfinite = bool(skip_nonfinite)
        self._collectives = None
        self._layout = None

    # ------------------------------------------------------------------ build
    @keras_tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        if self.built:
            return
        # Not super().build(): Keras would allocate full-size EMA copies and
        # gradient accumulators; here they are sharded like m and v.
        var_list = list(var_list)
        self._trainable_variables_indices = {}
        for index, variable in enumerate(var_list):
            self._trainable_variables_indices[self._var_key(variable)] = index
        self._trainable_variables = var_list[:]

        if tf.distribute.has_strategy():
            self._distribution_strategy = tf.distribute.get_strategy()
        collectives = resolve_backend(self.backend)
        layout = plan_layout(
            var_list,
            num_shards=collectives.num_workers,
            bucket_elements=self.bucket_elements,
            shard_alignment=self.shard_alignment,
        )
        self._collectives = collectives
        self._layout = layout
        self._layout_verified = collectives.num_workers == 1
        if collectives.num_workers > 1 and tf.executing_eagerly():
            self._verify_same_layout_everywhere()
            self._layout_verified = True
        self._shard_state = {kind: [] for kind in self._state_kinds()}
        options = collectives.state_variable_options()
        for bucket_index, bucket in enumerate(layout.buckets):
            for kind in self._state_kinds():
                # init_scope: a first apply_gradients inside tf.function must
                # not leave lifted, conditionally initialised state behind.
                with tf.init_scope(), keras.name_scope(self.name, caller=self):
                    variable = ShardStateVariable(
                        initializer=keras.initializers.Zeros(),
                        shape=(bucket.shard_size,),
                        dtype=bucket.dtype,
                        trainable=False,
                        name=f"bucket{bucket_index}_{bucket.dtype}_{kind}_shard",
                        **options,
                    )
                variable.bind_shards(bucket, collectives)
                self._track_variable(variable)
                self._shard_state[kind].append(variable)
        with tf.init_scope():
            # A tf.Variable, not a Keras one: it stays out of `variables`, so
            # saved state keeps keras.optimizers.Adam's exact layout.
            self._skipped_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.built = True

    def _state_kinds(self):
        kinds = ["momentum", "velocity"]
        if self.amsgrad:
            kinds.append("velocity_hat")
        if self.use_ema:
            kinds.append("average")
        if self.gradient_accumulation_steps:
            kinds.append("accumulator")
        return kinds

    # ------------------------------------------------------------------- step
    def apply(self, grads, trainable_variables=None):
        # Densify sparse gradients up front: they go into a dense bucket anyway,
        # and Keras' own loss-scale unscaling cannot divide an IndexedSlices.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(grads, trainable_variables)

    def _backend_apply_gradients(self, grads, trainable_variables):
        comm = self._collectives
        layout = self._layout
        grads_by_index = {
            self._get_variable_index(v): g for g, v in zip(grads, trainable_variables)
        }
        worker = comm.worker_index()
        learning_rate = self.learning_rate
        iterations = self.iterations  # accumulated iterations, as Keras' Adam uses

        grad_shards = [
            comm.reduce_scatter_sum(self._flatten(bucket, grads_by_index), name=f"bucket{b}_gradients")
            for b, bucket in enumerate(layout.buckets)
        ]
        segment_ids = [
            self._segment_ids(bucket, worker) if self._needs_segments(bucket, grads_by_index) else None
            for bucket in layout.buckets
        ]

        is_update_step = None
        accumulator_writes = []
        if self.gradient_accumulation_steps:
            steps = self.gradient_accumulation_steps
            is_update_step = (self._iterations + 1) % steps == 0
            totals = [
                shard + self._shard_state["accumulator"][b].value
                for b, shard in enumerate(grad_shards)
            ]
            accumulator_writes = [
                (self._shard_state["accumulator"][b],
                 tf.cond(is_update_step, lambda t=total: tf.zeros_like(t), lambda t=total: t))
                for b, total in enumerate(totals)
            ]
            # Keras clips the accumulated mean, so statistics are taken on it.
            grad_shards = [total / steps for total in totals]

        grad_shards = self._clip(grad_shards, segment_ids, self._reduce_norm_statistics(grad_shards, segment_ids))

        proposals = [
            self._propose_bucket(
                b, bucket, grad_shards[b], segment_ids[b], grads_by_index,
                worker, learning_rate, iterations, is_update_step,
            )
            for b, bucket in enumerate(layout.buckets)
        ]
        gathered, checks = [], []
        for b, bucket in enumerate(layout.buckets):
            flat, check = self._gather_params(b, bucket, proposals[b].params)
            gathered.append(flat)
            checks += [check] if check is not None else []

        # A NaN/Inf gradient element makes the parameter it updates non-finite
        # (Adam propagates it; see _propose_bucket for accumulation steps), so
        # the gathered parameters carry every worker's verdict: all workers
        # see the same values and take the same decision, with no extra
        # collective. Such a step is skipped everywhere.
        step_ok = None
        if self.skip_nonfinite:
            step_ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(flat)) for flat in gathered])
        apply_update = is_update_step
        if step_ok is not None:
            apply_update = step_ok if apply_update is None else tf.logical_and(apply_update, step_ok)

        with tf.control_dependencies(checks):
            _commit_if(step_ok, accumulator_writes)
            for b, bucket in enumerate(layout.buckets):
                _commit_if(apply_update, proposals[b].state_writes)
                _commit_if(step_ok, proposals[b].average_writes)
                flat = gathered[b]
                if step_ok is not None:
                    flat = tf.cond(step_ok, lambda f=flat: tf.identity(f),
                                   lambda bucket=bucket: self._flat_params(bucket))
                self._write_bucket(bucket, flat, grads_by_index)

        if step_ok is not None:
            self._skipped_steps.assign_add(tf.cast(tf.logical_not(step_ok), tf.int64))
            # Keras' apply() adds 1 after this method; a skipped step must leave
            # `iterations` (and so the schedule) where it was.
            self._iterations.assign_sub(tf.cast(tf.logical_not(step_ok), self._iterations.dtype))

    def _reduce_norm_statistics(self, grad_shards, segment_ids):
        """The partial sums of squares that norm clipping needs, combined in
        ONE small all-reduce (per-variable sums for ``clipnorm``, the total for
        ``global_clipnorm``). Without norm clipping nothing is launched."""
        if self._global_clipnorm_active():
            total = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in grad_shards])
            return {"global_sum_of_squares": self._collectives.all_reduce_sum(
                tf.reshape(total, [1]), name="norm_statistics")}
        if not self._clipnorm_active():
            return {}
        pieces = []
        for b, (g, bucket, ids) in enumerate(zip(grad_shards, self._layout.buckets, segment_ids)):
            count = len(bucket.segments)
            sums = tf.math.unsorted_segment_sum(tf.square(tf.cast(g, tf.float32)), ids, count + 1)
            pieces.append((f"sum_of_squares_{b}", sums[:count]))
        reduced = self._collectives.all_reduce_sum(
            tf.concat([value for _, value in pieces], axis=0), name="norm_statistics")
        sizes = [int(value.shape[0]) for _, value in pieces]
        return {name: part for (name, _), part in zip(pieces, tf.split(reduced, sizes))}

    def _gather_params(self, b, bucket, params):
        """All-gather this worker's new parameter shard. If the layout was not
        verified when the optimizer was built (built inside a traced step), the
        shard carries a 2-element trailer with this worker's layout hash, and
        every worker asserts that all hashes match its own.

        Returns (gathered flat parameters, layout assertion or None)."""
        comm = self._collectives
        if comm.num_workers == 1:
            return params, None
        name = f"bucket{b}_params"
        if self._layout_verified:
            return comm.all_gather(params, name=name), None
        layout_hash = tf.constant(self._layout_hash(), bucket.dtype)
        width = bucket.shard_size + int(layout_hash.shape[0])
        gathered = comm.all_gather(tf.concat([params, layout_hash], axis=0), name=name)
        rows = tf.reshape(gathered, [comm.num_workers, width])
        hashes = rows[:, bucket.shard_size:]
        check = tf.debugging.assert_equal(
            hashes, tf.broadcast_to(layout_hash, tf.shape(hashes)),
            message=(
                "distadam: workers disagree on the trainable variables (number, shapes, "
                "dtypes or order). Every worker must build the same model before training."
            ),
        )
        return tf.reshape(rows[:, : bucket.shard_size], [-1]), check

    def _clipnorm_active(self):
        return bool(self.clipnorm and self.clipnorm > 0)

    def _global_clipnorm_active(self):
        return bool(self.global_clipnorm and self.global_clipnorm > 0)

    def _clipvalue_active(self):
        return bool(self.clipvalue and self.clipvalue > 0)

    def _layout_hash(self):
        """Two 8-bit hashes of the layout, as 1..256: exact in every float
        dtype a bucket can have (bfloat16 included)."""
        description = repr([
            (bucket.dtype, bucket.num_shards, bucket.shard_size, [seg.shape for seg in bucket.segments])
            for bucket in self._layout.buckets
        ]).encode()
        digest = hashlib.sha256(description).digest()
        return [digest[0] + 1, digest[1] + 1]

    def _verify_same_layout_everywhere(self):
        """Build-time check (a tiny all-reduce) that every worker laid out the
        same variables; a mismatch would otherwise surface as a shape error in
        the first step's collectives or, worse, as silently mixed shards.
        Sums of h and h^2 equal N*h and N*h^2 on every worker only if all
        hashes are equal (zero variance)."""
        terms = np.asarray([t for h in self._layout_hash() for t in (h, h * h)], np.float32)
        reduced = self._collectives.all_reduce_eagerly(terms)
        if not np.array_equal(reduced, terms * self._collectives.num_workers):
            raise ValueError(
                "distadam: workers disagree on the trainable variables (number, shapes, "
                "dtypes or order): this worker has "
                f"{[(b.dtype, [s.shape for s in b.segments]) for b in self._layout.buckets]}. "
                "Every worker must build the same model with the same trainable flags."
            )

    def _propose_bucket(self, b, bucket, grad, segment_ids, grads_by_index, worker,
                        learning_rate, iterations, is_update_step):
        """Weight decay + Adam (+ EMA) on this worker's shard, writing nothing:
        the writes wait until every worker's verdict on the step is known."""
        state = {kind: variables[b] for kind, variables in self._shard_state.items()}
        param_old = self._own_param_shard(bucket, worker)
        grad = tf.cast(grad, param_old.dtype)

        param = param_old
        if self.weight_decay is not None:
            decayed = adam_math.decoupled_weight_decay(
                param, weight_decay=self.weight_decay, learning_rate=learning_rate
            )
            decay_mask = self._segment_mask(
                bucket, segment_ids,
                lambda seg: seg.variable_index in grads_by_index
                and self._decays(seg.variable_index),
            )
            param = decayed if decay_mask is None else tf.where(decay_mask, decayed, param)

        new_param, m, v, v_hat = adam_math.adam_update(
            param, grad,
            state["momentum"].value, state["velocity"].value,
            state["velocity_hat"].value if self.amsgrad else None,
            step=iterations + 1, learning_rate=learning_rate,
            beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
        )

        # Variables without a gradient this step keep everything unchanged,
        # like Keras, which filters them out before the update.
        keep = self._segment_mask(bucket, segment_ids, lambda seg: seg.variable_index in grads_by_index)
        state_writes = [(state["momentum"], m), (state["velocity"], v)]
        if self.amsgrad:
            state_writes.append((state["velocity_hat"], v_hat))
        if keep is not None:
            state_writes = [(var, tf.where(keep, new, var.value)) for var, new in state_writes]
            new_param = tf.where(keep, new_param, param_old)
        if is_update_step is not None:
            # Accumulating: the weights stay put, but a non-finite gradient
            # must still show in the gathered parameters (0 * NaN/Inf = NaN)
            # so that the step is skipped before it poisons the accumulator.
            new_param = tf.cond(is_update_step, lambda: tf.identity(new_param),
                                lambda: param_old + grad * tf.zeros([], grad.dtype))

        if not self.use_ema:
            return _Proposal(new_param, state_writes, [])
        average = adam_math.ema_update(
            state["average"].value, new_param,
            momentum=self.ema_momentum, not_first_step=tf.not_equal(iterations, 0),
        )
        if self.ema_overwrite_frequency:
            overwrite = (iterations + 1) % self.ema_overwrite_frequency == 0
            new_param = tf.cond(overwrite, lambda: tf.identity(average), lambda: tf.identity(new_param))
        return _Proposal(new_param, state_writes, [(state["average"], average)])

    def _clip(self, grad_shards, segment_ids, statistics):
        """Clip the reduced gradient shards with the globally reduced sums."""
        if self._clipvalue_active():
            return [adam_math.clip_by_value(g, tf.cast(self.clipvalue, g.dtype)) for g in grad_shards]
        if "global_sum_of_squares" in statistics:
            scale = adam_math.global_norm_scale(statistics["global_sum_of_squares"][0], self.global_clipnorm)
            return [g * tf.cast(scale, g.dtype) for g in grad_shards]
        if self._clipnorm_active():
            clipped = []
            for b, (g, ids) in enumerate(zip(grad_shards, segment_ids)):
                divisor = adam_math.per_variable_norm_divisor(statistics[f"sum_of_squares_{b}"], self.clipnorm)
                divisor = tf.concat([divisor, [self.clipnorm]], axis=0)  # padding segment
                clip = tf.cast(self.clipnorm, g.dtype)
                clipped.append(g * clip / tf.cast(tf.gather(divisor, ids), g.dtype))
            return clipped
        return grad_shards

    # ------------------------------------------------------- layout plumbing
    def _flatten(self, bucket, tensors_by_index):
        pieces = []
        for seg in bucket.segments:
            tensor = tensors_by_index.get(seg.variable_index)
            if tensor is None:
                tensor = tf.zeros([seg.size], dtype=bucket.dtype)
            pieces.append(tf.reshape(tf.cast(tensor, bucket.dtype), [-1]))
        if bucket.padding:
            pieces.append(tf.zeros([bucket.padding], dtype=bucket.dtype))
        return tf.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]

    def _own_param_shard(self, bucket, worker):
        """This worker's [S] slice of the flattened parameters."""
        static_worker = tf.get_static_value(worker)
        if static_worker is not None:
            # Known at trace time (Mirrored/MultiWorker replicas, Horovod ranks):
            # copy only the owned pieces, 1/N of the parameters.
            shard = int(static_worker)
            pieces = [
                tf.reshape(self._trainable_variables[seg.variable_index].value, [-1])[start:stop]
                for seg, start, stop in bucket.owned_pieces(shard)
            ]
            lo, hi = bucket.shard_range(shard)
            if bucket.shard_size > hi - lo:
                pieces.append(tf.zeros([bucket.shard_size - (hi - lo)], dtype=bucket.dtype))
            return tf.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]
        # Dynamic replica id (TPU): flatten everything and pick the row.
        flat = self._flat_params(bucket)
        return tf.gather(tf.reshape(flat, [bucket.num_shards, bucket.shard_size]), worker)

    def _flat_params(self, bucket):
        """The bucket's current parameters, flattened and padded."""
        values = {
            seg.variable_index: self._trainable_variables[seg.variable_index].value
            for seg in bucket.segments
        }
        return self._flatten(bucket, values)

    def _write_bucket(self, bucket, flat, grads_by_index):
        flat = flat[: bucket.num_elements]
        pieces = tf.split(flat, [seg.size for seg in bucket.segments])
        targets, values = [], []
        for seg, piece in zip(bucket.segments, pieces):
            if seg.variable_index in grads_by_index:
                targets.append(self._trainable_variables[seg.variable_index])
                values.append(tf.reshape(piece, seg.shape))
        self._collectives.assign_replicated(targets, values)

    def _needs_segments(self, bucket, grads_by_index):
        if self._clipnorm_active():
            return True
        if any(seg.variable_index not in grads_by_index for seg in bucket.segments):
            return True
        if self.weight_decay is not None:
            return not all(self._decays(seg.variable_index) for seg in bucket.segments)
        return False

    def _decays(self, variable_index):
        # Keras' TF optimizer matches exclusion patterns against the tf.Variable
        # name, which includes the layer path ("nobias/kernel:0" matches "bias").
        # Match that, so weight decay is exactly Keras'.
        variable = self._trainable_variables[variable_index]
        return self._use_weight_decay(getattr(variable, "value", variable))

    def _segment_ids(self, bucket, worker):
        """Index of the variable owning each element of this worker's shard
        (``len(segments)`` for padding). Computed, not stored: a stored table
        would cost as much memory as a parameter copy."""
        index_dtype = tf.int64 if bucket.padded_size >= 2**31 else tf.int32
        start = tf.cast(worker, index_dtype) * bucket.shard_size
        positions = start + tf.range(bucket.shard_size, dtype=index_dtype)
        ends = tf.constant([seg.end for seg in bucket.segments], dtype=index_dtype)
        return tf.searchsorted(ends, positions, side="right", out_type=tf.int32)

    def _segment_mask(self, bucket, segment_ids, predicate):
        flags = [bool(predicate(seg)) for seg in bucket.segments]
        if all(flags):
            return None
        table = tf.constant(flags + [False], dtype=tf.bool)
        return tf.gather(table, segment_ids)

    # -------------------------------------------------------- introspection
    @property
    def layout(self) -> Layout:
        self._require_built("layout")
        return self._layout

    @property
    def num_shards(self) -> int:
        self._require_built("num_shards")
        return self._layout.num_shards

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/Inf on some worker."""
        self._require_built("skipped_steps")
        return int(self._skipped_steps.numpy())

    def shard_layout(self) -> list:
        """Which element ranges of which variables each worker owns."""
        return self.layout.describe()

    def state_bytes_per_replica(self) -> dict:
        """Bytes of sharded optimizer state allocated on each local device,
        summed from the actual variable copies (not computed from a formula)."""
        self._require_built("state_bytes_per_replica")
        totals = {}
        for variables in self._shard_state.values():
            for variable in variables:
                for device, component in self._collectives.local_components(variable):
                    nbytes = int(np.prod(component.shape)) * component.dtype.size
                    totals[device] = totals.get(device, 0) + nbytes
        return totals

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"{what} is only known once the optimizer is built: call "
                "optimizer.build(model.trainable_variables) or train a step first."
            )

    # ------------------------------------------------------------- overrides
    def finalize_variable_values(self, var_list):
        if self.use_ema and self.built:
            self._overwrite_model_variables_with_average_value(var_list)

    def _overwrite_model_variables_with_average_value(self, trainable_variables):
        averages = self.gather_full_state("average")
        for variable in trainable_variables:
            key = self._var_key(variable)
            index = self._trainable_variables_indices.get(key)
            if index is not None:
                variable.assign(averages[index])

    def gather_full_state(self, kind) -> list:
        """Full (unsharded) values of one state kind, one numpy array per
        trainable variable in build order. A collective: call it on every
        worker at the same point."""
        self._require_built("gather_full_state")
        if kind not in self._shard_state:
            raise ValueError(f"No {kind!r} state; this optimizer has {sorted(self._shard_state)}")
        flats = _gather_shards(self._collectives, self._shard_state[kind])
        result = [None] * len(self._trainable_variables)
        for bucket, flat in zip(self._layout.buckets, flats):
            for seg in bucket.segments:
                result[seg.variable_index] = flat[seg.offset: seg.end].reshape(seg.shape)
        return result

    # ------------------------------------------------------ save / restore
    def _adam_variable_order(self):
        """(kind, variable_index) in the order ``keras.optimizers.Adam`` lists
        its ``variables``, so saved state is plain Adam state."""
        order = [("iteration", None)]
        if isinstance(self._learning_rate, keras.Variable):
            order.append(("learning_rate", None))
        count = len(self._trainable_variables)
        if self.use_ema:
            order += [("average", i) for i in range(count)]
        if self.gradient_accumulation_steps:
            order += [("accumulator", i) for i in range(count)]
        for i in range(count):
            order += [("momentum", i), ("velocity", i)]
        if self.amsgrad:
            order += [("velocity_hat", i) for i in range(count)]
        return order

    def save_own_variables(self, store):
        """Save consolidated state in ``keras.optimizers.Adam``'s layout.

        A file written by ``model.save`` therefore loads into plain Adam, and
        into ShardedAdam on any number of workers. Gathers the shards: under
        multi-worker training every worker must call ``model.save`` (under
        Horovod, ``distadam.horovod_keras.ModelCheckpoint`` does that)."""
        if not self.built:
            return super().save_own_variables(store)
        full = {kind: self.gather_full_state(kind) for kind in self._shard_state}
        for key, (kind, index) in enumerate(self._adam_variable_order()):
            if kind == "iteration":
                value = self._iterations.numpy()
            elif kind == "learning_rate":
                value = self._learning_rate.numpy()
            else:
                value = full[kind][index]
            store[str(key)] = value

    def load_own_variables(self, store):
        """Load Adam-layout state (from ShardedAdam on any worker count, or
        from plain ``keras.optimizers.Adam``) and keep only the local shards."""
        order = self._adam_variable_order()
        if not self.built or len(store.keys()) != len(order):
            return super().load_own_variables(store)
        per_kind = {}
        for key, (kind, index) in enumerate(order):
            value = np.asarray(store[str(key)])
            if kind == "iteration":
                self._iterations.assign(value)
            elif kind == "learning_rate":
                self._learning_rate.assign(value)
            else:
                expected = tuple(self._trainable_variables[index].shape)
                if value.shape != expected:
                    raise ValueError(
                        f"Saved {kind} for variable #{index} has shape {value.shape}, "
                        f"expected {expected}: the checkpoint is for a different model."
                    )
                per_kind.setdefault(kind, {})[index] = value
        for kind, values in per_kind.items():
            self.load_full_state(kind, values)

    def load_full_state(self, kind, values_by_index):
        """Set one state kind from full per-variable arrays; each local replica
        keeps only its shard."""
        self._require_built("load_full_state")
        comm = self._collectives
        shard_ids = comm.local_worker_indices()
        for bucket, variable in zip(self._layout.buckets, self._shard_state[kind]):
            flat = np.zeros([bucket.padded_size], dtype=bucket.dtype)
            for seg in bucket.segments:
                flat[seg.offset: seg.end] = np.reshape(values_by_index[seg.variable_index], [-1])
            shards = flat.reshape(bucket.num_shards, bucket.shard_size)
            for (_, component), shard_id in zip(comm.local_components(variable), shard_ids):
                component.assign(shards[shard_id])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "backend": self.backend,
                "bucket_elements": self.bucket_elements,
                "shard_alignment": self.shard_alignment,
                "skip_nonfinite": self.skip_nonfinite,
            }
        )
        return config


def _commit_if(condition, writes):
    """Assign ``writes`` [(variable, value)] if the scalar ``condition`` holds
    (always when it is None). A cond on a scalar instead of full-size selects:
    a skipped or accumulating step costs no extra pass over the shard."""
    if not writes:
        return
    if condition is None:
        for variable, value in writes:
            variable.assign(value)
        return

    def commit():
        with tf.control_dependencies([variable.assign(value) for variable, value in writes]):
            return tf.constant(True)

    tf.cond(condition, commit, lambda: tf.constant(False))


class _Proposal(typing.NamedTuple):
    """One bucket's step, computed but not yet written."""

    params: tf.Tensor  # this worker's new parameter shard, to all-gather
    state_writes: list  # (m, v, v_hat variable, new value): on update steps
    average_writes: list  # (EMA variable, new value): on every good step


class ShardStateVariable(keras.Variable):
    """A Keras variable holding one worker's shard of a bucket's state.

    In TF checkpoints every local shard is saved under a key naming its element
    range, so per-replica values survive (a plain ON_READ variable saves one
    aggregated value, or refuses to save at all) and a multi-process worker
    writes only what it owns. Restoring needs the same ranges, i.e. the same
    worker count; a range that is not in the checkpoint is reported by TF as a
    missing key. Change the worker count through ``model.save`` /
    ``save_weights`` (plain Adam layout) or ``distadam.checkpoint``.
    """

    def bind_shards(self, bucket, collectives):
        self._bucket = bucket
        self._collectives = collectives

    def _local_slices(self):
        bucket = self._bucket
        components = self._collectives.local_components(self)
        for (_, component), shard in zip(components, self._collectives.local_worker_indices()):
            start, stop = bucket.shard_range(shard)
            key = f"ELEMENTS_{start}_{stop}_OF_{bucket.num_elements}"
            yield component, key, stop - start

    def _serialize_to_tensors(self):
        return {key: component.read_value() for component, key, _ in self._local_slices()}

    def _restore_from_tensors(self, restored_tensors):
        return tf.group([
            component.assign(restored_tensors[key]) for component, key, _ in self._local_slices()
        ])


def _gather_shards(collectives, variables) -> list:
    """All-gather each per-worker variable; numpy arrays of the full buckets."""
    if collectives.num_workers == 1:
        return [np.asarray(collectives.local_components(v)[0][1]) for v in variables]
    strategy = getattr(collectives, "strategy", None)
    if strategy is None:
        return [np.asarray(t) for t in collectives.gather_eagerly([v.value for v in variables])]

    @tf.function
    def gather():
        return strategy.run(lambda: [collectives.all_gather(v.value) for v in variables])

    gathered = gather()
    return [np.asarray(strategy.experimental_local_results(g)[0]) for g in gathered]
