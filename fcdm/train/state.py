"""Everything that changes while training, besides the tensors: saved and restored whole with each checkpoint."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch


@dataclass
class TrainState:
    """Progress counters. Progress is measured in optimiser steps (and images); epochs are derived from steps."""

    step: int = 0                 # optimiser steps taken, including steps skipped by the NaN guard
    images_seen: int = 0
    epoch: int = 0                # data position of the *next* step: epoch ...
    batch_in_epoch: int = 0       # ... and global batch index inside it
    elapsed_s: float = 0.0        # training wall time over all sessions
    skipped_steps: int = 0        # non-finite steps, all time
    consecutive_skips: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    wandb_run_id: str | None = None  # a resumed run logs to the same W&B run

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def capture_rng() -> dict:
    """This process's RNG states as plain types and tensors (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This rank's device only: a resume may see a different number of GPUs per node (the step seeds reseed
        # every device anyway, so this only matters for randomness drawn outside the step).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # one state per visible device, as early checkpoints stored them
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A distinct 63-bit seed per (seed, step, rank), so each step's randomness is reproducible on resume."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))
