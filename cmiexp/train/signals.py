"""Stopping a run cleanly: SIGTERM/SIGINT (a cluster's preemption, Ctrl-C) set a flag that the
training loop checks between steps; it saves a checkpoint and stops, and the same command resumes."""

from __future__ import annotations

import signal

from cmiexp.errors import CmiexpError


class Preempted(CmiexpError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the run can be resumed."""


class StopFlag:
    """Set by SIGTERM/SIGINT while installed; a second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. some launchers): no handler
                pass

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}


__all__ = ["Preempted", "StopFlag"]
