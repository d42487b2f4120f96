"""Save on preemption: SIGTERM to any worker ends the whole job with a
checkpoint of the current step on every worker.

Kubernetes (an eviction, a node drain, a spot/preemptible node going away)
and most schedulers announce the end of a pod with SIGTERM, then SIGKILL
after a grace period (``terminationGracePeriodSeconds``, 30 s by default).
Creating ``MultiWorkerMirroredStrategy`` installs TensorFlow's own SIGTERM
handler (its coordination service's preemption notifier), so an unprepared
worker simply keeps training until the SIGKILL, and the steps since the last
checkpoint are lost.

:class:`PreemptionGuard` replaces that handler with one that only raises a
flag. At every ``check_every``-th call of :meth:`PreemptionGuard.step_done`
the workers agree on the flag with one tiny all-reduce through the
optimizer's own collectives (so every backend works: tf.distribute, Horovod,
a custom one); if any worker was signalled, *every* worker saves the current
step with the :class:`~distadam.checkpoint.ShardedCheckpointManager` and
leaves with :data:`EXIT_PREEMPTED`. The signal can hit any worker, or several
at different times: they all stop after the same step.

Why not ``tf.distribute.experimental.PreemptionCheckpointHandler``: it agrees
through the coordination service of ``MultiWorkerMirroredStrategy`` only (no
Horovod or custom backends), saves through ``tf.train.Checkpoint`` (whose
sharded-state checkpoints only restore on the same worker count, and skip the
integrity checks and fallback of the sharded manager), and owns the training
loop (``handler.run(train_fn)``). The design is the same: a flag set by the
signal, agreement on the step, save, exit with a code the platform treats as
"restart me".

Budget: the grace period must cover up to ``check_every`` steps, one save and
the process exit.

The guard needs the optimizer, which exists only some time after the
strategy (and its signal handler). A signal in between is not lost if
:func:`catch_signals` is called right after the strategy is created: it holds
the signal until the guard takes over (``PreemptionGuard(..., caught=...)``).
"""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np

#: Exit status after a preemption checkpoint was saved; the same value
#: TensorFlow's PreemptionCheckpointHandler uses on CPU/GPU, so one platform
#: rule ("exit code 42: restart, not a failure") covers both.
EXIT_PREEMPTED = 42


class Preempted(SystemExit):
    """Raised by :meth:`PreemptionGuard.step_done` after the checkpoint is
    saved; a ``SystemExit`` with code :data:`EXIT_PREEMPTED`, so an
    uncaught one ends the process with that status after ``finally``
    blocks ran."""

    def __init__(self, step: int, path, code: int = EXIT_PREEMPTED):
        super().__init__(code)
        self.step = step
        self.path = path


class SignalCatcher:
    """Record preemption signals (the first one) instead of acting on them.
    Create it in the main thread; :meth:`close` puts the previous handlers back."""

    def __init__(self, signals=(signal.SIGTERM,)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        self.signals = tuple(signals)
        self.received = None
        self._previous = {}
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        # Only a flag: a signal handler may run between any two bytecodes of
        # the main thread, in the middle of a step.
        if self.received is None:
            self.received = signum

    def reinstall(self) -> None:
        """Take the signals back (from a handler installed since)."""
        for signum in self.signals:
            signal.signal(signum, self._on_signal)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def catch_signals(signals=(signal.SIGTERM,)) -> SignalCatcher:
    """Hold preemption signals from now on; pass the result to
    :class:`PreemptionGuard` as ``caught``. Call it right after creating the
    strategy (which installs TensorFlow's handler) and before building the
    model, the optimizer and the checkpoint manager."""
    return SignalCatcher(signals)


class PreemptionGuard:
    """Turn SIGTERM into "every worker saves this step and exits".

    Create it on every process after the strategy and the optimizer exist
    (the strategy installs its own SIGTERM handler, which this replaces), and
    call :meth:`step_done` after every training step, at the same point on
    every process.

    Args:
        optimizer: a built :class:`distadam.ShardedAdam` (its collectives
            carry the agreement).
        manager: the job's :class:`~distadam.checkpoint.ShardedCheckpointManager`,
            or None to stop without saving.
        check_every: steps between agreements (each is one all-reduce of one
            number). Raise it for very fast steps; the grace period must
            then cover that many steps more.
        signals: the signals that mean "preempted".
        log: where the decision is reported (a ``print``-like callable).
        caught: a :class:`SignalCatcher` from :func:`catch_signals` that has
            held the signals since the strategy was created (its signals are
            used, and a signal it already holds counts).
    """

    def __init__(self, optimizer, manager=None, check_every: int = 1, signals=(signal.SIGTERM,), log=None,
                 caught: SignalCatcher | None = None):
        if type(check_every) is not int or check_every < 1:
            raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be created in the main thread (signal handlers live there)")
        if not getattr(optimizer, "built", False) or not hasattr(optimizer, "collectives"):
            raise ValueError("PreemptionGuard needs a built distadam.ShardedAdam")
        self.optimizer = optimizer
        self.manager = manager
        self.check_every = check_every
        self._calls = 0
        self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        # The agreement and the save happen at the next step boundary, on
        # every worker at once; until then a signal is only a flag.
        if caught is not None:
            caught.reinstall()  # in case something installed a handler since
            self._catcher = caught
        else:
            self._catcher = SignalCatcher(signals)

    @property
    def received(self):
        """The first preemption signal this process got, or None."""
        return self._catcher.received

    @property
    def requested(self) -> bool:
        """Whether this process received a preemption signal."""
        return self.received is not None

    def step_done(self) -> None:
        """Call after each training step. Every ``check_every`` calls, agree
        with the other workers; if any was signalled, save and raise
        :class:`Preempted` on every worker."""
        self._calls += 1
        if self._calls % self.check_every:
            return
        collectives = self.optimizer.collectives
        flag = np.asarray([1.0 if self.requested else 0.0])
        total = float(np.asarray(collectives.all_reduce_eagerly(flag)).reshape(-1)[0])
        if total <= 0:
            return
        step = int(self.optimizer.iterations_variable.numpy())
        who = f"this worker got {signal.Signals(self.received).name}" if self.requested \
            else "another worker was signalled"
        path = None
        if self.manager is not None:
            path = self.manager.save()
            self._log(f"distadam: preempted ({who}): saved step {step} "
                      f"to {path}; exiting with code {EXIT_PREEMPTED}")
        else:
            self._log(f"distadam: preempted ({who}) at step {step}; no "
                      f"checkpoint manager, nothing saved; exiting with code {EXIT_PREEMPTED}")
        # The flag handler stays installed: while this process exits, a
        # launcher or kubelet may signal it again, which must not kill it
        # half-way (the checkpoint is committed, but the exit status should
        # say "preempted, saved").
        raise Preempted(step, path)

    def close(self) -> None:
        """Put the previous signal handlers back."""
        self._catcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
