"""Exponential moving average of the model weights, kept in fp32 and initialised as an exact copy of the model."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from fcdm.ema import local_tensor  # FSDP2 parameters are DTensors: each rank updates its own shard


class EMA:
    """ema <- decay * ema + (1 - decay) * model, after every optimiser step.

    With warmup, the decay is min(decay, (1 + step) / (10 + step)), so short runs (the CPU demo) average over
    recent weights instead of staying near the initialisation; the paper's runs use a constant 0.9999.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        ema_params = [local_tensor(p) for p in self.module.parameters()]
        params = [local_tensor(p).detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, weight)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
