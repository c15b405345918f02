"""Timestep respacing: run a T-step diffusion with fewer steps (IDDPM section 4) without retraining."""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np

SectionCounts = Union[str, int, Sequence[int]]


def _ddim_stride(num_timesteps: int, desired: int) -> list[int]:
    """DDIM's fixed striding 0, s, 2s, ...: the smallest stride giving exactly `desired` steps."""
    for stride in range(1, num_timesteps):
        steps = list(range(0, num_timesteps, stride))
        if len(steps) == desired:
            return steps
    raise ValueError(f"timestep_respacing 'ddim{desired}': no integer stride gives exactly {desired} of "
                     f"{num_timesteps} steps")


def space_timesteps(num_timesteps: int, section_counts: SectionCounts) -> set[int]:
    """The original timesteps to keep.

    section_counts: "ddimN" (DDIM striding), "N" or "N1,N2,..." / [N1, N2, ...] (split [0, T) into equal sections
    and take Ni evenly spaced steps from section i, both ends included, rounding to the nearest step).
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            return set(_ddim_stride(num_timesteps, desired))
        try:
            section_counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing {section_counts!r}: expected 'N', 'N1,N2,...' or 'ddimN'") from None
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    counts = list(section_counts)
    if not counts or any(not isinstance(c, (int, np.integer)) or c < 1 for c in counts):
        raise ValueError(f"timestep_respacing: section counts must be positive integers, got {counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"timestep_respacing: cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Accumulated (not k * stride) so the float rounding, and thus the kept steps, equal ADM/DiT's.
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def respaced_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, list[int]]:
    """Betas of the shortened chain and the map from its indices to original timesteps.

    The kept steps reproduce the original alpha_bar exactly: 1 - beta'_k = alpha_bar[t_k] / alpha_bar[t_{k-1}].
    """
    keep = set(int(t) for t in use_timesteps)
    if not keep or min(keep) < 0 or max(keep) >= len(alphas_cumprod):
        raise ValueError(f"use_timesteps must lie in [0, {len(alphas_cumprod)}), got {sorted(keep)[:5]}...")
    betas, timestep_map, last = [], [], 1.0
    for t, alpha_bar in enumerate(alphas_cumprod):
        if t in keep:
            betas.append(1.0 - alpha_bar / last)
            last = alpha_bar
            timestep_map.append(t)
    return np.array(betas, dtype=np.float64), timestep_map
