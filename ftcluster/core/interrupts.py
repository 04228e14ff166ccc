"""Ctrl+C and SIGTERM (what Kubernetes sends before evicting a pod): stop cleanly, say where to resume.

During the training steps the first signal is a request: the loop finishes the step in flight,
saves a checkpoint (``training.checkpoint_on_preempt``) and raises `Interrupted`. Anywhere else,
or on a second signal, `Interrupted` is raised at once. The CLI prints one line and exits with
128 + the signal number (130 for Ctrl+C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop by signal. A KeyboardInterrupt, so libraries that clean up after Ctrl+C do so for SIGTERM too."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint

    def __reduce__(self):  # a Ray worker's interrupt reaches the driver pickled, with its step and checkpoint
        return (Interrupted, (self.signum, self.step, self.checkpoint))


class StopRequests:
    """The process-wide signal state (installed once, in the main thread, by the CLI)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self.record_only = False  # a Ray worker: its main thread runs Ray's task loop, never raise there

    def install(self) -> None:
        """Route SIGINT and SIGTERM here (again after libraries such as Ray set their own handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if self.record_only:
            if not first:  # a second signal stops at once
                os._exit(128 + signum)
            return
        if not (first and self.deferring):
            raise Interrupted(signum)

    def install_in_worker(self) -> None:
        """In a Ray worker's main thread: a signal is recorded for the training thread, which stops at its next
        step boundary (the main thread runs Ray's task loop, where an exception would kill the worker)."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        self.record_only = True
        self.install()

    @contextlib.contextmanager
    def at_step_boundaries(self) -> Iterator[None]:
        """Within this block a first signal waits for the loop to call `raise_if_requested`."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def raise_if_requested(self, step: int, save_checkpoint, agree: Callable[[int], int] = lambda signum: signum) -> None:
        """At a step boundary: if a signal came, save a checkpoint (``save_checkpoint()`` → its path or None)
        and raise `Interrupted`. ``agree(signum or 0)``: the signal any worker of the group got (a collective
        every worker calls at every boundary), so that all of them checkpoint and stop together."""
        signum = agree(self.signum or 0)
        if not signum:
            return
        self.signum = signum
        self.deferring = False  # a second signal while saving stops at once
        raise Interrupted(signum, step, save_checkpoint())


    def raise_while_waiting(self) -> None:
        """Inside a wait on code that may never return (a user's reward function): a signal stops at once,
        since the step boundary it would wait for may never come."""
        if self.signum is not None:
            raise Interrupted(self.signum)


STOP = StopRequests()


def signal_of(exc: KeyboardInterrupt) -> int:
    """The signal behind an interrupt: ours carry it; a plain KeyboardInterrupt is the last one seen, or SIGINT."""
    return exc.signum if isinstance(exc, Interrupted) else (STOP.signum or signal.SIGINT)
