"""The sampling loop the model benchmark times: DDPM with classifier-free guidance, optionally CUDA-graphed.

The denoiser runs the conditional and unconditional halves as one doubled-batch forward and guides all eps channels.
With `cuda_graph=True` that forward is captured once into a CUDA graph (fcdm.cuda_graph, as `sample.py --cuda-graph`)
and replayed each step, which removes the CPU cost of launching every kernel of the step. The chain is
fcdm.diffusion's DiT-compatible `p_sample_loop` (learned-range variance) when that package is present, else a minimal
local DDPM loop.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from fcdm.cuda_graph import GraphedForward

SAMPLE_STEPS = 250
NULL_LABEL = 1000  # the extra row of ImageNet's label table used for the unconditional half


def _autocast(device: torch.device, precision: str):
    # No autocast weight cache: sampling never reuses a cast across calls, and graphs must not read cached casts.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)


class CFGDenoiser:
    """Classifier-free guidance around a network: one doubled-batch forward, guidance on all eps channels.

    With `cuda_graph=True` the network forward is fcdm.cuda_graph.GraphedForward, the graphs `sample.py --cuda-graph`
    uses: captured on the first call and replayed after."""

    def __init__(self, net: nn.Module, cfg_scale: float, device, precision: str, cuda_graph: bool):
        self.cfg_scale, self.device, self.precision = cfg_scale, device, precision
        self.forward = GraphedForward(net, max_graphs=1) if cuda_graph else net

    def _net(self, x, t, y):
        with torch.no_grad(), _autocast(self.device, self.precision):
            return self.forward(x, t, y)

    def __call__(self, x, t, y):
        # x: (N, 4, h, w) -> (N, 8, h, w): guided eps, conditional variance channels
        null = torch.full_like(y, NULL_LABEL)
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
        out = self._net(x2, t2, y2).float()
        cond, uncond = out.chunk(2)
        eps = uncond[:, :4] + self.cfg_scale * (cond[:, :4] - uncond[:, :4])
        return torch.cat([eps, cond[:, 4:]], dim=1)


def local_ddpm_loop(denoiser, z, y, steps: int) -> torch.Tensor:
    """Minimal ancestral DDPM on `steps` evenly respaced steps of the linear 1000-step schedule (fixed variance)."""
    ac_full = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    used = torch.linspace(0, 999, steps).round().long()
    ac = ac_full[used]
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    for i in range(steps - 1, -1, -1):
        t = torch.full((z.shape[0],), int(used[i]), device=z.device, dtype=torch.long)
        eps = denoiser(z, t, y)[:, :4]
        a, a_prev = float(ac[i]), float(ac_prev[i])
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        beta = 1 - a / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * z
        z = mean + (math.sqrt(beta * (1 - a_prev) / (1 - a)) * torch.randn_like(z) if i > 0 else 0)
    return z


def make_sample_run(model: nn.Module, batch: int, latent: int, device, precision: str, steps: int,
                    cfg_scale: float, cuda_graph: bool) -> tuple[Callable[[], None], str]:
    """One sampling run of `steps` DDPM steps with CFG; fcdm.diffusion's sampler when it is there."""
    model.eval()
    denoiser = CFGDenoiser(model, cfg_scale, device, precision, cuda_graph)
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    z = torch.randn(batch, 4, latent, latent, generator=gen, device=device)
    try:
        from fcdm.diffusion import create_diffusion
        diffusion = create_diffusion(str(steps))

        def run():
            diffusion.p_sample_loop(denoiser, tuple(z.shape), noise=z.clone(),
                                    clip_denoised=False, model_kwargs=dict(y=y))
        return run, "fcdm.diffusion p_sample_loop"
    except ImportError:
        return (lambda: local_ddpm_loop(denoiser, z.clone(), y, steps)), "local DDPM loop"
