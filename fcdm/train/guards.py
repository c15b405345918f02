"""What may skip or stop a training step: the NaN guard, and a stop requested by SIGTERM or SIGINT.

A step whose loss or gradient is not finite is skipped, counted and logged, never applied. Preemptible clusters send
SIGTERM and wait a grace period; finishing the step and saving a checkpoint is what lets the job resume without
losing work. A second SIGINT interrupts at once, as usual.
"""
from __future__ import annotations

import signal

from .state import TrainState


class NonFiniteStepError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the run cannot recover by itself."""


def check_step(state: TrainState, loss: float, grad_norm: float, max_consecutive: int) -> bool:
    """True if the step may be applied. Updates the skip counters; raises after max_consecutive skips in a row.

    loss and grad_norm must be the all-reduced values, so every rank takes the same decision."""
    finite = loss == loss and grad_norm == grad_norm and abs(loss) != float("inf") and abs(grad_norm) != float("inf")
    if finite:
        state.consecutive_skips = 0
        return True
    state.skipped_steps += 1
    state.consecutive_skips += 1
    if state.consecutive_skips >= max_consecutive:
        raise NonFiniteStepError(
            f"{state.consecutive_skips} consecutive steps had a non-finite loss or gradient (last: loss={loss}, "
            f"grad_norm={grad_norm}) at step {state.step}. Check the data for NaN/Inf, lower --lr, set "
            f"--max-grad-norm, or try --precision fp32. The last checkpoint holds finite weights.")
    return False


class StopRequest:
    """SIGTERM / SIGINT become a request to stop after the current step. Installs the handlers on enter and restores
    the previous ones on exit."""

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
