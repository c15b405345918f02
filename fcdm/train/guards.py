"""What may skip or stop a training step: the NaN guard, and a stop requested by SIGTERM, SIGUSR1 or SIGINT.

A step whose loss or gradient is not finite is skipped, counted and logged, never applied. Preemptible clusters send
SIGTERM and wait a grace period, and SLURM sends SIGUSR1 before a time limit (`sbatch --signal=USR1@120`); finishing
the step and saving a checkpoint is what lets the job resume without losing work. After SIGUSR1 under SLURM the job
is requeued, so that its next start (`--resume auto`) continues. A second SIGINT interrupts at once, as usual.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess

from fcdm import distributed

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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """SIGTERM / SIGUSR1 / SIGINT become a request to stop after the current step. Installs the handlers on enter and restores
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
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application): leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_on_slurm(signal_name: str | None, enabled: bool, log) -> bool:
    """After a stop on SIGUSR1 (to any rank) inside a SLURM job: `scontrol requeue $SLURM_JOB_ID`, so the job starts
    again (and --resume auto continues it). Every rank calls it; `enabled` on one. Returns whether it requeued."""
    names = distributed.all_gather_object(signal_name)  # the stop is shared, the signal need not have reached rank 0
    job = os.environ.get("SLURM_JOB_ID")
    if not (enabled and "SIGUSR1" in names and job):
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log("SIGUSR1 in a SLURM job, but scontrol is not on PATH: the job was not requeued")
        return False
    done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    log(f"requeued SLURM job {job}" if done.returncode == 0 else
        f"scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}")
    return done.returncode == 0
