"""One optimizer step over a fixed layout and topology, in five stages.

:class:`ShardedStep` is what :class:`distadam.ShardedAdam` runs inside Keras'
``apply``; it knows nothing of Keras. Built once per layout, it owns the
compiled per-bucket functions (traced once, reused by every step and every
eager ``apply_gradients``):

1. reduce: flatten each bucket's local gradients and sum them over the
   workers; this worker receives its shard of the sum (the whole bucket if
   replicated; only the rows it holds for a row-sparse bucket);
2. accumulate (``gradient_accumulation_steps``): add the shard to the
   accumulator and use the accumulated mean;
3. clip on the global picture: per-shard sums of squares combined with one
   small all-reduce over the shard group;
4. propose: weight decay + Adam (+ EMA) on this worker's shard, writing
   nothing (:mod:`distadam.shard_update`);
5. gather and commit: all-gather the new parameters; a non-finite value on any
   worker shows in the gathered parameters, so every worker writes (or skips)
   alike, with no extra collective.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

import tensorflow as tf

from distadam import _tf_internals, adam_math, bucket_ops, shard_update
from distadam.partition import Layout
from distadam.state import ShardedState
from distadam.topology import Topology


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The optimizer's arguments as the step uses them (clipping thresholds
    only when active, EMA settings only with ``use_ema``)."""

    beta_1: float
    beta_2: float
    epsilon: float
    amsgrad: bool
    weight_decay: float | None
    clipvalue: float | None
    clipnorm: float | None
    global_clipnorm: float | None
    ema_momentum: float | None
    ema_overwrite_frequency: int | None
    accumulation_steps: int | None
    skip_nonfinite: bool
    max_consecutive_skips: int | None
    fused_update: bool


class ShardInputs(typing.NamedTuple):
    """What a bucket's shard update reads besides its gradient shard, the
    parameters and the state: one typed record, so a new input is one field."""

    learning_rate: tf.Tensor
    iterations: tf.Tensor  # accumulated iterations, as Keras' Adam counts them
    worker: tf.Tensor | None  # the shard held, when not known at trace time
    is_update_step: tf.Tensor | None  # under accumulation
    global_clip_scale: tf.Tensor | None
    variable_norm_sums: tf.Tensor | None  # this bucket's, for clipnorm


class StepResult(typing.NamedTuple):
    skipped: tf.Tensor | None  # whether the step was skipped (None: never skips)


class ShardedStep:
    """Args:
        layout, topology, state: the optimizer's partition, communicators and
            sharded state.
        variables: the model variables in build order.
        decays: for each variable, whether weight decay applies to it.
        config: the arguments.
        counters: (skipped steps, consecutive skipped steps) variables.
        verified: whether the workers' layout and the backend's member order
            were checked when the optimizer was built (else every gather
            carries a check).
    """

    def __init__(self, *, layout: Layout, topology: Topology, state: ShardedState, variables, decays,
                 config: StepConfig, counters, verified: bool):
        self.layout = layout
        self.topology = topology
        self.state = state
        self.variables = list(variables)
        self.decays = list(decays)
        self.config = config
        self.skipped_steps, self.consecutive_skips = counters
        self.verified = verified
        self._compiled = {}  # (what, bucket, rule, static worker) -> function

    # ---------------------------------------------------------------- the step
    def run(self, grads: dict, *, learning_rate, iterations, raw_iterations) -> StepResult:
        """One step. ``grads``: {variable index: local gradient (dense or
        IndexedSlices)}; ``iterations``: Keras' accumulated count;
        ``raw_iterations``: ``apply`` calls so far (micro-steps)."""
        context = _StepContext(self, grads, _checked_learning_rate(learning_rate, iterations), iterations)
        buckets = self.layout.buckets
        shards = [self._reduce(context, b) for b in range(len(buckets))]                # 1
        shards = self._accumulate(context, shards, raw_iterations)                       # 2
        clip = self._clip_statistics(context, shards)                                   # 3
        proposals = [self._propose(context, b, shard, clip) for b, shard in enumerate(shards)]  # 4
        return StepResult(self._gather_and_commit(context, proposals))                  # 5

    # --------------------------------------------------------------- 1. reduce
    def _reduce(self, context, b):
        """Bucket ``b``'s gradient reduced over workers: this worker's shard
        (the whole bucket if replicated)."""
        shard = self._reduce_sum(context, b)
        divisor = self.topology.everyone.gradient_divisor
        return shard if divisor == 1 else shard / tf.cast(divisor, shard.dtype)

    def _reduce_sum(self, context, b):
        bucket = self.layout.buckets[b]
        everyone = self.topology.everyone
        name = f"bucket{b}_gradients"
        sparse = context.sparse_gradient(bucket)
        if sparse is not None and everyone.num_workers > 1:
            # Row-sparse exchange: every worker receives all workers' rows and
            # keeps those inside its shard; duplicates add, as densifying does.
            (segment,) = bucket.segments
            rows = everyone.all_gather_rows(bucket_ops.pack_rows(sparse.indices, sparse.values), name=name)
            indices, values = bucket_ops.unpack_rows(rows, bucket_ops.row_width(segment))
            return bucket_ops.shard_from_rows(bucket, segment, indices, values, context.worker)
        flat = bucket_ops.flatten(bucket, context.dense_grads(bucket))
        if bucket.replicated:
            return everyone.all_reduce_sum(flat, name=name)
        # Summed over all workers; this worker receives its shard.
        return self.topology.shard_group.reduce_scatter_sum(flat, name=name)

    # ----------------------------------------------------------- 2. accumulate
    def _accumulate(self, context, shards, raw_iterations):
        """With gradient accumulation, add the shards to the accumulator and
        return the accumulated mean (which Keras clips and applies); the
        accumulator is reset on update steps. Only this worker's shard is
        accumulated: 1/N of Keras' accumulator memory."""
        steps = self.config.accumulation_steps
        if not steps:
            return shards
        context.is_update_step = (raw_iterations + 1) % steps == 0
        accumulators = self.state.variables("accumulator")
        totals = [shard + accumulator.value for shard, accumulator in zip(shards, accumulators)]
        context.accumulator_writes = [
            (accumulator,
             tf.cond(context.is_update_step, lambda t=total: tf.zeros_like(t), lambda t=total: t))
            for accumulator, total in zip(accumulators, totals)
        ]
        return [total / steps for total in totals]

    # ----------------------------------------------------------------- 3. clip
    def _clip_statistics(self, context, shards) -> dict:
        """What norm clipping needs from the global picture, as Keras clips the
        full gradient: partial sums of squares over this worker's shards,
        summed over the shard group in ONE small all-reduce (the total for
        ``global_clipnorm``, one per variable for ``clipnorm``). The group
        holds every (already global) gradient element once; a replicated
        bucket is the same on every worker, so its squares are added once,
        after the all-reduce. Without norm clipping nothing is launched."""
        buckets = self.layout.buckets
        group = self.topology.shard_group
        sharded = [b for b, bucket in enumerate(buckets) if not bucket.replicated]
        replicated = [b for b, bucket in enumerate(buckets) if bucket.replicated]
        if self.config.global_clipnorm is not None:
            total = tf.zeros([], tf.float32)
            if sharded:
                partial = adam_math.total_sum_of_squares([shards[b] for b in sharded])
                total = group.all_reduce_sum(tf.reshape(partial, [1]), name="norm_statistics")[0]
            if replicated:
                total = total + adam_math.total_sum_of_squares([shards[b] for b in replicated])
            return {"global_clip_scale": adam_math.global_norm_scale(total, self.config.global_clipnorm)}
        if self.config.clipnorm is not None:
            sums = {
                b: adam_math.segment_sums_of_squares(shards[b], context.segment_ids(b), len(buckets[b].segments))
                for b in range(len(buckets))
            }
            if sharded:
                reduced = group.all_reduce_sum(tf.concat([sums[b] for b in sharded], axis=0),
                                               name="norm_statistics")
                sums.update(zip(sharded, tf.split(reduced, [len(buckets[b].segments) for b in sharded])))
            return {"variable_norm_sums": sums}
        return {}

    # -------------------------------------------------------------- 4. propose
    def _rule(self, context, bucket) -> shard_update.UpdateRule:
        config = self.config
        return shard_update.UpdateRule(
            beta_1=config.beta_1, beta_2=config.beta_2, epsilon=config.epsilon, amsgrad=config.amsgrad,
            weight_decay=config.weight_decay,
            decay_flags=(tuple(self.decays[seg.variable_index] for seg in bucket.segments)
                         if config.weight_decay is not None else ()),
            gradient_flags=tuple(context.has_gradient(seg) for seg in bucket.segments),
            clipvalue=config.clipvalue,
            clip_by_variable_norm=config.clipnorm,
            ema_momentum=config.ema_momentum,
            ema_overwrite_frequency=config.ema_overwrite_frequency,
            accumulating=bool(config.accumulation_steps),
            guard_nonfinite=config.skip_nonfinite,
        )

    def _propose(self, context, b, grad, clip):
        """Weight decay + Adam (+ EMA) on this worker's shard of bucket ``b``,
        writing nothing: the writes wait until every worker's verdict on the
        step is known."""
        bucket = self.layout.buckets[b]
        rule = self._rule(context, bucket)
        kinds = [kind for kind in self.state.kinds if kind != "accumulator"]
        state = {kind: tf.convert_to_tensor(self.state.variables(kind)[b].value) for kind in kinds}
        worker = context.shard_index(bucket)
        static_worker = tf.get_static_value(worker)
        static_worker = None if static_worker is None else int(static_worker)
        sources = {seg.variable_index: tf.convert_to_tensor(self.variables[seg.variable_index])
                   for seg in bucket.segments}
        if static_worker is not None:
            # Only the variables this shard overlaps are read.
            owned = {seg.variable_index for seg, _, _ in bucket.owned_pieces(static_worker)}
            sources = {index: value for index, value in sources.items() if index in owned}
        inputs = ShardInputs(
            learning_rate=context.learning_rate, iterations=context.iterations,
            worker=None if static_worker is not None else worker, is_update_step=context.is_update_step,
            global_clip_scale=clip.get("global_clip_scale"),
            variable_norm_sums=clip.get("variable_norm_sums", {}).get(b))

        def update(grad, sources, state, inputs: ShardInputs):
            return shard_update.new_shard(
                bucket, rule, grad=grad, param_sources=sources, state=state,
                learning_rate=inputs.learning_rate, iterations=inputs.iterations,
                worker=static_worker if static_worker is not None else inputs.worker,
                is_update_step=inputs.is_update_step, global_clip_scale=inputs.global_clip_scale,
                variable_norm_sums=inputs.variable_norm_sums)

        key = (b, rule, static_worker)
        if ("params",) + key not in self._compiled:
            self._compiled[("params",) + key] = shard_update.compiled(
                lambda grad, sources, state, inputs: update(grad, sources, state, inputs)[0],
                self.config.fused_update)
            self._compiled[("state",) + key] = shard_update.compiled(
                shard_update.in_place(update), self.config.fused_update)
        new_param = self._compiled[("params",) + key](grad, sources, state, inputs)

        # The state is computed again once the step's verdict is known and
        # written in place (see shard_update.in_place): storing it now
        # would take three more passes over the shard and a copy of each
        # state kind into its variable.
        handles = {kind: self.state.local_handle(kind, b) for kind in kinds}
        dtypes = {kind: self.state.variables(kind)[b].dtype for kind in kinds}
        write_state = self._compiled[("state",) + key]

        def commit(update_state, update_average):
            write_state(handles, dtypes, update_state, update_average, grad, sources, inputs)

        return _Proposal(new_param, commit)

    # ------------------------------------------------------ 5. gather, commit
    def _gather_and_commit(self, context, proposals):
        """All-gather every sharded bucket's new parameters, then write: the
        accumulator, the state shards (on update steps), the EMA and the
        model variables, or nothing at all if the step is skipped. Returns
        whether the step was skipped (None when it never is)."""
        buckets = self.layout.buckets
        new_values, finite, checks = [], [], []
        for b, (bucket, proposal) in enumerate(zip(buckets, proposals)):
            flat, bucket_checks = self._gather_params(context, b, bucket, proposal.params)
            checks += bucket_checks
            # Each variable's new value is a view of the gathered buffer (a
            # split along the first dimension shares memory where aligned),
            # handed to the assignment below as it is; splitting inside XLA
            # wrote every element once more (~1.9 ms for 2.4M float32 here).
            new_values.append([tensor for _, tensor in bucket_ops.unflatten(bucket, flat)])
            if self.config.skip_nonfinite:
                key = ("finite", b)
                if key not in self._compiled:
                    self._compiled[key] = shard_update.compiled(
                        lambda flat, bucket=bucket: bucket_ops.segments_finite(bucket, flat),
                        self.config.fused_update)
                finite.append(self._compiled[key](flat))

        # A NaN/Inf gradient element makes the parameter it updates non-finite
        # (Adam propagates it; the update also poisons a parameter whose state
        # overflowed), so the gathered parameters carry every worker's verdict:
        # all workers see the same values and take the same decision, with no
        # extra collective. Padding is never part of it.
        step_ok = tf.reduce_all(tf.concat(finite, axis=0)) if self.config.skip_nonfinite else None
        apply_update = context.is_update_step
        if step_ok is not None:
            apply_update = step_ok if apply_update is None else tf.logical_and(apply_update, step_ok)

        with tf.control_dependencies(checks):
            _commit_if(step_ok, context.accumulator_writes)
            targets, values = [], []
            for bucket, proposal, tensors in zip(buckets, proposals, new_values):
                # m, v (v_hat) on update steps, the EMA on every good step.
                proposal.commit(apply_update, step_ok)
                pairs = [(self.variables[seg.variable_index], tensor)
                         for seg, tensor in zip(bucket.segments, tensors) if context.has_gradient(seg)]
                if step_ok is not None and pairs:
                    # Model variables may only be written outside control flow
                    # under a multi-device strategy: select, then assign.
                    kept = tf.cond(step_ok, lambda p=pairs: [tf.identity(t) for _, t in p],
                                   lambda p=pairs: [v.value for v, _ in p])
                    pairs = [(v, t) for (v, _), t in zip(pairs, kept)]
                targets += [v for v, _ in pairs]
                values += [t for _, t in pairs]
            self.topology.everyone.assign_replicated(targets, values)

        if step_ok is None:
            return None
        skipped = tf.logical_not(step_ok)
        self.skipped_steps.assign_add(tf.cast(skipped, tf.int64))
        self._report_skips(skipped, tf.concat(finite, axis=0))
        return skipped

    def _report_skips(self, skipped, finite):
        """Make skipped steps visible: a warning on each, and an error once
        ``max_consecutive_skips`` steps in a row were skipped, naming the
        first variable whose update was not finite: training has stalled, as
        DeepSpeed reports when the loss scale hits its floor. Inside an
        XLA-compiled step only the counters are kept."""
        consecutive = self.consecutive_skips.assign(
            tf.where(skipped, self.consecutive_skips + 1, tf.zeros([], tf.int64)))
        if _tf_internals.in_xla_context():
            # XLA can neither print nor carry the variable's name (a string);
            # the counters above still tell (`skipped_steps`).
            return
        names = tf.constant([seg.name for bucket in self.layout.buckets for seg in bucket.segments])
        culprit = tf.gather(names, tf.argmin(tf.cast(finite, tf.int32), output_type=tf.int32))
        tf.cond(skipped, lambda: _print_skip(self.skipped_steps, consecutive, culprit), tf.no_op)
        limit = self.config.max_consecutive_skips
        if limit is not None:
            tf.debugging.Assert(
                consecutive <= limit,
                ["distadam: training has stalled:", consecutive, "consecutive steps skipped "
                 f"(max_consecutive_skips={limit}) because the update is not finite; "
                 "the first variable affected is", culprit, "- a NaN/Inf gradient on some worker, a "
                 "gradient whose square overflows the optimizer state (above ~1.8e19 in float32, 256 in "
                 "float16), or non-finite weights. Lower the learning rate, clip gradients, or use "
                 "distadam.LossScaleOptimizer for float16."],
                summarize=3,
            )

    def _gather_params(self, context, b, bucket, params):
        """All-gather this worker's new parameter shard within the shard group
        (a replicated bucket's parameters are already whole). If the layout
        or the backend's member order was not established when the optimizer
        was built (built inside a traced step), the shard carries a trailer:
        this worker's layout fingerprint and its index; every worker asserts
        that all fingerprints match its own and that row w of the gather came
        from worker w, before anything is written.

        Returns (flat parameters of the bucket, [assertions])."""
        group = self.topology.shard_group
        if group.num_workers == 1 or bucket.replicated:
            return params, []
        name = f"bucket{b}_params"
        if self.verified and group.member_order_established:
            return group.all_gather(params, name=name), []
        fingerprint = tf.constant(self.layout.fingerprint(), bucket.dtype)
        # The index as two base-128 digits: exact in every float dtype
        # (bfloat16 holds integers up to 256) for up to 16384 workers.
        digits = tf.cast(tf.stack([context.worker // 128, context.worker % 128]), bucket.dtype)
        trailer = tf.concat([fingerprint, digits], axis=0)
        width = bucket.shard_size + int(trailer.shape[0])
        gathered = group.all_gather(tf.concat([params, trailer], axis=0), name=name)
        rows = tf.reshape(gathered, [group.num_workers, width])
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
            senders, tf.range(group.num_workers, dtype=tf.int32),
            message=(
                f"distadam: the {group.name} backend's gather returned the workers' shards out of "
                "worker order (the collective's member order predicted when the optimizer was built "
                "inside a traced step was wrong); nothing was written. Build the optimizer before the "
                "first step, e.g. optimizer.build(model.trainable_variables) inside strategy.scope(), "
                "so that the order is probed. Row senders:"
            ),
        )
        return tf.reshape(rows[:, : bucket.shard_size], [-1]), [same_layout, worker_order]


class _StepContext:
    """What one traced step knows about itself: the gradients it got, this
    worker's shard, the learning rate and iteration it runs at, and (lazily)
    the segment ids of each bucket's shard."""

    def __init__(self, step: ShardedStep, grads, learning_rate, iterations):
        self.grads = grads  # {variable index: local gradient (dense or IndexedSlices)}
        self.layout = step.layout
        # The shard this worker holds (its position in its group when the
        # state is sharded over groups).
        self.worker = step.topology.shard_group.worker_index()
        self.learning_rate = learning_rate
        self.iterations = tf.convert_to_tensor(iterations)
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


class _Proposal(typing.NamedTuple):
    """One bucket's step, computed but not yet written."""

    params: tf.Tensor  # this worker's new parameter shard, to all-gather
    # commit(update_state, update_average): writes the new state (m, v,
    # v_hat where update_state holds; the EMA where update_average holds;
    # None: always).
    commit: typing.Callable


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
