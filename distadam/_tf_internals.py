"""The one seam through which distadam touches TensorFlow's private
internals (the collective launchers, and whether a trace is XLA-compiled). Everything here may break with a TensorFlow release;
everything here therefore fails *softly*: a surprise returns ``None`` /
raises :class:`InternalsUnavailable`, and the caller falls back to the public
``ReplicaContext`` collectives (twice the bytes for a reduce-scatter, but
correct). Tested with TensorFlow 2.21 (the range ``pyproject.toml`` declares).

What is used, and why the public API does not suffice:

* ``cross_device_ops.CollectiveAllReduce._launchers`` / ``._lock``: the
  strategy's per-device ``CollectiveReplicaLauncher`` objects. Issuing our
  collectives through them keeps group keys, instance keys, ordering tokens and
  the communication timeout consistent with every other collective the
  strategy launches (two independent key spaces deadlock or collide).
* ``CollectiveReplicaLauncher._next_instance_key`` / ``._get_ordering_token`` /
  ``._options`` / ``._group_key`` / ``._group_size`` / ``._device``: what a raw
  ``all_to_all_v2`` needs to join the strategy's group. TensorFlow registers no
  CPU reduce-scatter kernel (only NCCL's); all-to-all + a local sum moves the
  same bytes as a ring reduce-scatter. The public path is all-reduce + slice.
* ``CollectiveReplicaLauncher._all_gather``: an all-gather without the shape
  exchange ``ReplicaContext.all_gather`` performs (shards are equal by
  construction): one collective instead of two.
* ``cross_device_utils.CollectiveKeys`` / ``CollectiveReplicaLauncher``:
  launchers of our own, with group keys every process derives alike and a
  range of them per strategy instance: for the whole group (TensorFlow gives
  every strategy instance in a process group key 1 and instance keys from
  100, so a second strategy's gathers would land on keys the first used for
  all-reduces: "Collective instance 100 expected type 0 ... got type 2") and
  for the subgroups of hybrid sharding (a group of workers, or the workers at
  one position across groups). They share the device's ordering token with
  the strategy's launcher, so all collectives on a device run in program order.
* ``StrategyExtended._get_replica_id_in_sync_group``: which replicas this
  process holds, at build time (possibly inside replica context).
* ``StrategyExtended._use_merge_call`` / ``._get_cross_device_ops``: whether
  the strategy runs replica functions with merge_call (not under XLA) and
  which cross-device ops it would use for a float tensor.
* ``values.PerReplica``: to hand each replica its own result from a merge_call.
* ``tf.__internal__.distribute.interim.maybe_merge_call``: writing the
  replicated model variables from replica context, with a merge_call where
  the strategy uses one (Keras' own optimizers use it for the same reason).
  It is the only path here with no fallback: without it no strategy can
  assign a mirrored variable from a step, so a TensorFlow that drops it fails
  loudly at the first step.
* ``Trackable._serialize_to_tensors`` / ``._restore_from_tensors``: the
  hooks through which ``tf.train.Checkpoint`` asks an object for its tensors.
  :class:`PerKeyCheckpoint` overrides them so a state variable saves each
  local worker's shard under a key naming its element range (a plain
  per-replica variable saves one aggregated value, or refuses to save). No
  safe fallback exists: a TensorFlow that stopped calling them would save
  and restore one value for every shard, silently mixing the state. So
  :func:`check_checkpoint_hooks` refuses such a TensorFlow at import, with
  one clear error.
* ``control_flow_util.GraphOrParentsInXlaContext``: whether a step is being
  compiled by XLA, where host-side printing cannot run (the skipped-step
  warning is left out there).
"""

from __future__ import annotations

import types
import weakref

import tensorflow as tf

from distadam.collectives.base import sum_rows
from distadam.collectives.member_order import MemberOrder

_EXPECTED_ERRORS = (AttributeError, ImportError, IndexError, TypeError, KeyError, ValueError)


CHECKPOINT_HOOKS = ("_serialize_to_tensors", "_restore_from_tensors")


def check_checkpoint_hooks(base=None) -> None:
    """Raise ImportError unless ``base`` (TensorFlow's ``Trackable``) has the
    checkpoint hooks :class:`PerKeyCheckpoint` overrides."""
    base = tf.__internal__.tracking.Trackable if base is None else base
    for name in CHECKPOINT_HOOKS:
        if not callable(getattr(base, name, None)):
            raise ImportError(
                f"distadam needs TensorFlow's checkpoint hook Trackable.{name}, which TensorFlow "
                f"{tf.__version__} does not have: without it the sharded optimizer state would be "
                "checkpointed as one value for every worker. distadam is tested with the TensorFlow "
                "range declared in its pyproject.toml.")


check_checkpoint_hooks()


class PerKeyCheckpoint:
    """Mixin for a variable whose checkpoint is several tensors, one per key:
    the subclass yields ``(key, component)`` pairs from ``checkpoint_items()``,
    each ``component`` a ``tf.Variable`` saved and restored under ``key``.
    Put it before the variable class in the bases, so its hooks win."""

    def checkpoint_items(self):
        raise NotImplementedError

    def _serialize_to_tensors(self):
        return {key: component.read_value() for key, component in self.checkpoint_items()}

    def _restore_from_tensors(self, restored_tensors):
        return tf.group([component.assign(restored_tensors[key]) for key, component in self.checkpoint_items()])


class InternalsUnavailable(RuntimeError):
    """A private TensorFlow internal did not look as expected."""


class DirectLaunchers:
    """Per-device collective launchers, one per local replica in replica
    order, each with the :class:`MemberOrder` of its group (identity until
    the caller establishes it: see :meth:`with_orders`)."""

    def __init__(self, launchers, lock, orders=None):
        self.launchers = launchers
        self.lock = lock
        self.orders = list(orders) if orders is not None else [
            MemberOrder.identity(launcher._group_size) for launcher in launchers]

    def with_orders(self, orders) -> "DirectLaunchers":
        """The same launchers with their groups' member orders."""
        return DirectLaunchers(self.launchers, self.lock, orders)

    def call_per_replica(self, replica_context, per_device_fn, value):
        """Run ``per_device_fn(launcher, order, local_value)`` for every local
        replica inside one merge_call; each replica gets its own result back."""
        try:
            from tensorflow.python.distribute import values as values_lib
        except _EXPECTED_ERRORS as error:
            raise InternalsUnavailable(f"tensorflow.python.distribute.values: {error}") from error

        def merge_fn(strategy, per_replica):
            local = strategy.experimental_local_results(per_replica)
            with self.lock:  # the launchers' instance keys must advance in one order
                results = [per_device_fn(launcher, order, v)
                           for launcher, order, v in zip(self.launchers, self.orders, local)]
            return values_lib.PerReplica(results)

        return replica_context.merge_call(merge_fn, args=(value,))


def direct_launchers(strategy) -> DirectLaunchers | None:
    """Launchers of distadam's own over the strategy's devices (see
    :func:`own_group_key`) if the direct collectives can use them, else
    None. Call once, in cross-replica context."""
    try:
        from tensorflow.python.distribute import cross_device_ops as cross_device_ops_lib

        extended = strategy.extended
        if not extended._use_merge_call():  # XLA replica functions: no merge_call
            return None
        # Only an int32 value changes the choice; buckets are floating point.
        cross_ops = extended._get_cross_device_ops(types.SimpleNamespace(dtype=tf.float32))
        if not isinstance(cross_ops, cross_device_ops_lib.CollectiveAllReduce):
            return None
        launchers = list(cross_ops._launchers)
        lock = cross_ops._lock
        group_size = launchers[0]._group_size
        for launcher in launchers:  # everything the collectives below touch
            for attribute in ("_next_instance_key", "_get_ordering_token", "_options",
                              "_group_key", "_device", "_all_gather"):
                getattr(launcher, attribute)
        worker_devices = extended.worker_devices
    except _EXPECTED_ERRORS:
        return None
    if group_size != strategy.num_replicas_in_sync:
        return None
    if len(launchers) != len(worker_devices):
        return None
    try:
        key = own_group_key(strategy_slot(strategy, multi_worker=_is_multi_worker(strategy)))
        # One launcher per device for the strategy's lifetime: its instance
        # keys must keep counting up across optimizers (a second optimizer
        # starting over would reuse keys TensorFlow has seen).
        own = []
        for base in launchers:
            if base not in _OWN_LAUNCHERS:
                _OWN_LAUNCHERS[base] = _own_launcher(base, key, group_size)
            own.append(_OWN_LAUNCHERS[base])
    except _EXPECTED_ERRORS:
        return None
    return DirectLaunchers(own, lock)


#: distadam's group keys: far above the keys strategies allocate (from 1, one
#: per device set), computed from the strategy's slot and the group's
#: identity, so every process names the same group alike without
#: communicating. (Two different device sets under one key would be merged
#: into one group by the group leader.) Each slot spans 2**23 keys.
OWN_GROUP_KEY_BASE = 1 << 28
_SLOT_BITS = 23
#: Strategy instances of one kind (in-process or multi-worker) a process can
#: give their own keys to: group keys are int32.
MAX_STRATEGY_SLOTS = ((1 << 31) - OWN_GROUP_KEY_BASE) >> (_SLOT_BITS + 1)
#: Hybrid group sizes and group counts the subgroup keys can name.
MAX_SUBGROUP_SIZE, MAX_SUBGROUP_INDEX = 1 << 10, 1 << 12

#: strategy.extended -> its slot, and the next slot of each kind.
_STRATEGY_SLOTS = weakref.WeakKeyDictionary()
_NEXT_SLOT = {False: 0, True: 0}


def _is_multi_worker(strategy) -> bool:
    """Whether the strategy's group spans processes (replicas it does not hold)."""
    return strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)


def strategy_slot(strategy, multi_worker: bool) -> int:
    """This strategy instance's slot of keys: 0 for the first strategy of its
    kind in this process, 1 for the next... Multi-worker strategies are
    counted apart from in-process ones (TensorFlow runs one multi-worker
    strategy per process), so a process that also builds a local
    MirroredStrategy, say for evaluation, still names the job's groups as
    the other processes do."""
    extended = strategy.extended
    if extended not in _STRATEGY_SLOTS:
        slot = _NEXT_SLOT[multi_worker]
        if slot >= MAX_STRATEGY_SLOTS:
            raise RuntimeError(
                f"distadam gives each tf.distribute strategy in a process its own collective keys, for "
                f"up to {MAX_STRATEGY_SLOTS} strategies; this process has built more. Restart it.")
        _NEXT_SLOT[multi_worker] = slot + 1
        _STRATEGY_SLOTS[extended] = (multi_worker, slot)
    multi_worker, slot = _STRATEGY_SLOTS[extended]
    return (slot << 1) | int(multi_worker)


def own_group_key(slot: int, code: int = 0) -> int:
    """Group key ``code`` (0: all workers; see :func:`subgroup_key`) of
    strategy slot ``slot``."""
    return OWN_GROUP_KEY_BASE + (slot << _SLOT_BITS) + code


def _own_launcher(base, key: int, size: int):
    """A launcher of group ``key`` on ``base``'s device, with instance keys of
    its own and ``base``'s ordering token: our collectives and the
    strategy's run in the order they were traced, on every worker."""
    from tensorflow.python.distribute import cross_device_utils

    keys = cross_device_utils.CollectiveKeys(group_key_start=key)
    if keys.get_group_key([base._device]) != key:
        raise ValueError("CollectiveKeys did not start at the requested group key")
    launcher = cross_device_utils.CollectiveReplicaLauncher(key, size, keys, base._device, base._options)
    launcher._ordering_token = base._ordering_token
    return launcher


#: the strategy's launcher -> distadam's launcher of the whole group on its device.
_OWN_LAUNCHERS = weakref.WeakKeyDictionary()
#: launcher of the whole group (distadam's) -> {group size: (within, across)}.
_SUBGROUP_LAUNCHERS = weakref.WeakKeyDictionary()


def subgroup_key(whole_group_key: int, group_size: int, across: bool, index: int) -> int:
    """Group key of group ``index`` (within) or of position ``index``
    (across) when sharding over groups of ``group_size``, in the slot of
    ``whole_group_key``."""
    if not (0 < group_size < MAX_SUBGROUP_SIZE and 0 <= index < MAX_SUBGROUP_INDEX):
        raise ValueError(f"subgroup keys name groups of up to {MAX_SUBGROUP_SIZE - 1} workers and up to "
                         f"{MAX_SUBGROUP_INDEX} groups; got group size {group_size}, index {index}")
    return whole_group_key + 1 + ((((group_size << 1) | int(across)) << 12) + index)


def local_replica_ids(strategy) -> list:
    """The replica id in sync group of each local replica, known without
    running anything (the optimizer may be built inside replica context,
    where :meth:`DistributeCollectives.local_worker_indices` cannot run)."""
    try:
        extended = strategy.extended
        return [int(extended._get_replica_id_in_sync_group(i)) for i in range(len(extended.worker_devices))]
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"local replica ids: {error}") from error


def subgroup_launchers(direct: DirectLaunchers, worker_indices, grid):
    """(within, across): :class:`DirectLaunchers` over each local replica's
    group and over its position across groups (``grid``: a
    :class:`distadam.worker_grid.WorkerGrid`), or raise InternalsUnavailable."""
    group_size = grid.group_size
    try:
        within, across = [], []
        for base, worker in zip(direct.launchers, worker_indices):
            # One launcher per (device, group) for the strategy's lifetime:
            # its instance keys must keep counting up across optimizers (a
            # second optimizer starting over would reuse keys TF has seen).
            cached = _SUBGROUP_LAUNCHERS.setdefault(base, {})
            if group_size not in cached:
                key = base._group_key
                cached[group_size] = (
                    _own_launcher(base, subgroup_key(key, group_size, False, grid.group_of(worker)), group_size),
                    _own_launcher(base, subgroup_key(key, group_size, True, grid.shard_of(worker)),
                                  grid.num_groups))
            within.append(cached[group_size][0])
            across.append(cached[group_size][1])
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"subgroup launchers: {error}") from error
    return DirectLaunchers(within, direct.lock), DirectLaunchers(across, direct.lock)


def launcher_all_reduce(launcher, order, values):
    """Sum of ``values`` over the launcher's group (order-free)."""
    try:
        return launcher.all_reduce(values)
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"launcher all-reduce: {error}") from error


def launcher_all_gather_rows(launcher, order, rows):
    """All-gather along axis 0 of row blocks whose lengths may differ (the
    launcher exchanges the lengths first), in rank order."""
    try:
        from tensorflow.python.distribute import collective_util

        with tf.device(launcher._device):
            return launcher.all_gather(rows, 0, collective_util.Options())
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"launcher all-gather of rows: {error}") from error


#: TensorFlow names the buffers of an all-to-all by the collective's key
#: followed by the sender's and the receiver's ranks with no separator
#: (``all_to_all.cc``): from 11 ranks on two pairs spell the same name ((1, 10)
#: and (11, 0) are both "...110"), and a process holding both receivers fails
#: with "Second consumer arrived for key". Groups up to this size, or with one
#: member per process, cannot collide.
UNAMBIGUOUS_ALL_TO_ALL_GROUP = 10


def all_to_all_is_safe(group_size: int, members_per_process: int) -> bool:
    """Whether TensorFlow's all-to-all works for a group of ``group_size``
    with up to ``members_per_process`` members in one process (see
    :data:`UNAMBIGUOUS_ALL_TO_ALL_GROUP`). The same answer on every process
    of a job (equal devices per worker), so all take the same path."""
    return group_size <= UNAMBIGUOUS_ALL_TO_ALL_GROUP or members_per_process <= 1


def maybe_merge_call(fn, strategy, *args):
    """``fn(strategy, *args)`` in cross-replica context (see the list above)."""
    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


def all_to_all_sum(launcher, order: MemberOrder, flat):
    """Reduce-scatter through an all-to-all: row w of ``flat`` (viewed as
    [group size, S]) goes to worker w, which sums the rows it receives.
    The all-to-all delivers row r to rank r, so the rows are put in rank
    order first (a copy only where ranks and workers differ)."""
    try:
        device = launcher._device
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"launcher device: {error}") from error
    with tf.device(device):
        rows = order.rows_to_rank_order(tf.reshape(flat, [order.size, -1]))
    # Received row r came from rank r: summed in worker order.
    return sum_rows(all_to_all_rows(launcher, rows), order)


def all_to_all_rows(launcher, rows):
    """All-to-all of ``rows`` ([group_size, ...]): row r goes to rank r;
    returns the rows received, row r from rank r (TensorFlow's rank order,
    see :mod:`distadam.collectives.member_order`)."""
    try:
        from tensorflow.python.distribute import collective_util
        from tensorflow.python.ops import collective_ops

        options = launcher._options.merge(collective_util.Options())
        with tf.device(launcher._device):
            return collective_ops.all_to_all_v2(
                rows,
                launcher._group_size,
                launcher._group_key,
                launcher._next_instance_key(),
                ordering_token=launcher._get_ordering_token(),
                timeout=options.timeout_seconds,
            )
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"all_to_all_v2 through the strategy's launcher: {error}") from error


def equal_shard_all_gather(launcher, order: MemberOrder | None, shard):
    """All-gather of equal-size shards without the shape exchange, in worker
    order (``order=None``: as TensorFlow returns it, in rank order)."""
    try:
        from tensorflow.python.distribute import collective_util

        gathered = launcher._all_gather(shard, collective_util.Options())
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"launcher all-gather: {error}") from error
    return gathered if order is None else order.flat_to_worker_order(gathered)


def in_xla_context() -> bool:
    """Whether ops are being traced into an XLA cluster (``jit_compile``),
    where host-side ops such as printing cannot run. TensorFlow offers no
    public test; if its private one moves, answer True (never print) rather
    than break a compiled step."""
    try:
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except (ImportError, AttributeError):
        return True
