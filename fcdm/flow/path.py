"""The linear (rectified-flow) interpolant of SiT: x_t = t * x_data + (1 - t) * noise, t = 0 noise, t = 1 data.

With alpha_t = t and sigma_t = 1 - t every parameterisation converts to the others in closed form:
velocity v = x_data - noise, score s = -noise / sigma_t, and v = (x + (1 - t) s) / t (SiT, Ma et al. 2024, eq. 5-8).
"""
from __future__ import annotations

import torch


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against x, in x's dtype."""
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class LinearPath:
    """alpha_t = t, sigma_t = 1 - t."""

    def interpolate(self, t: torch.Tensor, noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        t = expand_like(t, data)
        return t * data + (1 - t) * noise

    def target_velocity(self, noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """d x_t / dt along the path."""
        return data - noise

    def sigma(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 1 - expand_like(t, x)

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = expand_like(t, x)
        return (t * v - x) / (1 - t)

    def velocity_from_score(self, s: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = expand_like(t, x)
        return (x + (1 - t) * s) / t

    def velocity_from_noise(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - eps) / expand_like(t, x)

    def drift_variance(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The score's coefficient in the probability-flow drift, (1 - t) / t; SiT's loss weights use it."""
        t = expand_like(t, x)
        return (1 - t) / t
