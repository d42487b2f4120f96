"""ShardedAdam: Keras' Adam with its state partitioned across workers (ZeRO-1).

This module is the Keras-facing surface: the constructor (every argument of
``keras.optimizers.Adam``, plus the sharding ones, declared once in
:mod:`distadam.arguments`), ``build`` (the topology, the layout, the state
and the step), the public accessors, Keras-format saving and the EMA
interface. The step itself, in five stages (reduce, accumulate, clip on the
global picture, update this worker's shard, gather and commit), is
:class:`distadam.sharded_step.ShardedStep`; it runs where Keras' ``apply``
hands over (``_backend_apply_gradients``).

Collectives per step: one reduce-scatter and one all-gather per bucket, plus
one small all-reduce in total when clipping by norm, whatever the number of
variables.

Where the other pieces live: the math in :mod:`distadam.adam_math` and
:mod:`distadam.shard_update`, the partition in :mod:`distadam.partition` (its
TensorFlow side in :mod:`distadam.bucket_ops`), the communicators in
:mod:`distadam.topology` and :mod:`distadam.collectives`, the state variables
in :mod:`distadam.state`, Keras-format saving in :mod:`distadam.keras_format`,
and Keras' private hooks in :mod:`distadam._keras_internals`.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from distadam import _keras_internals as hooks
from distadam import arguments, bucket_ops, cost_model, keras_format, multiworker_fit
from distadam.collectives import resolve_backend
from distadam.partition import DEFAULT_BUCKET_ELEMENTS, Layout, plan_layout
from distadam.sharded_step import ShardedStep, StepConfig
from distadam.state import ShardedState, ShardStateVariable
from distadam.topology import Topology

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
        bucket_elements: cap on elements per flat bucket (default 2**22; laid
            out last layer first, a larger variable gets a bucket of its own);
            a step holds a few buckets of temporary buffers. ``"auto"``: sized
            from the number of workers so that latency keeps communication
            within 5 % of Keras Adam's all-reduce on any network the planner
            knows, for more memory (:func:`distadam.partition.auto_bucket_elements`);
            ``None``: one bucket per dtype and placement.
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
            1/N. Sharding a bucket saves (N-1)/N of its state for a second
            collective per step (~5 ms on loopback gRPC); for a model of a few
            hundred thousand parameters ``min_shard_elements=2**20`` made the
            step measurably faster (benchmarks/README.md).
        shard_group_size: hybrid sharding: shard the state over groups of
            this many consecutive workers and replicate it across the groups
            (must divide the number of workers). Gradients are
            reduce-scattered within the group and the shards all-reduced
            across groups; parameters are all-gathered within the group only.
            ``"auto"``: one node's workers when the job spans several
            (:func:`distadam.topology.auto_group_size`; 1/G of each bucket
            crosses the network). Default ``None``: all workers (1/N each).
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
        base, own = arguments.split_constructor_arguments(
            {name: value for name, value in locals().items() if name not in ("self", "name", "kwargs")})
        super().__init__(name=name or "sharded_adam", **base, **kwargs)
        for attribute, value in own.items():
            setattr(self, attribute, value)
        hooks.set_untracked(self, "_topology", None)
        hooks.set_untracked(self, "_layout", None)
        hooks.set_untracked(self, "_state", None)
        hooks.set_untracked(self, "_step", None)
        # Created in a multi-worker strategy.scope(): make model.fit work there
        # (keras-team/keras#20585; fit needs it before it builds the optimizer).
        multiworker_fit.enable_if_multi_worker(tf.distribute.get_strategy())

    # ------------------------------------------------------------------ build
    def build(self, var_list):
        """Lay out ``var_list`` and allocate this worker's shards of the state
        (under ``strategy.scope()`` before the first step, or by the first step)."""
        if self.built:
            return
        # Not super().build(): Keras would allocate full-size EMA copies and
        # gradient accumulators; here they are sharded like m and v.
        var_list = list(var_list)
        hooks.register_built_variables(self, var_list)
        if tf.distribute.has_strategy():
            hooks.set_distribution_strategy(self, tf.distribute.get_strategy())
            multiworker_fit.enable_if_multi_worker(tf.distribute.get_strategy())
        # All workers, and the workers one copy of the state is sharded over
        # (all of them, or a group of shard_group_size: hybrid sharding).
        topology = Topology.build(resolve_backend(self.backend), self.shard_group_size)
        layout = plan_layout(
            var_list,
            num_shards=topology.group_size,
            num_workers=topology.num_workers,
            bucket_elements=self.bucket_elements,
            shard_alignment=self.shard_alignment,
            replicated=[i for i, v in enumerate(var_list) if arguments.name_matches(v, self.replicate)],
            separate=[i for i, v in enumerate(var_list) if arguments.name_matches(v, self.row_sparse)],
            min_shard_elements=self.min_shard_elements,
        )
        hooks.set_untracked(self, "_topology", topology)
        hooks.set_untracked(self, "_layout", layout)
        # Workers must agree on the layout. Checked now with one tiny eager
        # all-reduce when possible; a first build inside a traced step cannot
        # communicate eagerly, so the check then rides on every all-gather.
        verified = topology.num_workers == 1
        if topology.num_workers > 1 and tf.executing_eagerly():
            topology.check_same_layout(layout)
            verified = True
        # The state kinds are named once, in cost_model (the planner counts them too).
        kinds = cost_model.state_kinds(self.amsgrad, self.use_ema, self.gradient_accumulation_steps)
        state = ShardedState(layout, topology.shard_group, kinds, self._new_state_variable)
        hooks.set_untracked(self, "_state", state)
        with tf.init_scope():
            # tf.Variables, not Keras ones: they stay out of `variables`, so
            # saved state keeps keras.optimizers.Adam's exact layout.
            counters = [
                tf.Variable(0, dtype=tf.int64, trainable=False, name=name,
                            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                for name in ("skipped_steps", "consecutive_skipped_steps")
            ]
        hooks.set_untracked(self, "_step", ShardedStep(
            layout=layout, topology=topology, state=state, variables=var_list,
            decays=[hooks.uses_weight_decay(self, v) for v in var_list], config=self._step_config(),
            counters=counters, verified=verified))
        self.built = True

    def _step_config(self) -> StepConfig:
        def active(threshold):
            return threshold if threshold and threshold > 0 else None

        return StepConfig(
            beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon, amsgrad=self.amsgrad,
            weight_decay=self.weight_decay, clipvalue=active(self.clipvalue), clipnorm=active(self.clipnorm),
            global_clipnorm=active(self.global_clipnorm),
            ema_momentum=self.ema_momentum if self.use_ema else None,
            ema_overwrite_frequency=self.ema_overwrite_frequency if self.use_ema else None,
            accumulation_steps=self.gradient_accumulation_steps or None,
            skip_nonfinite=self.skip_nonfinite, max_consecutive_skips=self.max_consecutive_skips,
            fused_update=self.fused_update,
        )

    def _new_state_variable(self, name, shape, dtype, options):
        # init_scope: a first apply_gradients inside tf.function must not
        # leave lifted, conditionally initialised state behind.
        with tf.init_scope(), keras.name_scope(self.name, caller=self):
            variable = ShardStateVariable(
                initializer=keras.initializers.Zeros(), shape=shape, dtype=dtype,
                trainable=False, name=name, **options,
            )
        hooks.track_variable(self, variable)
        return variable

    # ------------------------------------------------------------------- step
    def apply(self, grads, trainable_variables=None):
        """Apply one step, as ``keras.optimizers.Optimizer.apply``; sparse
        (``tf.IndexedSlices``) gradients stay sparse."""
        # Sparse gradients stay sparse: a bucket holding one variable with an
        # IndexedSlices gradient exchanges its rows instead of the whole table.
        # Keras' apply() divides every gradient by loss_scale_factor, which a
        # plain IndexedSlices does not support.
        grads = [bucket_ops.DivisibleSlices.of(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(grads, trainable_variables)

    def _backend_apply_gradients(self, grads, trainable_variables):
        # Keras' apply() hands over here after filtering empty gradients and
        # unscaling loss_scale_factor, and adds 1 to `iterations` after it.
        grads = {hooks.variable_index(self, v): g for g, v in zip(grads, trainable_variables)}
        raw_iterations = hooks.iterations_variable(self)
        result = self._step.run(grads, learning_rate=self.learning_rate, iterations=self.iterations,
                                raw_iterations=raw_iterations)
        if result.skipped is not None:
            # A skipped step must leave `iterations` (and so the schedule)
            # where it was: undo the increment Keras makes after this method.
            raw_iterations.assign_sub(tf.cast(result.skipped, raw_iterations.dtype))

    # ------------------------------------------------------ public accessors
    @property
    def topology(self) -> Topology:
        """The communicators ``everyone`` and ``shard_group``, and where every
        worker sits (:class:`distadam.topology.Topology`)."""
        self._require_built("topology")
        return self._topology

    @property
    def collectives(self):
        """All workers' collectives: ``topology.everyone``."""
        return self.topology.everyone

    @property
    def shard_collectives(self):
        """``topology.shard_group``: the workers sharing one copy of the state
        (:attr:`collectives` itself unless ``shard_group_size`` < workers)."""
        return self.topology.shard_group

    @property
    def layout(self) -> Layout:
        """The static partition: buckets, shard sizes, who owns what."""
        self._require_built("layout")
        return self._layout

    @property
    def sharded_state(self) -> ShardedState:
        """The sharded state variables and their eager operations."""
        self._require_built("sharded_state")
        return self._state

    @property
    def num_shards(self) -> int:
        self._require_built("num_shards")
        return self._layout.num_shards

    @property
    def iterations_variable(self):
        """The variable counting ``apply`` calls (micro-steps under gradient
        accumulation; ``iterations`` divides it, as in Keras)."""
        return hooks.iterations_variable(self)

    @property
    def consecutive_skipped_steps(self) -> int:
        """Steps skipped in a row up to now (0 after a good step)."""
        self._require_built("consecutive_skipped_steps")
        return int(self._step.consecutive_skips.numpy())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because an update was not finite on some worker."""
        self._require_built("skipped_steps")
        return int(self._step.skipped_steps.numpy())

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._require_built("skipped_steps")
        self._step.skipped_steps.assign(int(value))

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

    # ------------------------------------------------ Keras' EMA interface
    @property
    def _model_variables_moving_average(self):
        """The EMA of each trainable variable, full-shaped, as Keras'
        optimizers keep it, for code that reads it by this name
        (``keras.callbacks.SwapEMAWeights``, Keras' own optimizer tests): a
        mirror of the sharded EMA (:func:`distadam.keras_format.ema_mirror`).
        Without ``use_ema`` there is no such attribute, as in Keras."""
        if not self.use_ema or not self.built:
            raise AttributeError("_model_variables_moving_average exists once a use_ema=True optimizer is built")
        return keras_format.ema_mirror(self)

    # ------------------------------------------------------------- overrides
    def finalize_variable_values(self, var_list):
        """With ``use_ema``, overwrite ``var_list`` with the EMA weights (end of ``fit``)."""
        if self.use_ema and self.built:
            self._overwrite_model_variables_with_average_value(var_list)

    def _overwrite_model_variables_with_average_value(self, trainable_variables):
        keras_format.write_average_into(self, trainable_variables)

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
        """Keras' config plus ShardedAdam's own arguments."""
        config = super().get_config()
        config.update(arguments.own_config(self))
        return config
