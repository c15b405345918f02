"""The optimiser of the paper's recipe, built in one place for the trainer and the memory benchmark: AdamW, with
PyTorch's fused kernel on CUDA (one kernel for all parameters, no parameter-sized temporaries), which is what the
benchmarks time and the memory prediction assumes."""
from __future__ import annotations

from typing import Iterable

import torch

# The paper's recipe: AdamW at a constant 1e-4, no weight decay (default betas and eps).
PAPER_LR = 1e-4
PAPER_WEIGHT_DECAY = 0.0


def use_fused_adamw(device: torch.device | str) -> bool:
    """Fused AdamW on CUDA; elsewhere the default implementation (the CPU runs stay bit-comparable with earlier
    ones)."""
    return torch.device(device).type == "cuda"


def build_optimizer(params: Iterable, lr: float, weight_decay: float, device: torch.device | str,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW(lr, weight_decay, betas (0.9, 0.999)) over `params`, fused on CUDA unless `fused` says otherwise."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=use_fused_adamw(device) if fused is None else fused)
