"""The sampling loop the model benchmark times: DDPM with classifier-free guidance, optionally CUDA-graphed.

The denoiser is the one `sample.py` uses: fcdm.guidance.GuidedDenoiser, with the conditional and unconditional halves
as one doubled-batch forward (all eps channels guided), around the network or, with `cuda_graph=True`, around
fcdm.cuda_graph.GraphedForward (`sample.py --cuda-graph`), which replays the forward from a CUDA graph and removes
the CPU cost of launching every kernel of the step. The chain is fcdm.diffusion's DiT-compatible `p_sample_loop`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from fcdm.cuda_graph import GraphedForward
from fcdm.diffusion import create_diffusion
from fcdm.guidance import GuidedDenoiser

SAMPLE_STEPS = 250
NULL_LABEL = 1000  # the extra row of ImageNet's label table used for the unconditional half


def make_sample_run(model: nn.Module, batch: int, latent: int, device, precision: str, steps: int,
                    cfg_scale: float, cuda_graph: bool) -> tuple[Callable[[], None], str]:
    """One sampling run of `steps` DDPM steps with CFG, and the sampler's name."""
    model.eval()
    net = GraphedForward(model, max_graphs=1) if cuda_graph else model
    denoiser = GuidedDenoiser(net, cfg_scale, NULL_LABEL, guide_all_channels=True,
                              autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    z = torch.randn(batch, 4, latent, latent, generator=gen, device=device)
    diffusion = create_diffusion(str(steps))

    def run():
        diffusion.p_sample_loop(denoiser, tuple(z.shape), noise=z.clone(), clip_denoised=False,
                                model_kwargs=dict(y=y))
    return run, "fcdm.diffusion p_sample_loop"
