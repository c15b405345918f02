"""Fixed-step ODE and SDE solvers that sample flow matching, integrating from noise (t = t0) to data (t = t1).

Each returns (x, nfe) where nfe counts model evaluations per sample trajectory:
Euler ODE `steps`, Heun ODE `2 * steps`, Euler-Maruyama SDE `steps` (SiT's count: steps - 1 stochastic steps on
linspace(t0, t1, steps) plus one final deterministic "mean" step of size last_step_size).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..diffusion.noise import GeneratorLike, gaussian_noise
from .transport import FlowMatching

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> raw model output


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    return tqdm(iterable, leave=False)


def _check_steps(steps: int, minimum: int = 1) -> None:
    if not isinstance(steps, int) or steps < minimum:
        raise ValueError(f"steps must be an integer >= {minimum}, got {steps!r}")


@torch.no_grad()
def ode_sample(flow: FlowMatching, denoise: Denoiser, noise: torch.Tensor, steps: int, method: str = "heun",
               progress: bool = False):
    """Probability-flow ODE dx/dt = v(x, t) on `steps` equal intervals, by Euler or Heun (trapezoidal) steps."""
    _check_steps(steps)
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    t0, t1 = flow.sample_interval()
    grid = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
    x, x_batch = noise, noise.shape[0]
    nfe = 0

    def velocity(x, t_value):
        nonlocal nfe
        nfe += 1
        t = torch.full((x_batch,), t_value, device=x.device, dtype=x.dtype)
        return flow.velocity_and_score(denoise(x, t), x, t)[0]

    for i in _progress(range(steps), progress):
        dt = grid[i + 1] - grid[i]
        v = velocity(x, grid[i])
        if method == "euler":
            x = x + dt * v
        else:
            x_next = x + dt * v
            x = x + 0.5 * dt * (v + velocity(x_next, grid[i + 1]))
    return x, nfe


@torch.no_grad()
def sde_sample(flow: FlowMatching, denoise: Denoiser, noise: torch.Tensor, steps: int, diffusion_norm: float = 1.0,
               last_step_size: float = 0.04, generator: GeneratorLike = None, progress: bool = False):
    """Euler-Maruyama on dx = [v + w_t s] dt + sqrt(2 w_t) dW with w_t = norm * sigma_t (SiT's "sigma" form).

    As in SiT/official FCDM, the last step (to t = 1) is the deterministic drift step of size last_step_size.
    """
    _check_steps(steps, 2)
    if not 0.0 <= last_step_size < 1.0:
        raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")
    t0, t1 = flow.sample_interval(sde=True, last_step_size=last_step_size)
    grid = torch.linspace(t0, t1, steps, dtype=torch.float64)
    dt = float(grid[1] - grid[0])
    grid = grid.tolist()
    x, batch = noise, noise.shape[0]

    def drift_and_w(x, t_value):
        t = torch.full((batch,), t_value, device=x.device, dtype=x.dtype)
        v, score = flow.velocity_and_score(denoise(x, t), x, t)
        w = diffusion_norm * flow.path.sigma(t, x)
        return v + w * score, w

    for t_value in _progress(grid[:-1], progress):
        dw = gaussian_noise(x.shape, generator, x.device, x.dtype) * math.sqrt(dt)
        drift, w = drift_and_w(x, t_value)
        x = x + drift * dt + torch.sqrt(2 * w) * dw
    if last_step_size > 0:
        x = x + drift_and_w(x, grid[-1])[0] * last_step_size
        return x, steps
    return x, steps - 1


__all__ = ["ode_sample", "sde_sample"]
