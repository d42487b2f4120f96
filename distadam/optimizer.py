"""ShardedAdam: Keras' Adam with its state partitioned across workers (ZeRO-1).

One step, on every worker (``ShardedAdam._backend_apply_gradients``):

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

Where the pieces live: the math in :mod:`distadam.adam_math`, the partition
in :mod:`distadam.partition` (and its TensorFlow side in
:mod:`distadam.bucket_ops`), the state variables in :mod:`distadam.state`,
communication in :mod:`distadam.collectives`, Keras-format saving in
:mod:`distadam.keras_format`, the constructor's contract in
:mod:`distadam.arguments`, and Keras' private hooks in
:mod:`distadam._keras_internals`.
"""

from __future__ import annotations

import typing
import warnings

import keras
import numpy as np
import tensorflow as tf

from distadam import _keras_internals as hooks
from distadam import adam_math, arguments, bucket_ops, keras_format
from distadam.collectives import resolve_backend
from distadam.partition import Layout, plan_layout
from distadam.state import ShardedState, ShardStateVariable

__all__ = ["ShardedAdam", "ShardStateVariable"]


@keras.saving.register_keras_serializable(package="distadam")
class ShardedAdam(keras.optimizers.Optimizer):
    """Drop-in for ``keras.optimizers.Adam`` that shards ``m``/``v``/``v_hat``
    (and the EMA weights and gradient accumulators) across workers.

    Takes every argument ``keras.optimizers.Adam`` takes, with the same
    defaults, plus:

    Args:
        backend: ``"auto"`` (tf.distribute when a strategy is active, Horovod
            when it is initialised and no strategy is), ``"tf.distribute"``,
            ``"horovod"``, or any name registered with
            :func:`distadam.collectives.register_backend`.
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
    ranks instead: keep the loss a local mean (see
    ``distadam.collectives.horovod``).
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
        arguments.check_adam_arguments(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
            amsgrad=amsgrad, weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
            global_clipnorm=global_clipnorm, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency, loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
        arguments.check_sharding_arguments(
            backend=backend, bucket_elements=bucket_elements, shard_alignment=shard_alignment,
            skip_nonfinite=skip_nonfinite,
        )
        if arguments.is_real_number(learning_rate):
            learning_rate = float(learning_rate)
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
        hooks.set_untracked(self, "_collectives", None)
        hooks.set_untracked(self, "_layout", None)
        hooks.set_untracked(self, "_state", None)

    # ------------------------------------------------------------------ build
    def build(self, var_list):
        if self.built:
            return
        # Not super().build(): Keras would allocate full-size EMA copies and
        # gradient accumulators; here they are sharded like m and v.
        var_list = list(var_list)
        hooks.register_built_variables(self, var_list)
        if tf.distribute.has_strategy():
            self._distribution_strategy = tf.distribute.get_strategy()
        collectives = resolve_backend(self.backend)
        layout = plan_layout(
            var_list,
            num_shards=collectives.num_workers,
            bucket_elements=self.bucket_elements,
            shard_alignment=self.shard_alignment,
        )
        hooks.set_untracked(self, "_collectives", collectives)
        hooks.set_untracked(self, "_layout", layout)
        # Workers must agree on the layout. Checked now with one tiny eager
        # all-reduce when possible; a first build inside a traced step cannot
        # communicate eagerly, so the check then rides on every all-gather.
        hooks.set_untracked(self, "_layout_verified", collectives.num_workers == 1)
        if collectives.num_workers > 1 and tf.executing_eagerly():
            self._verify_same_layout_everywhere()
            self._layout_verified = True
        hooks.set_untracked(self, "_state", ShardedState(layout, collectives, self._state_kinds(), self._new_state_variable))
        with tf.init_scope():
            # A tf.Variable, not a Keras one: it stays out of `variables`, so
            # saved state keeps keras.optimizers.Adam's exact layout.
            skipped = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        hooks.set_untracked(self, "_skipped_steps", skipped)
        self.built = True

    def _new_state_variable(self, name, shape, dtype, options):
        # init_scope: a first apply_gradients inside tf.function must not
        # leave lifted, conditionally initialised state behind.
        with tf.init_scope(), keras.name_scope(self.name, caller=self):
            variable = ShardStateVariable(
                initializer=keras.initializers.Zeros(), shape=shape, dtype=dtype,
                trainable=False, name=name, **options,
            )
        self._track_variable(variable)
        return variable

    def _state_kinds(self):
        kinds = ["momentum", "velocity"]
        if self.amsgrad:
            kinds.append("velocity_hat")
        if self.use_ema:
            kinds.append("average")
        if self.gradient_accumulation_steps:
            kinds.append("accumulator")
        return kinds

    def _verify_same_layout_everywhere(self):
        """Build-time check that every worker laid out the same variables; a
        mismatch would otherwise surface as a shape error in the first step's
        collectives or, worse, as silently mixed shards."""
        terms = np.asarray(self._layout.agreement_terms(), np.float64)
        summed = self._collectives.all_reduce_eagerly(terms)
        if not self._layout.agrees_with(summed, self._collectives.num_workers):
            raise ValueError(
                "distadam: workers disagree on the trainable variables (number, shapes, "
                f"dtypes or order): this worker has {self._layout.summary()}. "
                "Every worker must build the same model with the same trainable flags."
            )

    # ------------------------------------------------------------------- step
    def apply(self, grads, trainable_variables=None):
        # Densify sparse gradients up front: they go into a dense bucket anyway,
        # and Keras' own loss-scale unscaling cannot divide an IndexedSlices.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(grads, trainable_variables)

    def _backend_apply_gradients(self, grads, trainable_variables):
        grads = {self._get_variable_index(v): g for g, v in zip(grads, trainable_variables)}
        step = _StepContext(self, grads)
        buckets = self._layout.buckets

        # 1. Flatten the local gradients, one buffer per bucket.
        flat_grads = [bucket_ops.flatten(bucket, grads) for bucket in buckets]
        # 2. Reduce-scatter: this worker receives its shard of the summed gradient.
        grad_shards = [
            self._collectives.reduce_scatter_sum(flat, name=f"bucket{b}_gradients")
            for b, flat in enumerate(flat_grads)
        ]
        grad_shards = self._accumulate(step, grad_shards)
        # 3. Clip on the global picture.
        grad_shards = self._clip(step, grad_shards)
        # 4. Weight decay and Adam on this worker's shard; nothing written yet.
        proposals = [self._propose(step, b, grad) for b, grad in enumerate(grad_shards)]
        # 5. All-gather the new parameters; every worker commits or skips alike.
        self._gather_and_commit(step, proposals)

    def _accumulate(self, step, grad_shards):
        """With gradient accumulation, add the shards to the accumulator and
        return the accumulated mean (which Keras clips and applies); the
        accumulator is reset on update steps. Only this worker's shard is
        accumulated: 1/N of Keras' accumulator memory."""
        if not self.gradient_accumulation_steps:
            return grad_shards
        steps = self.gradient_accumulation_steps
        step.is_update_step = (self._iterations + 1) % steps == 0
        accumulators = self._state.variables("accumulator")
        totals = [shard + accumulator.value for shard, accumulator in zip(grad_shards, accumulators)]
        step.accumulator_writes = [
            (accumulator,
             tf.cond(step.is_update_step, lambda t=total: tf.zeros_like(t), lambda t=total: t))
            for accumulator, total in zip(accumulators, totals)
        ]
        return [total / steps for total in totals]

    def _clip(self, step, grad_shards):
        """Clip the reduced gradient shards as Keras clips the full gradient:
        by value elementwise; by norm with partial sums of squares summed over
        workers in ONE small all-reduce (per-variable sums for ``clipnorm``,
        the total for ``global_clipnorm``). Without norm clipping nothing is
        launched."""
        if self._clipvalue_active():
            return [adam_math.clip_by_value(g, tf.cast(self.clipvalue, g.dtype)) for g in grad_shards]
        if self._global_clipnorm_active():
            total = self._collectives.all_reduce_sum(
                tf.reshape(adam_math.total_sum_of_squares(grad_shards), [1]), name="norm_statistics")
            return adam_math.clip_by_global_norm(grad_shards, total[0], self.global_clipnorm)
        if self._clipnorm_active():
            buckets = self._layout.buckets
            partial = [
                adam_math.segment_sums_of_squares(g, step.segment_ids(b), len(bucket.segments))
                for b, (g, bucket) in enumerate(zip(grad_shards, buckets))
            ]
            summed = tf.split(
                self._collectives.all_reduce_sum(tf.concat(partial, axis=0), name="norm_statistics"),
                [len(bucket.segments) for bucket in buckets],
            )
            return [
                adam_math.clip_by_variable_norm(g, step.segment_ids(b), sums, self.clipnorm)
                for b, (g, sums) in enumerate(zip(grad_shards, summed))
            ]
        return grad_shards

    def _propose(self, step, b, grad):
        """Weight decay + Adam (+ EMA) on this worker's shard of bucket ``b``,
        writing nothing: the writes wait until every worker's verdict on the
        step is known."""
        bucket = self._layout.buckets[b]
        state = {kind: self._state.variables(kind)[b] for kind in self._state.kinds}
        param_old = bucket_ops.own_shard(bucket, hooks.built_variables(self), step.worker)
        grad = tf.cast(grad, param_old.dtype)

        param = param_old
        if self.weight_decay is not None:
            decayed = adam_math.decoupled_weight_decay(
                param, weight_decay=self.weight_decay, learning_rate=step.learning_rate
            )
            decay_mask = step.mask(b, [step.has_gradient(seg) and self._decays(seg) for seg in bucket.segments])
            param = decayed if decay_mask is None else tf.where(decay_mask, decayed, param)

        new_param, m, v, v_hat = adam_math.adam_update(
            param, grad,
            state["momentum"].value, state["velocity"].value,
            state["velocity_hat"].value if self.amsgrad else None,
            step=step.iterations + 1, learning_rate=step.learning_rate,
            beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
        )

        # Variables without a gradient this step keep everything unchanged,
        # like Keras, which filters them out before the update.
        keep = step.mask(b, [step.has_gradient(seg) for seg in bucket.segments])
        state_writes = [(state["momentum"], m), (state["velocity"], v)]
        if self.amsgrad:
            state_writes.append((state["velocity_hat"], v_hat))
        if keep is not None:
            state_writes = [(var, tf.where(keep, new, var.value)) for var, new in state_writes]
            new_param = tf.where(keep, new_param, param_old)
        if step.is_update_step is not None:
            # Accumulating: the weights stay put, but a non-finite gradient
            # must still show in the gathered parameters (0 * NaN/Inf = NaN)
            # so that the step is skipped before it poisons the accumulator.
            new_param = tf.cond(step.is_update_step, lambda: tf.identity(new_param),
                                lambda: param_old + grad * tf.zeros([], grad.dtype))

        if not self.use_ema:
            return _Proposal(new_param, state_writes, [])
        average = adam_math.ema_update(
            state["average"].value, new_param,
            momentum=self.ema_momentum, not_first_step=tf.not_equal(step.iterations, 0),
        )
        if self.ema_overwrite_frequency:
            overwrite = (step.iterations + 1) % self.ema_overwrite_frequency == 0
            new_param = tf.cond(overwrite, lambda: tf.identity(average), lambda: tf.identity(new_param))
        return _Proposal(new_param, state_writes, [(state["average"], average)])

    def _gather_and_commit(self, step, proposals):
        """All-gather every bucket's new parameters, then write: the
        accumulator, the state shards (on update steps), the EMA and the
        model variables, or nothing at all if the step is skipped."""
        buckets = self._layout.buckets
        gathered, checks = [], []
        for b, (bucket, proposal) in enumerate(zip(buckets, proposals)):
            flat, check = self._gather_params(b, bucket, proposal.params)
            gathered.append(flat)
            checks += [check] if check is not None else []

        # A NaN/Inf gradient element makes the parameter it updates non-finite
        # (Adam propagates it; see _propose for accumulation steps), so the
        # gathered parameters carry every worker's verdict: all workers see
        # the same values and take the same decision, with no extra
        # collective. Such a step is skipped everywhere.
        step_ok = None
        if self.skip_nonfinite:
            step_ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(flat)) for flat in gathered])
        apply_update = step.is_update_step
        if step_ok is not None:
            apply_update = step_ok if apply_update is None else tf.logical_and(apply_update, step_ok)

        with tf.control_dependencies(checks):
            _commit_if(step_ok, step.accumulator_writes)
            for bucket, proposal, flat in zip(buckets, proposals, gathered):
                _commit_if(apply_update, proposal.state_writes)
                _commit_if(step_ok, proposal.average_writes)
                if step_ok is not None:
                    flat = tf.cond(step_ok, lambda f=flat: tf.identity(f),
                                   lambda bucket=bucket: self._current_flat_params(bucket))
                self._write_params(step, bucket, flat)

        if step_ok is not None:
            self._skipped_steps.assign_add(tf.cast(tf.logical_not(step_ok), tf.int64))
            # Keras' apply() adds 1 after this method; a skipped step must leave
            # `iterations` (and so the schedule) where it was.
            self._iterations.assign_sub(tf.cast(tf.logical_not(step_ok), self._iterations.dtype))

    def _gather_params(self, b, bucket, params):
        """All-gather this worker's new parameter shard. If the layout was not
        verified when the optimizer was built (built inside a traced step), the
        shard carries a trailer with this worker's layout fingerprint, and
        every worker asserts that all fingerprints match its own.

        Returns (gathered flat parameters, layout assertion or None)."""
        collectives = self._collectives
        if collectives.num_workers == 1:
            return params, None
        name = f"bucket{b}_params"
        if self._layout_verified:
            return collectives.all_gather(params, name=name), None
        fingerprint = tf.constant(self._layout.fingerprint(), bucket.dtype)
        width = bucket.shard_size + int(fingerprint.shape[0])
        gathered = collectives.all_gather(tf.concat([params, fingerprint], axis=0), name=name)
        rows = tf.reshape(gathered, [collectives.num_workers, width])
        fingerprints = rows[:, bucket.shard_size:]
        check = tf.debugging.assert_equal(
            fingerprints, tf.broadcast_to(fingerprint, tf.shape(fingerprints)),
            message=(
                "distadam: workers disagree on the trainable variables (number, shapes, "
                "dtypes or order). Every worker must build the same model before training."
            ),
        )
        return tf.reshape(rows[:, : bucket.shard_size], [-1]), check

    def _current_flat_params(self, bucket):
        variables = hooks.built_variables(self)
        return bucket_ops.flatten(bucket, {seg.variable_index: variables[seg.variable_index].value
                                           for seg in bucket.segments})

    def _write_params(self, step, bucket, flat):
        """Write a gathered flat bucket into the model variables that had a
        gradient this step."""
        variables = hooks.built_variables(self)
        targets, values = [], []
        for index, value in bucket_ops.unflatten(bucket, flat):
            if index in step.grads:
                targets.append(variables[index])
                values.append(value)
        self._collectives.assign_replicated(targets, values)

    def _decays(self, seg):
        return hooks.uses_weight_decay(self, hooks.built_variables(self)[seg.variable_index])

    def _clipnorm_active(self):
        return bool(self.clipnorm and self.clipnorm > 0)

    def _global_clipnorm_active(self):
        return bool(self.global_clipnorm and self.global_clipnorm > 0)

    def _clipvalue_active(self):
        return bool(self.clipvalue and self.clipvalue > 0)

    # ------------------------------------------------------ public accessors
    @property
    def collectives(self):
        """The communication backend (:class:`distadam.collectives.Collectives`)."""
        self._require_built("collectives")
        return self._collectives

    @property
    def layout(self) -> Layout:
        """The static partition: buckets, shard sizes, who owns what."""
        self._require_built("layout")
        return self._layout

    @property
    def sharded_state(self) -> ShardedState:
        """The sharded state variables and their eager operations (read or
        write one shard, gather, load, bytes)."""
        self._require_built("sharded_state")
        return self._state

    @property
    def num_shards(self) -> int:
        self._require_built("num_shards")
        return self._layout.num_shards

    @property
    def iterations_variable(self):
        """The variable counting ``apply`` calls (micro-steps under gradient
        accumulation; ``iterations`` divides it, as in Keras). Checkpoints
        save and restore this one."""
        return hooks.iterations_variable(self)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/Inf on some worker."""
        self._require_built("skipped_steps")
        return int(self._skipped_steps.numpy())

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._require_built("skipped_steps")
        self._skipped_steps.assign(int(value))

    def shard_layout(self) -> list:
        """Which element ranges of which variables each worker owns."""
        return self.layout.describe()

    def state_bytes_per_device(self) -> dict:
        """Bytes of sharded optimizer state allocated on each local device,
        summed from the actual variable copies (not computed from a formula)."""
        return self.sharded_state.bytes_per_device()

    def state_bytes_per_replica(self) -> dict:
        """Deprecated name of :meth:`state_bytes_per_device`."""
        warnings.warn("state_bytes_per_replica() is now state_bytes_per_device()", DeprecationWarning, stacklevel=2)
        return self.state_bytes_per_device()

    def gather_full_state(self, kind) -> list:
        """Full (unsharded) values of one state kind, one numpy array per
        trainable variable in build order. A collective: call it on every
        worker at the same point."""
        return self.sharded_state.gather(kind)

    def load_full_state(self, kind, values_by_index) -> None:
        """Set one state kind from full per-variable arrays; each local worker
        keeps only its shard."""
        self.sharded_state.load_full(kind, values_by_index)

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
            index = hooks.variable_index(self, variable)
            if index is not None:
                variable.assign(averages[index])

    def save_own_variables(self, store):
        """Save consolidated state in ``keras.optimizers.Adam``'s layout.

        A file written by ``model.save`` therefore loads into plain Adam, and
        into ShardedAdam on any number of workers. Gathers the shards: under
        multi-worker training every worker must call ``model.save`` (under
        Horovod, ``distadam.horovod_keras.ModelCheckpoint`` does that)."""
        if not self.built:
            return super().save_own_variables(store)
        keras_format.save_adam_layout(self, store)

    def load_own_variables(self, store):
        """Load Adam-layout state (from ShardedAdam on any worker count, or
        from plain ``keras.optimizers.Adam``) and keep only the local shards."""
        if not self.built or not keras_format.load_adam_layout(self, store):
            return super().load_own_variables(store)

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


class _StepContext:
    """What one traced step knows about itself: the gradients it got, this
    worker's index, the learning rate and iteration it runs at, and (lazily)
    the segment ids of each bucket's shard, computed only if a mask or a
    per-variable clip needs them."""

    def __init__(self, optimizer, grads):
        self.grads = grads  # {variable index: local gradient}
        self.layout = optimizer._layout
        self.worker = optimizer._collectives.worker_index()
        self.learning_rate = optimizer.learning_rate
        self.iterations = optimizer.iterations  # accumulated iterations, as Keras' Adam uses
        self.is_update_step = None  # set when accumulating
        self.accumulator_writes = []
        self._segment_ids = {}

    def has_gradient(self, seg) -> bool:
        return seg.variable_index in self.grads

    def segment_ids(self, b):
        if b not in self._segment_ids:
            self._segment_ids[b] = bucket_ops.segment_ids(self.layout.buckets[b], self.worker)
        return self._segment_ids[b]

    def mask(self, b, flags):
        """Per-element mask of bucket ``b``'s shard from per-segment flags
        (None when all are True, so no segment ids are computed)."""
        if all(flags):
            return None
        return bucket_ops.segment_mask(self.layout.buckets[b], self.segment_ids(b), flags)


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
