"""One thread that ends a stalled worker, instead of one timer thread per collective.

TensorFlow bounds a collective that waits for peers with
``CommunicationOptions(timeout_seconds=T)``, but it implements each bound as a
detached thread that sleeps T seconds (``BaseCollectiveExecutor`` calls
``SchedNonBlockingClosureAfter`` twice per collective, once for parameter
resolution and once for execution, and the POSIX ``Env`` runs every such
closure on a new thread: "Consuming a thread here is wasteful"). A job that
launches R collectives per second therefore keeps about 2 * R * T threads
alive; measured on this project's digits job (2 workers, ~6.5 threads per
step): 1,437 threads per worker after 220 steps at T=120, against 112 without
a timeout. In a pod with a pid limit, fast steps exhaust it.

:class:`StallWatchdog` gives the same guarantee — a worker whose peers stop
answering does not hang forever — with one thread per process whatever the
step rate: the training loop reports progress (:meth:`StallWatchdog.beat`)
and, if none comes for ``timeout`` seconds, the watchdog dumps every Python
thread's stack to stderr and ends the process with :data:`EXIT_STALLED`. The
peers then see it die through TensorFlow's heartbeats (or stall themselves and
end the same way), and the launcher or Kubernetes restarts the job from its
last checkpoint — what a timed-out collective would have required anyway,
since TensorFlow's collectives are unusable in a process after one times out.

Use it with ``strategy_from_env(communication_timeout=None)`` (the default).

Checkpoint saves and restores are not steps: while one runs, the watchdog of
the process (the one most recently created) allows it
``long_operation_timeout`` seconds instead (:func:`long_operation`; the
checkpoint manager announces its own, a training loop wraps its evaluation).
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import sys
import threading
import time

#: Exit code of a worker ended by the watchdog (sysexits' EX_TEMPFAIL:
#: a temporary failure, a restart is expected to fix it).
EXIT_STALLED = 75

#: The watchdog of this process that long operations announce themselves to.
_active = None


class StallWatchdog:
    """End this process if the training loop makes no progress for ``timeout`` seconds.

    Args:
        timeout: seconds without a :meth:`beat`. Cover the slowest step
            (the first one traces and compiles) and anything between beats.
        exit_code: the process's exit status when the watchdog fires.
        what: what progress means, for the message (e.g. "training step").
        long_operation_timeout: seconds a checkpoint save or restore, or an
            evaluation wrapped in :func:`long_operation`, may take (default:
            ten times ``timeout``, at least 10 minutes). Still bounded, so a
            peer that hangs during a save ends the job too.
    """

    def __init__(self, timeout: float, exit_code: int = EXIT_STALLED, what: str = "training step",
                 long_operation_timeout: float | None = None):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if type(exit_code) is not int or not 1 <= exit_code <= 255:
            raise ValueError(f"exit_code must be an integer in 1..255, got {exit_code!r}")
        if long_operation_timeout is None:
            long_operation_timeout = max(10 * float(timeout), 600.0)
        if isinstance(long_operation_timeout, bool) or not isinstance(long_operation_timeout, (int, float)) \
                or not math.isfinite(long_operation_timeout) or long_operation_timeout <= 0:
            raise ValueError(f"long_operation_timeout must be a positive number of seconds, "
                             f"got {long_operation_timeout!r}")
        self.timeout = float(timeout)
        self.long_operation_timeout = float(long_operation_timeout)
        self.exit_code = exit_code
        self._condition = threading.Condition()
        self._what = what
        self._allowed = self.timeout  # the bound now in force (longer inside allow())
        self._deadline = time.monotonic() + self.timeout
        self._beats = 0
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="distadam-stall-watchdog", daemon=True)
        self._thread.start()
        global _active
        _active = self

    def beat(self, what: str | None = None) -> None:
        """Progress: the next ``timeout`` seconds start now."""
        with self._condition:
            self._beats += 1
            self._deadline = time.monotonic() + self._allowed
            if what is not None:
                self._what = what

    @contextlib.contextmanager
    def allow(self, seconds: float, what: str):
        """Let one longer operation (a checkpoint save, an evaluation) take up
        to ``seconds``; the enclosing bound (the usual one, or an outer
        operation's) applies again afterwards, counted from its end."""
        with self._condition:
            outer = (self._what, self._allowed)
            self._what, self._allowed = what, float(seconds)
            self._deadline = time.monotonic() + self._allowed
        try:
            yield
        finally:
            with self._condition:
                self._what, self._allowed = outer
                self._deadline = time.monotonic() + self._allowed

    def close(self) -> None:
        """Stop the watchdog thread and wait for it."""
        global _active
        if _active is self:
            _active = None
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            if self._closed:
                return
            what, beats, allowed = self._what, self._beats, self._allowed
        # The main thread is typically blocked inside a collective in C++:
        # nothing short of ending the process frees it. Write with os.write
        # and faulthandler, which take no lock the main thread could hold.
        message = (f"\ndistadam: stalled: no {what} completed for {allowed:g}s after {beats} "
                   f"progress report(s) (a peer is stuck or unreachable); ending this worker with "
                   f"exit code {self.exit_code} so the job can restart from its last checkpoint. "
                   "Python stacks follow.\n")
        try:
            os.write(2, message.encode())
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (OSError, ValueError, AttributeError):
            pass
        os._exit(self.exit_code)


def long_operation(what: str):
    """Context manager: ``what`` (a checkpoint save, an evaluation) is not a
    stall; this process's watchdog, if any, allows it its
    ``long_operation_timeout``. Without a watchdog it does nothing."""
    watchdog = _active
    if watchdog is None:
        return contextlib.nullcontext()
    return watchdog.allow(watchdog.long_operation_timeout, what)
