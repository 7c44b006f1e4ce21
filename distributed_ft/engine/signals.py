"""Graceful stop: SIGTERM/SIGUSR1 set a flag; ranks agree on it at the next step boundary."""
from __future__ import annotations

import signal

# The exit code of a run stopped by a signal after saving a checkpoint; rerun with training.resume_from=latest.
EXIT_STOPPED = 3


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
