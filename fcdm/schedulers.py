"""diffusers' schedulers driving an FCDM trained with the DDPM objective (epsilon prediction, learned variance).

    scheduler = build_scheduler("dpmsolver++", build_objective("ddpm"))   # betas copied from fcdm's own chain
    x, nfe = scheduler_sample(denoiser, scheduler, noise, y, steps=20)     # used by fcdm.sampling.generate

A scheduler gets the exact fp64 betas of the objective's 1000-step chain (`trained_betas`), so it walks the noise
levels the model was trained on. The learned-variance channels are split off before a step, except for diffusers'
DDPM, which reads them (variance_type="learned_range", fcdm's IDDPM parameterisation). Timesteps are "trailing"
(the first step starts at t = 999, as fcdm's respaced chains do) unless `overrides` say otherwise. The in-house
DDPM/DDIM samplers (fcdm.diffusion) stay the reference; tests/test_schedulers.py holds diffusers' DDIM to them.
"""
from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

# name -> (diffusers class name, its settings for FCDM)
SCHEDULERS = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmsolver++-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {"variance_type": "learned_range", "clip_sample": False}),
}
INSTALL_HINT = "pip install 'fcdm[vae]' (or: pip install diffusers)"


def import_diffusers():
    """The diffusers module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"diffusers' schedulers and VAEs need the diffusers package: {INSTALL_HINT}") from err
    return diffusers


def build_scheduler(name: str, objective, **overrides):
    """A diffusers scheduler named in SCHEDULERS, configured from `objective` (fcdm's DDPMObjective): its betas,
    its prediction type (epsilon, or sample for predict_xstart) and its number of training steps."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    if getattr(objective, "name", None) != "ddpm":
        name = getattr(objective, "name", objective)
        raise ValueError(f"diffusers' schedulers drive the ddpm objective, not {name!r}")
    class_name, settings = SCHEDULERS[name]
    diffusion = objective.diffusion
    prediction = "sample" if diffusion.model_mean_type.value == "start_x" else "epsilon"
    config = dict(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas.tolist(),
                  prediction_type=prediction, timestep_spacing="trailing", **settings)
    config.update(overrides)
    return getattr(import_diffusers(), class_name)(**config)


def _reads_variance(scheduler) -> bool:
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


@torch.no_grad()
def scheduler_sample(denoiser, scheduler, noise: torch.Tensor, y: torch.Tensor, steps: int, generator=None,
                     progress: bool = False) -> tuple[torch.Tensor, int]:
    """Sample from x_T = noise with a diffusers scheduler in `steps` steps. -> (samples, model evaluations)

    denoiser(x, t, y) returns the model output (C or 2C channels). The samples are fp64 for fp64 noise, else fp32
    (the scheduler's own tables are fp32, as diffusers builds them). generator: a torch.Generator or one per sample,
    for the schedulers that draw noise."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    scheduler.set_timesteps(steps, device=noise.device)
    channels = noise.shape[1]
    work = torch.float64 if noise.dtype == torch.float64 else torch.float32  # fp64 in, fp64 maths (tests)
    x = noise.to(work) * scheduler.init_noise_sigma
    # UniPC and Heun draw no noise and take no generator.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    nfe = 0
    for t in tqdm(scheduler.timesteps, leave=False, disable=not progress):
        model_input = scheduler.scale_model_input(x, t)
        out = denoiser(model_input, t.expand(len(x)).to(noise.device), y).to(work)
        nfe += 1
        if not _reads_variance(scheduler):
            out = out[:, :channels]
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x, nfe


__all__ = ["SCHEDULERS", "INSTALL_HINT", "build_scheduler", "import_diffusers", "scheduler_sample"]
