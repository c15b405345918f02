"""SIGTERM / SIGINT become a request to stop at the end of the current step, after saving a checkpoint.

Preemptible clusters send SIGTERM and wait a grace period; finishing the step and saving is what lets the job resume
without losing work. A second SIGINT interrupts at once, as usual.
"""
from __future__ import annotations

import signal


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application): leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
