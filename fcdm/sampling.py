"""`generate`: class-conditional samples from a model and an objective, with CFG, any sampler, and NFE stats.

    x = generate(model, build_objective("ddpm"), y, shape=(4, 32, 32), sampler="ddpm", steps=250, cfg_scale=1.5)
    stats = {}; x = generate(..., stats=stats); stats["nfe"]   # model evaluations per trajectory

Per-sample determinism: `seeded_batch(indices, global_seed, ...)` gives each sample i its own generator seeded with
global_seed + i; pass the list as `generator` and sample i's noise no longer depends on its batch (on a GPU, bf16
kernels may still round differently at another batch size, so images can differ in their last bits).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch

from .diffusion.noise import GeneratorLike, gaussian_noise, module_device
from .guidance import GuidedDenoiser
from .objectives import build_objective
from .schedulers import build_scheduler, scheduler_sample


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode while sampling (FCDM drops labels in train mode), restored afterwards."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def generate(model, objective, y: torch.Tensor, shape: Sequence[int], sampler: Optional[str] = None,
             steps: int = 250, cfg_scale: float = 1.0, guide_all_channels: bool = False,
             guidance_interval: Optional[tuple[float, float]] = None, noise: Optional[torch.Tensor] = None,
             generator: GeneratorLike = None, progress: bool = False, null_label: Optional[int] = None,
             autocast_dtype: Optional[torch.dtype] = None, stats: Optional[dict] = None, scheduler=None,
             **sampler_options) -> torch.Tensor:
    """Sample len(y) images/latents of `shape` (C, H, W) from `model(x, t, y)`. -> (B, C, H, W) float32.

    objective: an object from build_objective, or its name. sampler: "ddpm"/"ddim" (ddpm objective) or
    "euler"/"heun"/"sde" (flow objective); default ddpm resp. sde. scheduler: instead of `sampler`, a diffusers
    scheduler (ddpm objective): a name of fcdm.schedulers.SCHEDULERS ("dpmsolver++", "unipc", "ddim", "euler", ...)
    or a configured scheduler object, run for `steps` steps. guidance_interval=(low, high) applies CFG only
    where the noise level (0 = data, 1 = noise; DDPM t/1000, flow 1 - t) lies in [low, high]. sampler_options:
    eta, respacing, clip_denoised (ddpm/ddim); diffusion_norm, last_step_size (sde). If `stats` is a dict it is
    filled with nfe (model evaluations per trajectory), forward_passes, cond_rows, uncond_rows, uncond_skipped.
    """
    if isinstance(objective, str):
        objective = build_objective(objective)
    if scheduler is not None and (sampler is not None or sampler_options):
        raise ValueError("scheduler replaces sampler and its options; pass one or the other")
    if isinstance(scheduler, str):
        scheduler = build_scheduler(scheduler, objective)
    sampler = sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit the {objective.name} objective; "
                         f"choose one of {objective.samplers}")
    unknown = sorted(set(sampler_options) - set(objective.sampler_options))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of the {objective.name} samplers "
                         f"(options: {', '.join(objective.sampler_options)})")
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
    device = module_device(model)
    y = torch.as_tensor(y, device=device).long().view(-1)
    if noise is None:
        noise = gaussian_noise((len(y), *shape), generator, device)
    elif tuple(noise.shape) != (len(y), *shape):
        raise ValueError(f"noise must have shape {(len(y), *shape)}, got {tuple(noise.shape)}")
    noise = noise.to(device=device, dtype=torch.float32)
    denoiser = GuidedDenoiser(model, cfg_scale, null_label, guide_all_channels, guidance_interval,
                              objective.noise_level, autocast_dtype)
    with _eval_mode(model), torch.no_grad():
        if scheduler is not None:
            x, nfe = scheduler_sample(denoiser, scheduler, noise, y, steps, generator, progress)
        else:
            x, nfe = objective.sample(denoiser, noise, y, sampler, steps, generator=generator, progress=progress,
                                      **sampler_options)
    if stats is not None:
        stats.update(denoiser.stats)
        stats["nfe"] = nfe
    return x


def per_sample_generators(seeds: Sequence[int], device: Union[str, torch.device] = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded with its own seed."""
    device = torch.device(device)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def seeded_batch(indices: Sequence[int], global_seed: int, num_classes: int, shape: Sequence[int],
                 device: Union[str, torch.device] = "cpu", balanced_labels: bool = True):
    """Labels, initial noise and generators for samples `indices`, each from its own seed global_seed + i.

    Labels are i mod num_classes (balanced) or drawn first from the sample's generator. -> (y, noise, generators)
    """
    generators = per_sample_generators([global_seed + int(i) for i in indices], device)
    if balanced_labels:
        y = torch.tensor([int(i) % num_classes for i in indices], device=device)
    else:
        y = torch.stack([torch.randint(num_classes, (), generator=g, device=g.device) for g in generators]).to(device)
    noise = gaussian_noise((len(generators), *shape), generators, device)
    return y, noise, generators


__all__ = ["generate", "per_sample_generators", "seeded_batch"]
