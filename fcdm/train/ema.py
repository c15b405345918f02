"""Exponential moving average of the model weights, kept in fp32 and initialised as an exact copy of the model."""
from __future__ import annotations

import torch.nn as nn

from fcdm.ema import fp32_copy, lerp_average_  # under FSDP2 each rank updates its own shard


class EMA:
    """ema <- decay * ema + (1 - decay) * model, after every optimiser step.

    With warmup, the decay is min(decay, (1 + step) / (10 + step)), so short runs (the CPU demo) average over
    recent weights instead of staying near the initialisation; the paper's runs use a constant 0.9999.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = fp32_copy(model)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def update(self, model: nn.Module, step: int) -> None:
        lerp_average_(self.module, model, 1.0 - self.decay_at(step))
