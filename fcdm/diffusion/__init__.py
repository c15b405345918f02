"""DDPM objective and samplers with DiT's `create_diffusion` interface (learned-range sigma, hybrid loss).

    diffusion = create_diffusion("")                  # 1000-step training chain
    losses = diffusion.training_losses(model, x0, t, model_kwargs=dict(y=y))   # loss, mse, vb: (N,) each
    sampler = create_diffusion("250")                 # respaced: "250", "ddim50", "10,15,20" or [10, 15, 20]
    x = sampler.p_sample_loop(model, (N, C, H, W), noise, clip_denoised=False, model_kwargs=dict(y=y))
"""
from __future__ import annotations

import numpy as np

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, mean_flat
from .likelihoods import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .noise import gaussian_noise
from .respace import respaced_betas, space_timesteps
from .schedules import named_beta_schedule


def create_diffusion(timestep_respacing, noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, predict_xstart: bool = False, learn_sigma: bool = True,
                     rescale_learned_sigmas: bool = False, diffusion_steps: int = 1000) -> GaussianDiffusion:
    """A diffusion with DiT's meaning and defaults; `timestep_respacing` None/"" keeps all `diffusion_steps`."""
    betas = named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    mean_type = ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, timestep_map = respaced_betas(alphas_cumprod, space_timesteps(diffusion_steps, timestep_respacing))
    return GaussianDiffusion(betas=new_betas, model_mean_type=mean_type, model_var_type=var_type,
                             loss_type=loss_type, timestep_map=timestep_map, original_num_steps=diffusion_steps)


__all__ = ["create_diffusion", "GaussianDiffusion", "ModelMeanType", "ModelVarType", "LossType", "mean_flat",
           "normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "gaussian_noise",
           "space_timesteps", "respaced_betas", "named_beta_schedule"]
