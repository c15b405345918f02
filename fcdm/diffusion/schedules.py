"""Beta schedules of the discrete diffusion process (fp64 numpy tables, as ADM/DiT keep them)."""
from __future__ import annotations

import math

import numpy as np


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s 1e-4 -> 2e-2 linear schedule, rescaled so any step count covers the same total noise."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 2e-2, num_steps, dtype=np.float64)


def betas_for_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas whose cumulative product of (1 - beta) follows alpha_bar(t) on t in [0, 1]; capped to stay < 1."""
    edges = [(i / num_steps, (i + 1) / num_steps) for i in range(num_steps)]
    return np.array([min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta) for t1, t2 in edges], dtype=np.float64)


def cosine_betas(num_steps: int) -> np.ndarray:
    """Nichol & Dhariwal's squared-cosine alpha_bar (IDDPM eq. 17, s = 0.008)."""
    return betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


NAMED_SCHEDULES = {"linear": linear_betas, "squaredcos_cap_v2": cosine_betas, "cosine": cosine_betas}


def named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """The betas of a named schedule: 'linear' (FCDM/DiT) or 'squaredcos_cap_v2' (alias 'cosine')."""
    if name not in NAMED_SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {sorted(NAMED_SCHEDULES)}, got {name!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"diffusion_steps must be a positive integer, got {num_steps!r}")
    return NAMED_SCHEDULES[name](num_steps)
