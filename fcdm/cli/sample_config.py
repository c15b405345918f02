"""sample.py's flags: the parser, the checks between flags, and the settings a run directory records.

An unset model or sampling flag takes the checkpoint's stored training args, else the paper's setting. The official
and DiT spellings are accepted: --seed, --ddpm/--no-ddpm, --hf-model-dir/--hf-model-name and --vae ema|mse.
"""
from __future__ import annotations

import argparse
import os

import torch

from fcdm.flags import (add_backend_flag, add_device_flag, add_switch, add_vae_flags, existing_file, non_negative,
                        positive, unit_interval)
from fcdm.load import DEFAULT_SAMPLING, model_config, read_checkpoint_args, sampling_config
from fcdm.models import FCDM_models
from fcdm.objectives import OBJECTIVES
from fcdm.schedulers import SCHEDULERS
from fcdm.vae import PIXEL_SPACE, resolve_vae_name

# Settings that change the samples; a run directory may only be resumed with the same values.
RUN_KEYS = ("ckpt", "model", "image_size", "num_classes", "in_channels", "learn_sigma", "objective", "prediction",
            "sampler", "scheduler", "steps", "respacing", "eta", "diffusion_norm", "last_step_size", "cfg_scale",
            "guide_all_channels", "guidance_interval", "global_seed", "labels", "vae", "vae_scaling_factor",
            "per_proc_batch_size", "bf16", "tf32", "backend")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample N images from an FCDM checkpoint into one ADM-evaluator .npz, or "
                                "one image per class label as a grid (--class-labels).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model: an unset flag takes the checkpoint's training args, else the paper's setting "
                             "(FCDM-XL, 256 px, 1000 classes, 4 latent channels, ddpm, sd-vae-ft-ema, 0.18215)")
    g.add_argument("--ckpt", type=existing_file, required=True,
                   help="fcdm or official checkpoint, a state_dict, or a .safetensors file")
    g.add_argument("--model", choices=list(FCDM_models), default=None)
    g.add_argument("--image-size", type=positive(int), default=None, help="pixels; latents: divided by the VAE's 8")
    g.add_argument("--num-classes", type=positive(int), default=None)
    g.add_argument("--in-channels", type=positive(int), default=None)
    g.add_argument("--objective", choices=list(OBJECTIVES), default=None)
    add_switch(g, "--learn-sigma", None, "the model outputs 2*C channels (default: read from the weights)")
    add_switch(g, "--prefer-ema", True, "use the checkpoint's EMA weights when present")
    add_vae_flags(g, default=None, help="diffusers AutoencoderKL: hub name, directory, ema, mse; none: pixel space",
                  scale_default=None, scale_help="latent scale")
    add_backend_flag(g)
    g = p.add_argument_group("sampler")
    g.add_argument("--prediction", choices=["velocity", "noise", "score"], default="velocity", help="flow: the target")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "sde"], default=None,
                   help="default: ddpm for the ddpm objective, sde for flow (the official choices)")
    add_switch(g, "--ddpm", None, "official spelling: --ddpm is --sampler ddpm, --no-ddpm --sampler ddim")
    g.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                   help="a diffusers scheduler instead of --sampler (ddpm objective), for --steps steps")
    g.add_argument("--steps", "--num-sampling-steps", type=positive(int), default=250, help="NFE: steps (heun: 2x)")
    g.add_argument("--respacing", default=None, help="ddpm/ddim respacing, e.g. 'ddim50' or '10,15,25' (not --steps)")
    g.add_argument("--eta", type=non_negative(float), default=0.0, help="ddim noise scale (0: deterministic)")
    g.add_argument("--diffusion-norm", type=float, default=1.0, help="sde: diffusion coefficient scale")
    g.add_argument("--last-step-size", type=unit_interval(include_one=False), default=0.04,
                   help="sde: size of the final deterministic step")
    g.add_argument("--cfg-scale", type=non_negative(float), default=1.5, help="classifier-free guidance scale (1: off)")
    add_switch(g, "--guide-all-channels", False, "guide all latent channels (standard CFG), not the official first 3")
    g.add_argument("--guidance-interval", type=unit_interval(), nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="apply CFG only where the noise level (0 data .. 1 noise) is in [LOW, HIGH]")
    g = p.add_argument_group("run")
    g.add_argument("--num-fid-samples", type=positive(int), default=50_000)
    g.add_argument("--per-proc-batch-size", "--per_proc_batch_size", type=positive(int), default=64)
    g.add_argument("--global-seed", "--seed", type=int, default=0, help="sample i uses seed global_seed + i")
    g.add_argument("--labels", choices=["random", "balanced"], default="random",
                   help="random (official protocol) or class-balanced (sample i gets class i mod num_classes)")
    g.add_argument("--sample-dir", default="samples")
    g.add_argument("--run-name", default=None, help="sub-directory name (default: derived from the settings)")
    add_switch(g, "--save-png", False, "also write PNGs")
    add_switch(g, "--bf16", False, "bf16 autocast on GPU (off: fp32 + TF32, the official protocol; docs/sampling.md)")
    add_switch(g, "--tf32", True, "TF32 matmuls on GPU")
    add_device_flag(g)
    add_switch(g, "--cuda-graph", False, "replay the forward from CUDA graphs (fcdm.cuda_graph); CUDA only")
    add_switch(g, "--progress", True, "tqdm bar on rank 0")
    g = p.add_argument_group("quick look: one image per class label, as one grid image (FCDMPipeline)")
    g.add_argument("--class-labels", nargs="+", default=None, help="class numbers or ImageNet class names")
    g.add_argument("--grid", default=None, help="the grid's path (default: <sample-dir>/grid.png)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Each model and sampling flag left unset: the checkpoint's stored training args, else the paper's setting.
    stored = read_checkpoint_args(args.ckpt)
    vars(args).update(model_config(stored, args.model, in_channels=args.in_channels, num_classes=args.num_classes))
    vars(args).update(sampling_config(stored, **{k: getattr(args, k) for k in DEFAULT_SAMPLING}))
    args.vae = resolve_vae_name(args.vae) or PIXEL_SPACE
    chosen = args.sampler
    if args.ddpm is not None:
        args.sampler = "ddpm" if args.ddpm else "ddim"
    args.sampler = args.sampler or OBJECTIVES[args.objective].default_sampler
    for failed, message in [
        (args.grid is not None and args.class_labels is None, "--grid needs --class-labels"),
        (args.ddpm is not None and chosen not in (None, args.sampler),
         f"--ddpm/--no-ddpm contradict --sampler {chosen}"),
        (args.scheduler is not None and (args.objective != "ddpm" or chosen or args.ddpm is not None or args.eta
                                         or args.respacing), "--scheduler drives the ddpm objective and replaces "
         "--sampler, --ddpm, --eta and --respacing"),
        (args.sampler not in OBJECTIVES[args.objective].samplers, f"--sampler {args.sampler} does not fit "
         f"--objective {args.objective}; choose one of {OBJECTIVES[args.objective].samplers}"),
        (args.objective == "ddpm" and args.steps > 1000 and args.respacing is None,
         f"--steps must be <= 1000 for the ddpm objective, got {args.steps}"),
        (args.sampler == "sde" and args.steps < 2, "--steps must be >= 2 for the sde sampler"),
        (args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1],
         f"--guidance-interval needs LOW <= HIGH, got {args.guidance_interval}"),
        (args.eta != 0 and args.sampler != "ddim", "--eta applies to --sampler ddim only"),
        (args.respacing is not None and args.objective != "ddpm", "--respacing applies to the ddpm objective only"),
        (args.cuda_graph and (args.device == "cpu" or not torch.cuda.is_available()), "--cuda-graph needs a CUDA "
         "device, and none is available" + (" (--device cpu)" if args.device == "cpu" else ""))]:
        if failed:
            parser.error(message)
    args.ckpt = os.path.abspath(args.ckpt)
    return args
