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
* ``StrategyExtended._use_merge_call`` / ``._get_cross_device_ops``: whether
  the strategy runs replica functions with merge_call (not under XLA) and
  which cross-device ops it would use for a float tensor.
* ``values.PerReplica``: to hand each replica its own result from a merge_call.
* ``control_flow_util.GraphOrParentsInXlaContext``: whether a step is being
  compiled by XLA, where host-side printing cannot run (the skipped-step
  warning is left out there).
"""

from __future__ import annotations

import types

import tensorflow as tf

# Collective group members are ranked by device name; up to 10 members the
# lexicographic and the replica order agree ("CPU:10" < "CPU:2" beyond that),
# which the all-to-all's row order and the gather's output order rely on.
MAX_DIRECT_GROUP = 10

_EXPECTED_ERRORS = (AttributeError, ImportError, IndexError, TypeError, KeyError, ValueError)


class InternalsUnavailable(RuntimeError):
    """A private TensorFlow internal did not look as expected."""


class DirectLaunchers:
    """The strategy's own per-device collective launchers, in replica order."""

    def __init__(self, launchers, lock):
        self.launchers = launchers
        self.lock = lock

    def call_per_replica(self, replica_context, per_device_fn, value):
        """Run ``per_device_fn(launcher, local_value)`` for every local replica
        inside one merge_call; each replica gets its own result back."""
        try:
            from tensorflow.python.distribute import values as values_lib
        except _EXPECTED_ERRORS as error:
            raise InternalsUnavailable(f"tensorflow.python.distribute.values: {error}") from error

        def merge_fn(strategy, per_replica):
            local = strategy.experimental_local_results(per_replica)
            with self.lock:  # the launchers' instance keys must advance in one order
                results = [per_device_fn(launcher, v) for launcher, v in zip(self.launchers, local)]
            return values_lib.PerReplica(results)

        return replica_context.merge_call(merge_fn, args=(value,))


def direct_launchers(strategy) -> DirectLaunchers | None:
    """The strategy's launchers if the direct collectives can use them, else
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
    if group_size != strategy.num_replicas_in_sync or group_size > MAX_DIRECT_GROUP:
        return None
    if len(launchers) != len(worker_devices):
        return None
    return DirectLaunchers(launchers, lock)


def all_to_all_sum(launcher, flat, num_workers: int):
    """Reduce-scatter through an all-to-all: row j of ``flat`` (viewed as
    [num_workers, S]) goes to replica j, which sums the rows it receives."""
    with tf.device(launcher._device):
        rows = tf.reshape(flat, [num_workers, -1])
    # Row j came from replica j: its part of this replica's shard.
    return tf.reduce_sum(all_to_all_rows(launcher, rows), axis=0)


def all_to_all_rows(launcher, rows):
    """All-to-all of ``rows`` ([group_size, ...]): row j goes to replica j;
    returns the rows received, row j from replica j."""
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


def equal_shard_all_gather(launcher, shard):
    """All-gather of equal-size shards without the shape exchange."""
    try:
        from tensorflow.python.distribute import collective_util

        return launcher._all_gather(shard, collective_util.Options())
    except _EXPECTED_ERRORS as error:
        raise InternalsUnavailable(f"launcher all-gather: {error}") from error


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
