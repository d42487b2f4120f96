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

import sys
import typing
import warnings

import keras
import numpy as np
import tensorflow as tf

from distadam import _keras_internals as hooks
from distadam import _tf_internals
from distadam import adam_math, arguments, bucket_ops, keras_format, shard_update
from distadam.collectives import hybrid, resolve_backend
from distadam.partition import DEFAULT_BUCKET_ELEMENTS, Layout, plan_layout
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
        bucket_elements: cap on elements per flat bucket (default 2**22).
            Buckets are laid out last layer first, so a bucket's collective
            can start while earlier layers' gradients are still computed; a
            larger variable gets a bucket of its own. ``None``: one bucket per
            dtype and placement, the fewest collectives.
        shard_alignment: round shard sizes up to a multiple of this.
        skip_nonfinite: if an update is not finite on any worker (a NaN/Inf
            gradient, or one whose square overflows the optimizer state),
            skip the step on every worker (weights, state and ``iterations``
            unchanged) so shards never diverge. Keras' Adam would write NaN
            weights. Decided from the gathered parameters, so it costs no
            collective; it also skips steps while the weights themselves are
            non-finite. Each skip prints a warning and counts in
            ``skipped_steps``.
        max_consecutive_skips: raise an error naming the first variable
            affected once this many steps in a row were skipped (training has
            stalled); ``None`` never raises.
        replicate: variable-name patterns (matched like
            ``exclude_from_weight_decay``'s) whose optimizer state every
            worker keeps whole instead of a 1/N shard. Their gradients are
            all-reduced (a sparse gradient's rows all-gathered) and their
            update computed on every worker, so no parameters are gathered
            for them. Default: Keras' ``Embedding`` tables (``"embeddings"``):
            for a table whose gradient touches few rows this exchanges those
            rows instead of all-gathering the whole updated table every step
            (measured faster), at the price of the table's full ``m``, ``v``
            on every worker; ``replicate=[]`` shards them too (see
            ``distadam plan`` for the trade-off on your model).
        row_sparse: variable-name patterns of variables whose gradients
            arrive as rows (``tf.IndexedSlices``); each gets a bucket of its
            own, so only the rows a step touches are exchanged (all-gathered;
            duplicates add up, as densifying does) instead of the whole
            table. Default: ``"embeddings"``. A variable matched here whose
            gradient is dense is reduced like any bucket; an IndexedSlices
            gradient of a variable sharing a bucket is densified into it.
        min_shard_elements: a bucket with fewer elements keeps its state
            whole on every worker (all-reduced, updated everywhere, never
            gathered). Default 0: every bucket is sharded, each worker holds
            1/N. Sharding a bucket saves (N-1)/N of its state but costs a
            second collective per step (~5 ms on loopback gRPC, less on a
            cluster's fabric); for a model of a few hundred thousand
            parameters ``min_shard_elements=2**20`` (at most 8 MiB of float32
            ``m`` + ``v`` kept whole) made the step measurably faster (see
            benchmarks/README.md).
        shard_group_size: hybrid sharding: shard the state over groups of
            this many consecutive workers and replicate it across the groups
            (must divide the number of workers). Gradients are
            reduce-scattered within the group and the shards all-reduced
            across groups; parameters are all-gathered within the group only.
            On a cluster, set it to the devices per node: the gathers stay on
            the node's links and 1/G of each bucket crosses the network (see
            ``distadam plan``). Default ``None``: all workers, each holds 1/N.
        fused_update: compile each bucket's shard update with XLA into one
            pass (default); ``False`` runs it op by op, bit for bit the
            arithmetic of ``keras.optimizers.Adam``.

    Gradients are summed across workers once, inside the optimizer, as Keras
    does; ``model.fit`` scales the loss by 1/N so the sum is the mean. In a
    custom loop scale the per-replica loss by 1/global_batch (e.g.
    ``tf.nn.compute_average_loss``), as with any tf.distribute optimizer.
    A sparse gradient (``tf.IndexedSlices``) of a variable alone in its
    bucket travels as rows (every worker keeps the rows in its shard;
    duplicates add up, as densifying does); elsewhere it is densified into
    the bucket. Under Horovod (no strategy scales the loss) gradients are averaged over
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
        bucket_elements=DEFAULT_BUCKET_ELEMENTS,
        shard_alignment=1,
        skip_nonfinite=True,
        max_consecutive_skips=100,
        replicate=("embeddings",),
        row_sparse=("embeddings",),
        min_shard_elements=0,
        shard_group_size=None,
        fused_update=True,
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
            skip_nonfinite=skip_nonfinite, replicate=replicate, row_sparse=row_sparse,
            min_shard_elements=min_shard_elements, shard_group_size=shard_group_size,
            fused_update=fused_update, max_consecutive_skips=max_consecutive_skips,
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
        self.max_consecutive_skips = None if max_consecutive_skips is None else int(max_consecutive_skips)
        self.replicate = tuple(replicate)
        self.row_sparse = tuple(row_sparse)
        self.min_shard_elements = int(min_shard_elements)
        self.shard_group_size = None if shard_group_size is None else int(shard_group_size)
        self.fused_update = bool(fused_update)
        hooks.set_untracked(self, "_collectives", None)
        hooks.set_untracked(self, "_shard_collectives", None)
        hooks.set_untracked(self, "_layout", None)
        hooks.set_untracked(self, "_state", None)
        # Compiled per-bucket functions, traced once and reused by every step
        # (and by every eager apply_gradients call).
        hooks.set_untracked(self, "_compiled", {})

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
        # The workers one copy of the state is sharded over: all of them, or
        # a group of shard_group_size (hybrid sharding).
        shard_collectives = hybrid.shard_group(collectives, self.shard_group_size)
        layout = plan_layout(
            var_list,
            num_shards=shard_collectives.num_workers,
            bucket_elements=self.bucket_elements,
            shard_alignment=self.shard_alignment,
            replicated=[i for i, v in enumerate(var_list) if _matches(v, self.replicate)],
            separate=[i for i, v in enumerate(var_list) if _matches(v, self.row_sparse)],
            min_shard_elements=self.min_shard_elements,
        )
        hooks.set_untracked(self, "_collectives", collectives)
        hooks.set_untracked(self, "_shard_collectives", shard_collectives)
        hooks.set_untracked(self, "_layout", layout)
        # Workers must agree on the layout. Checked now with one tiny eager
        # all-reduce when possible; a first build inside a traced step cannot
        # communicate eagerly, so the check then rides on every all-gather.
        hooks.set_untracked(self, "_layout_verified", collectives.num_workers == 1)
        if collectives.num_workers > 1 and tf.executing_eagerly():
            self._verify_same_layout_everywhere()
            self._layout_verified = True
        hooks.set_untracked(self, "_state", ShardedState(layout, shard_collectives, self._state_kinds(),
                                                         self._new_state_variable))
        with tf.init_scope():
            # A tf.Variable, not a Keras one: it stays out of `variables`, so
            # saved state keeps keras.optimizers.Adam's exact layout.
            skipped = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            consecutive = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="consecutive_skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        hooks.set_untracked(self, "_skipped_steps", skipped)
        hooks.set_untracked(self, "_consecutive_skips", consecutive)
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
        # Sparse gradients stay sparse: a bucket holding one variable with an
        # IndexedSlices gradient exchanges its rows instead of the whole table.
        # Keras' apply() divides every gradient by loss_scale_factor, which a
        # plain IndexedSlices does not support.
        grads = [_DivisibleSlices.of(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(grads, trainable_variables)

    def _backend_apply_gradients(self, grads, trainable_variables):
        grads = {self._get_variable_index(v): g for g, v in zip(grads, trainable_variables)}
        step = _StepContext(self, grads)
        buckets = self._layout.buckets
        step.learning_rate = _checked_learning_rate(step.learning_rate, step.iterations)

        # 1 + 2. Flatten each bucket's local gradients and sum them over the
        #        workers; this worker receives only its shard of the sum.
        grad_shards = [self._reduce(step, b) for b in range(len(buckets))]
        grad_shards = self._accumulate(step, grad_shards)
        # 3. Clip on the global picture (statistics summed over workers once).
        clip = self._clip_inputs(step, grad_shards)
        # 4. Weight decay and Adam on this worker's shard; nothing written yet.
        proposals = [self._propose(step, b, grad, clip) for b, grad in enumerate(grad_shards)]
        # 5. All-gather the new parameters; every worker commits or skips alike.
        self._gather_and_commit(step, proposals)

    def _reduce(self, step, b):
        """Bucket ``b``'s gradient reduced over workers: this worker's shard
        (the whole bucket if replicated)."""
        shard = self._reduce_sum(step, b)
        divisor = self._collectives.gradient_divisor
        return shard if divisor == 1 else shard / tf.cast(divisor, shard.dtype)

    def _reduce_sum(self, step, b):
        bucket = self._layout.buckets[b]
        collectives = self._collectives  # all workers
        name = f"bucket{b}_gradients"
        sparse = step.sparse_gradient(bucket)
        if sparse is not None and collectives.num_workers > 1:
            # Row-sparse exchange: every worker receives all workers' rows and
            # keeps those inside its shard; duplicates add, as densifying does.
            (segment,) = bucket.segments
            rows = collectives.all_gather_rows(bucket_ops.pack_rows(sparse.indices, sparse.values), name=name)
            indices, values = bucket_ops.unpack_rows(rows, bucket_ops.row_width(segment))
            return bucket_ops.shard_from_rows(bucket, segment, indices, values, step.worker)
        flat = bucket_ops.flatten(bucket, step.dense_grads(bucket))
        if bucket.replicated:
            return collectives.all_reduce_sum(flat, name=name)
        # Summed over all workers; this worker receives its shard.
        return self._shard_collectives.reduce_scatter_sum(flat, name=name)

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

    def _clip_inputs(self, step, grad_shards):
        """What norm clipping needs from the global picture, as Keras clips the
        full gradient: partial sums of squares over this worker's shards,
        summed over workers in ONE small all-reduce (the total for
        ``global_clipnorm``, one per variable for ``clipnorm``). A replicated
        bucket is the same on every worker, so its squares are added once,
        after the all-reduce; under hybrid sharding the sum spans one group,
        which holds every (already global) gradient element once. Without
        norm clipping nothing is launched."""
        buckets = self._layout.buckets
        sharded = [b for b, bucket in enumerate(buckets) if not bucket.replicated]
        replicated = [b for b, bucket in enumerate(buckets) if bucket.replicated]
        if self._global_clipnorm_active():
            total = tf.zeros([], tf.float32)
            if sharded:
                partial = adam_math.total_sum_of_squares([grad_shards[b] for b in sharded])
                total = self._shard_collectives.all_reduce_sum(tf.reshape(partial, [1]), name="norm_statistics")[0]
            if replicated:
                total = total + adam_math.total_sum_of_squares([grad_shards[b] for b in replicated])
            return {"global_clip_scale": adam_math.global_norm_scale(total, self.global_clipnorm)}
        if self._clipnorm_active():
            sums = {
                b: adam_math.segment_sums_of_squares(grad_shards[b], step.segment_ids(b), len(buckets[b].segments))
                for b in range(len(buckets))
            }
            if sharded:
                reduced = self._shard_collectives.all_reduce_sum(
                    tf.concat([sums[b] for b in sharded], axis=0), name="norm_statistics")
                sums.update(zip(sharded, tf.split(reduced, [len(buckets[b].segments) for b in sharded])))
            return {"variable_norm_sums": sums}
        return {}

    def _propose(self, step, b, grad, clip):
        """Weight decay + Adam (+ EMA) on this worker's shard of bucket ``b``
        (see :mod:`distadam.shard_update`), writing nothing: the writes wait
        until every worker's verdict on the step is known."""
        bucket = self._layout.buckets[b]
        variables = hooks.built_variables(self)
        rule = shard_update.UpdateRule(
            beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon, amsgrad=self.amsgrad,
            weight_decay=self.weight_decay,
            decay_flags=tuple(self._decays(seg) for seg in bucket.segments) if self.weight_decay is not None else (),
            gradient_flags=tuple(step.has_gradient(seg) for seg in bucket.segments),
            clipvalue=self.clipvalue if self._clipvalue_active() else None,
            clip_by_variable_norm=self.clipnorm if self._clipnorm_active() else None,
            ema_momentum=self.ema_momentum if self.use_ema else None,
            ema_overwrite_frequency=self.ema_overwrite_frequency if self.use_ema else None,
            accumulating=bool(self.gradient_accumulation_steps),
            guard_nonfinite=self.skip_nonfinite,
        )
        kinds = [kind for kind in self._state.kinds if kind != "accumulator"]
        state = {kind: tf.convert_to_tensor(self._state.variables(kind)[b].value) for kind in kinds}
        worker = step.shard_index(bucket)
        static_worker = tf.get_static_value(worker)
        static_worker = None if static_worker is None else int(static_worker)
        sources = {seg.variable_index: tf.convert_to_tensor(variables[seg.variable_index])
                   for seg in bucket.segments}
        if static_worker is not None:
            # Only the variables this shard overlaps are read.
            owned = {seg.variable_index for seg, _, _ in bucket.owned_pieces(int(static_worker))}
            sources = {index: value for index, value in sources.items() if index in owned}

        def update(grad, sources, state, learning_rate, iterations, dynamic_worker, is_update_step,
                   global_clip_scale, variable_norm_sums):
            return shard_update.new_shard(
                bucket, rule, grad=grad, param_sources=sources, state=state, learning_rate=learning_rate,
                iterations=iterations,
                worker=int(static_worker) if static_worker is not None else dynamic_worker,
                is_update_step=is_update_step, global_clip_scale=global_clip_scale,
                variable_norm_sums=variable_norm_sums)

        inputs = (grad, sources, step.learning_rate, step.iterations,
                  None if static_worker is not None else worker, step.is_update_step,
                  clip.get("global_clip_scale"), clip.get("variable_norm_sums", {}).get(b))
        key = (b, rule, static_worker)
        if ("params",) + key not in self._compiled:
            self._compiled[("params",) + key] = shard_update.compiled(
                lambda grad, sources, state, *rest: update(grad, sources, state, *rest)[0], self.fused_update)
            self._compiled[("state",) + key] = shard_update.compiled(
                shard_update.in_place(update), self.fused_update)
        new_param = self._compiled[("params",) + key](inputs[0], inputs[1], state, *inputs[2:])

        # The state is computed again once the step's verdict is known and
        # written in place (see shard_update.in_place): storing it now
        # would take three more passes over the shard and a copy of each
        # state kind into its variable.
        handles = {kind: hooks.local_handle(self._state.variables(kind)[b]) for kind in kinds}
        dtypes = {kind: self._state.variables(kind)[b].dtype for kind in kinds}
        write_state = self._compiled[("state",) + key]

        def commit(update_state, update_average):
            write_state(handles, dtypes, update_state, update_average, *inputs)

        return _Proposal(new_param, commit)

    def _gather_and_commit(self, step, proposals):
        """All-gather every sharded bucket's new parameters, then write: the
        accumulator, the state shards (on update steps), the EMA and the
        model variables, or nothing at all if the step is skipped."""
        buckets = self._layout.buckets
        new_values, finite, checks = [], [], []
        for b, (bucket, proposal) in enumerate(zip(buckets, proposals)):
            flat, bucket_checks = self._gather_params(step, b, bucket, proposal.params)
            checks += bucket_checks
            # Each variable's new value is a view of the gathered buffer (a
            # split along the first dimension shares memory where aligned),
            # handed to the assignment below as it is; splitting inside XLA
            # wrote every element once more (~1.9 ms for 2.4M float32 here).
            new_values.append([tensor for _, tensor in bucket_ops.unflatten(bucket, flat)])
            if self.skip_nonfinite:
                key = ("finite", b)
                if key not in self._compiled:
                    self._compiled[key] = shard_update.compiled(
                        lambda flat, bucket=bucket: bucket_ops.segments_finite(bucket, flat), self.fused_update)
                finite.append(self._compiled[key](flat))

        # A NaN/Inf gradient element makes the parameter it updates non-finite
        # (Adam propagates it; the update also poisons a parameter whose state
        # overflowed), so the gathered parameters carry every worker's verdict:
        # all workers see the same values and take the same decision, with no
        # extra collective. Padding is never part of it.
        step_ok = None
        if self.skip_nonfinite:
            step_ok = tf.reduce_all(tf.concat(finite, axis=0))
        apply_update = step.is_update_step
        if step_ok is not None:
            apply_update = step_ok if apply_update is None else tf.logical_and(apply_update, step_ok)

        variables = hooks.built_variables(self)
        with tf.control_dependencies(checks):
            _commit_if(step_ok, step.accumulator_writes)
            targets, values = [], []
            for bucket, proposal, tensors in zip(buckets, proposals, new_values):
                # m, v (v_hat) on update steps, the EMA on every good step.
                proposal.commit(apply_update, step_ok)
                pairs = [(variables[seg.variable_index], tensor)
                         for seg, tensor in zip(bucket.segments, tensors) if step.has_gradient(seg)]
                if step_ok is not None and pairs:
                    # Model variables may only be written outside control flow
                    # under a multi-device strategy: select, then assign.
                    kept = tf.cond(step_ok, lambda p=pairs: [tf.identity(t) for _, t in p],
                                   lambda p=pairs: [v.value for v, _ in p])
                    pairs = [(v, t) for (v, _), t in zip(pairs, kept)]
                targets += [v for v, _ in pairs]
                values += [t for _, t in pairs]
            self._collectives.assign_replicated(targets, values)

        if step_ok is not None:
            skipped = tf.logical_not(step_ok)
            self._skipped_steps.assign_add(tf.cast(skipped, tf.int64))
            # Keras' apply() adds 1 after this method; a skipped step must leave
            # `iterations` (and so the schedule) where it was.
            self._iterations.assign_sub(tf.cast(skipped, self._iterations.dtype))
            self._report_skips(skipped, tf.concat(finite, axis=0))

    def _report_skips(self, skipped, finite):
        """Make skipped steps visible: a warning on each, and an error once
        ``max_consecutive_skips`` steps in a row were skipped, naming the
        first variable whose update was not finite: training has stalled, as
        DeepSpeed reports when the loss scale hits its floor. Inside an
        XLA-compiled step only the counters are kept."""
        consecutive = self._consecutive_skips.assign(
            tf.where(skipped, self._consecutive_skips + 1, tf.zeros([], tf.int64)))
        if _tf_internals.in_xla_context():
            # XLA can neither print nor carry the variable's name (a string);
            # the counters above still tell (`skipped_steps`).
            return
        names = tf.constant([seg.name for bucket in self._layout.buckets for seg in bucket.segments])
        culprit = tf.gather(names, tf.argmin(tf.cast(finite, tf.int32), output_type=tf.int32))
        tf.cond(skipped, lambda: _print_skip(self._skipped_steps, consecutive, culprit), tf.no_op)
        if self.max_consecutive_skips is not None:
            tf.debugging.Assert(
                consecutive <= self.max_consecutive_skips,
                ["distadam: training has stalled:", consecutive, "consecutive steps skipped "
                 f"(max_consecutive_skips={self.max_consecutive_skips}) because the update is not finite; "
                 "the first variable affected is", culprit, "- a NaN/Inf gradient on some worker, a "
                 "gradient whose square overflows the optimizer state (above ~1.8e19 in float32, 256 in "
                 "float16), or non-finite weights. Lower the learning rate, clip gradients, or use "
                 "distadam.LossScaleOptimizer for float16."],
                summarize=3,
            )

    def _gather_params(self, step, b, bucket, params):
        """All-gather this worker's new parameter shard (a replicated bucket's
        parameters are already whole). If the layout or the backend's member
        order was not established when the optimizer was built (built inside
        a traced step), the shard carries a trailer: this worker's layout
        fingerprint and its index; every worker asserts that all fingerprints
        match its own and that row w of the gather came from worker w, before
        anything is written.

        Returns (flat parameters of the bucket, [assertions])."""
        collectives = self._shard_collectives
        if collectives.num_workers == 1 or bucket.replicated:
            return params, []
        name = f"bucket{b}_params"
        if self._layout_verified and collectives.member_order_established:
            return collectives.all_gather(params, name=name), []
        fingerprint = tf.constant(self._layout.fingerprint(), bucket.dtype)
        # The index as two base-128 digits: exact in every float dtype
        # (bfloat16 holds integers up to 256) for up to 16384 workers.
        digits = tf.cast(tf.stack([step.worker // 128, step.worker % 128]), bucket.dtype)
        trailer = tf.concat([fingerprint, digits], axis=0)
        width = bucket.shard_size + int(trailer.shape[0])
        gathered = collectives.all_gather(tf.concat([params, trailer], axis=0), name=name)
        rows = tf.reshape(gathered, [collectives.num_workers, width])
        fingerprints = rows[:, bucket.shard_size:bucket.shard_size + int(fingerprint.shape[0])]
        same_layout = tf.debugging.assert_equal(
            fingerprints, tf.broadcast_to(fingerprint, tf.shape(fingerprints)),
            message=(
                "distadam: workers disagree on the trainable variables (number, shapes, "
                "dtypes or order). Every worker must build the same model before training."
            ),
        )
        senders = tf.cast(rows[:, -2] * 128 + rows[:, -1], tf.int32)
        worker_order = tf.debugging.assert_equal(
            senders, tf.range(collectives.num_workers, dtype=tf.int32),
            message=(
                f"distadam: the {collectives.name} backend's gather returned the workers' shards out of "
                "worker order (the collective's member order predicted when the optimizer was built "
                "inside a traced step was wrong); nothing was written. Build the optimizer before the "
                "first step, e.g. optimizer.build(model.trainable_variables) inside strategy.scope(), "
                "so that the order is probed. Row senders:"
            ),
        )
        return tf.reshape(rows[:, : bucket.shard_size], [-1]), [same_layout, worker_order]

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
    def shard_collectives(self):
        """The collectives over the workers that share one copy of the state:
        :attr:`collectives` itself, or under hybrid sharding
        (``shard_group_size`` < workers) a
        :class:`distadam.collectives.hybrid.ShardGroupCollectives` whose
        ``num_workers`` is the group size and ``worker_index`` the position
        in the group (= the shard held)."""
        self._require_built("shard_collectives")
        return self._shard_collectives

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
    def consecutive_skipped_steps(self) -> int:
        """Steps skipped in a row up to now (0 after a good step)."""
        self._require_built("consecutive_skipped_steps")
        return int(self._consecutive_skips.numpy())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because an update was not finite on some worker."""
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
                "max_consecutive_skips": self.max_consecutive_skips,
                "replicate": list(self.replicate),
                "row_sparse": list(self.row_sparse),
                "min_shard_elements": self.min_shard_elements,
                "shard_group_size": self.shard_group_size,
                "fused_update": self.fused_update,
            }
        )
        return config


class _StepContext:
    """What one traced step knows about itself: the gradients it got, this
    worker's index, the learning rate and iteration it runs at, and (lazily)
    the segment ids of each bucket's shard."""

    def __init__(self, optimizer, grads):
        self.grads = grads  # {variable index: local gradient (dense or IndexedSlices)}
        self.layout = optimizer._layout
        # The shard this worker holds (its position in its group when the
        # state is sharded over groups).
        self.worker = optimizer._shard_collectives.worker_index()
        self.learning_rate = tf.convert_to_tensor(optimizer.learning_rate)
        # Accumulated iterations, as Keras' Adam uses.
        self.iterations = tf.convert_to_tensor(optimizer.iterations)
        self.is_update_step = None  # set when accumulating
        self.accumulator_writes = []
        self._segment_ids = {}

    def has_gradient(self, seg) -> bool:
        return seg.variable_index in self.grads

    def shard_index(self, bucket):
        """The shard this worker holds of ``bucket``."""
        return tf.constant(0, tf.int32) if bucket.replicated else self.worker

    def sparse_gradient(self, bucket):
        """The IndexedSlices gradient of a bucket that holds exactly one
        variable and got its gradient as rows, else None (densified)."""
        if len(bucket.segments) != 1:
            return None
        grad = self.grads.get(bucket.segments[0].variable_index)
        return grad if isinstance(grad, tf.IndexedSlices) else None

    def dense_grads(self, bucket) -> dict:
        return {seg.variable_index: tf.convert_to_tensor(self.grads[seg.variable_index])
                for seg in bucket.segments if seg.variable_index in self.grads}

    def segment_ids(self, b):
        if b not in self._segment_ids:
            bucket = self.layout.buckets[b]
            self._segment_ids[b] = bucket_ops.segment_ids(bucket, self.shard_index(bucket))
        return self._segment_ids[b]


class _DivisibleSlices(tf.IndexedSlices):
    """An IndexedSlices that Keras' ``apply`` can divide by the loss scale."""

    @classmethod
    def of(cls, slices):
        return cls(slices.values, slices.indices, slices.dense_shape)

    def __truediv__(self, scale):
        return _DivisibleSlices(self.values / scale, self.indices, self.dense_shape)


def _matches(variable, patterns) -> bool:
    """Whether a name pattern matches ``variable``'s path, as
    ``exclude_from_weight_decay``'s ``var_names`` do."""
    name = str(getattr(variable, "path", None) or variable.name)
    return any(pattern in name for pattern in patterns)


def _checked_learning_rate(learning_rate, iterations):
    """The step's learning rate, after checking it is finite and >= 0 (a
    schedule or a callable can produce anything; NaN would skip every step
    silently and a negative rate ascends the loss)."""
    learning_rate = tf.convert_to_tensor(learning_rate)
    check = tf.debugging.Assert(
        tf.logical_and(tf.reduce_all(tf.math.is_finite(learning_rate)), tf.reduce_all(learning_rate >= 0)),
        ["distadam: the learning rate at iteration", iterations, "is", learning_rate,
         "- it must be finite and >= 0 (check the schedule or callable)."],
    )
    with tf.control_dependencies([check]):
        return tf.identity(learning_rate)


def _print_skip(total, consecutive, culprit):
    tf.print("distadam: skipped a step with a non-finite update (first variable affected:", culprit,
             "); skipped", consecutive, "in a row,", total, "in all", output_stream=sys.stderr)
    return tf.no_op()


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
    # commit(update_state, update_average): writes the new state (m, v,
    # v_hat where update_state holds; the EMA where update_average holds;
    # None: always).
    commit: typing.Callable
