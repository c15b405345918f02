"""The NaN guard: a step whose loss or gradient is not finite is skipped, counted and logged, never applied."""
from __future__ import annotations

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
