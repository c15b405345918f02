"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper, with a guidance interval that really skips.

    out = uncond + s * (cond - uncond)   on the guided channels; every other channel is the conditional output.

By default only the first 3 channels are guided, as in the official FCDM/DiT `forward_with_cfg` (needed to reproduce
the paper's FIDs); `guide_all_channels=True` guides all C input channels (the standard form). Variance channels of a
learned-sigma model always come from the conditional pass. Inside the interval (Kynkaenniemi et al. 2024) the
conditional and unconditional passes run as one doubled batch, exactly like `forward_with_cfg`; outside it, and at
scale 1, the unconditional pass is not run at all. The null label is `num_classes`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch


class GuidedDenoiser:
    """`model(x, t, y)` made classifier-free guided; counts evaluations and network passes in `stats`."""

    def __init__(self, model: Callable, cfg_scale: float = 1.0, null_label: Optional[int] = None,
                 guide_all_channels: bool = False, interval: Optional[tuple[float, float]] = None,
                 noise_level: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 autocast_dtype: Optional[torch.dtype] = None):
        cfg_scale = float(cfg_scale)
        if not torch.isfinite(torch.tensor(cfg_scale)) or cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
        self.model, self.cfg_scale, self.guide_all_channels = model, cfg_scale, guide_all_channels
        self.uses_guidance = cfg_scale != 1.0
        if self.uses_guidance and null_label is None:
            null_label = getattr(model, "num_classes", None)
            if null_label is None:
                raise ValueError("null_label: the model has no num_classes attribute; pass null_label explicitly")
        self.null_label = null_label
        if interval is not None:
            low, high = (float(v) for v in interval)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"guidance_interval must be (low, high) with 0 <= low <= high <= 1, got {interval}")
            if noise_level is None:
                raise ValueError("noise_level: a guidance interval needs the objective's t -> noise-level map")
            interval = (low, high)
        self.interval, self.noise_level, self.autocast_dtype = interval, noise_level, autocast_dtype
        self.stats = {"nfe": 0, "forward_passes": 0, "cond_rows": 0, "uncond_rows": 0, "uncond_skipped": 0}

    def _in_interval(self, t: torch.Tensor) -> torch.Tensor:
        """Which samples lie inside the guidance interval at time t. (N,) bool"""
        level = self.noise_level(t)
        return (level >= self.interval[0]) & (level <= self.interval[1])

    def _forward(self, x, t, y) -> torch.Tensor:
        ctx = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            out = self.model(x, t, y)
        self.stats["forward_passes"] += 1
        return out.to(x.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W), t: (N,), y: (N,) -> (N, C_out, H, W)
        N = x.shape[0]
        self.stats["nfe"] += 1
        self.stats["cond_rows"] += N
        if not self.uses_guidance:
            return self._forward(x, t, y)
        if self.interval is None:
            n_active = N  # every sample is guided: no mask, and no host sync per step
        else:
            active = self._in_interval(t)
            n_active = int(active.sum())  # sizes the unconditional half, so it must be known on the host
            self.stats["uncond_skipped"] += N - n_active
            if n_active == 0:
                return self._forward(x, t, y)
        self.stats["uncond_rows"] += n_active
        every = n_active == N
        rows = slice(None) if every else active.nonzero().squeeze(1)
        null = torch.full((n_active,), self.null_label, dtype=y.dtype, device=y.device)
        out = self._forward(torch.cat([x, x[rows]]), torch.cat([t, t[rows]]), torch.cat([y, null]))
        cond, uncond = out[:N], out[N:]
        k = x.shape[1] if self.guide_all_channels else min(3, x.shape[1])
        guided = uncond[:, :k] + self.cfg_scale * (cond[rows, :k] - uncond[:, :k])
        if every:
            return torch.cat([guided, cond[:, k:]], dim=1)
        cond = cond.clone()
        cond[rows, :k] = guided
        return cond


__all__ = ["GuidedDenoiser"]
