"""Gaussian KL and the discretised Gaussian log-likelihood used by the variational bound (values in nats)."""
from __future__ import annotations

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise; scalars broadcast against tensors."""
    like = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if like is None:
        raise ValueError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(like) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi(x) that ADM uses (kept so the VB term matches DiT's numbers)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(means, exp(log_scales)^2), for x on the 256-level grid of [-1, 1].

    Each bin has half-width 1/255; the two edge bins extend to -inf / +inf (ADM's decoder likelihood).
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x, means and log_scales must have one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
