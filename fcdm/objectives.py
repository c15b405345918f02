"""The one interface the trainer and samplers use for either objective: DDPM (the paper's) or flow matching.

    obj = build_objective("ddpm")                 # or build_objective("flow", prediction="velocity", ...)
    t = obj.sample_t(batch_size, device)          # ddpm: long in [0, 1000); flow: float in [0, 1]
    losses = obj.training_losses(model, x0, t, model_kwargs=dict(y=y))   # losses["loss"]: (N,)
    x, nfe = obj.sample(denoiser, noise, y, sampler, steps)               # used by fcdm.sampling.generate
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .diffusion import create_diffusion
from .flow import FlowMatching, ode_sample, sde_sample


class DDPMObjective:
    """DiT's 1000-step linear-beta diffusion with learned-range sigma and the hybrid (MSE + VB) loss."""

    name = "ddpm"
    samplers = ("ddpm", "ddim")
    default_sampler = "ddpm"
    sampler_options = ("eta", "respacing", "clip_denoised")

    def __init__(self, **diffusion_kwargs):
        if "timestep_respacing" in diffusion_kwargs:
            raise ValueError("timestep_respacing: training uses the full chain; pass respacing to sample() instead")
        self.diffusion_kwargs = diffusion_kwargs
        self.diffusion = create_diffusion("", **diffusion_kwargs)
        self.num_timesteps = self.diffusion.num_timesteps
        self._respaced = lru_cache(maxsize=8)(lambda spec: create_diffusion(spec, **self.diffusion_kwargs))

    def sample_t(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        return self.diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep -> fraction of the chain, t / T in [0, 1)."""
        return t.float() / self.diffusion.original_num_steps

    def sampling_diffusion(self, steps: int, respacing=None):
        """The respaced chain: `respacing` ("250", "ddim50", "10,15,20") or else `steps` evenly spaced steps."""
        spec = respacing if respacing is not None else str(int(steps))
        return self._respaced(spec if isinstance(spec, str) else ",".join(str(int(c)) for c in spec))

    def sample(self, denoiser, noise, y, sampler: str, steps: int, generator=None, progress: bool = False,
               eta: float = 0.0, respacing=None, clip_denoised: bool = False):
        """DDPM ancestral or DDIM sampling from x_T = noise; returns (samples, nfe)."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} does not fit the ddpm objective; choose one of {self.samplers}")
        if respacing is None and (not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps):
            raise ValueError(f"steps must be an integer in [1, {self.num_timesteps}], got {steps!r}")
        diffusion = self.sampling_diffusion(steps, respacing)
        kwargs = dict(noise=noise, clip_denoised=clip_denoised, model_kwargs=dict(y=y), progress=progress,
                      generator=generator)
        if sampler == "ddpm":
            if eta != 0.0:
                raise ValueError("eta applies to the ddim sampler only")
            x = diffusion.p_sample_loop(denoiser, tuple(noise.shape), **kwargs)
        else:
            x = diffusion.ddim_sample_loop(denoiser, tuple(noise.shape), eta=eta, **kwargs)
        return x, diffusion.num_timesteps


class FlowObjective:
    """SiT-style flow matching on the linear path (velocity prediction by default)."""

    name = "flow"
    samplers = ("euler", "heun", "sde")
    default_sampler = "sde"
    sampler_options = ("diffusion_norm", "last_step_size")

    def __init__(self, **flow_kwargs):
        self.flow = FlowMatching(**flow_kwargs)

    def sample_t(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.flow.sample_t(batch_size, device, generator)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        return self.flow.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise)

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        return self.flow.noise_level(t)

    def sample(self, denoiser, noise, y, sampler: str, steps: int, generator=None, progress: bool = False,
               diffusion_norm: float = 1.0, last_step_size: float = 0.04):
        """ODE (euler/heun) or Euler-Maruyama SDE sampling from t = 0 noise; returns (samples, nfe)."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler {sampler!r} does not fit the flow objective; choose one of {self.samplers}")
        def denoise(x, t):
            return denoiser(x, t, y)
        if sampler == "sde":
            return sde_sample(self.flow, denoise, noise, steps, diffusion_norm, last_step_size, generator, progress)
        return ode_sample(self.flow, denoise, noise, steps, sampler, progress)


OBJECTIVES = {"ddpm": DDPMObjective, "flow": FlowObjective}


def build_objective(name: str, **kwargs):
    """'ddpm' (create_diffusion kwargs) or 'flow' (FlowMatching kwargs: prediction, t_sampling, ...)."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](**kwargs)


__all__ = ["build_objective", "DDPMObjective", "FlowObjective", "OBJECTIVES"]
