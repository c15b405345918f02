"""Gaussian noise from one shared generator or from one generator per sample (batch-size independent draws)."""
from __future__ import annotations

from typing import Sequence, Union

import torch

GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator]]


def module_device(model) -> torch.device:
    """The device of a model's first parameter; the CPU for a callable without parameters."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def gaussian_noise(shape, generator: GeneratorLike, device, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) of `shape` on `device`.

    `generator` may be None (global RNG), one torch.Generator, or a list with one generator per sample (len ==
    shape[0]); in the last case sample i's noise depends only on its own generator, so results do not change with
    the batch it sits in.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: got {len(generator)} per-sample generators for a batch of {shape[0]}")
    draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(draws).to(device)
