"""Sample N images from an FCDM checkpoint into one ADM-evaluator .npz (key arr_0, uint8 NHWC).

    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --model FCDM-XL --num-fid-samples 50000 --sample-dir out
    python sample.py ...                     # one process (CPU or one GPU)
    fcdm-sample ...                          # the same code, installed with fcdm (torchrun --no-python fcdm-sample)

Sample i uses its own seed global_seed + i and the global batches are fixed blocks of --per-proc-batch-size
samples, so the output does not depend on the number of processes. Each finished batch is written as a shard file;
rerunning the same command skips finished shards (resume), and rank 0 merges the shards into `<run>.npz`.
The model comes from fcdm.load, the VAE from fcdm.vae, the shards from fcdm.eval.npz. See docs/sampling.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from fcdm import distributed, set_backend
from fcdm.cuda_graph import GraphedForward
from fcdm.eval.npz import NpzShards
from fcdm.flags import (add_backend_flag, add_device_flag, add_switch, add_vae_flags, existing_file, non_negative,
                        positive, unit_interval)
from fcdm.load import DEFAULT_SAMPLING, load_fcdm, model_config, read_checkpoint_args, sampling_config
from fcdm.models import FCDM_models
from fcdm.objectives import OBJECTIVES, build_objective
from fcdm.sampling import generate, seeded_batch
from fcdm.vae import decode, downsampling_factor, load_vae, to_uint8

# Settings that change the samples; a run directory may only be resumed with the same values.
RUN_KEYS = ("ckpt", "model", "image_size", "num_classes", "in_channels", "learn_sigma", "objective", "prediction",
            "sampler", "steps", "respacing", "eta", "diffusion_norm", "last_step_size", "cfg_scale",
            "guide_all_channels", "guidance_interval", "global_seed", "labels", "vae", "vae_scaling_factor",
            "per_proc_batch_size", "bf16", "tf32", "backend")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
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
    add_vae_flags(g, default=None, help="diffusers AutoencoderKL, hub name or directory; 'none': pixel space",
                  scale_default=None, scale_help="latent scale")
    add_backend_flag(g)
    g = p.add_argument_group("sampler")
    g.add_argument("--prediction", choices=["velocity", "noise", "score"], default="velocity", help="flow: the target")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "sde"], default=None,
                   help="default: ddpm for the ddpm objective, sde for flow (the official choices)")
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
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--labels", choices=["random", "balanced"], default="random",
                   help="random (official protocol) or class-balanced (sample i gets class i mod num_classes)")
    g.add_argument("--sample-dir", default="samples")
    g.add_argument("--run-name", default=None, help="sub-directory name (default: derived from the settings)")
    add_switch(g, "--save-png", False, "also write PNGs")
    add_switch(g, "--bf16", True, "bf16 autocast on GPU")
    add_switch(g, "--tf32", True, "TF32 matmuls on GPU")
    add_device_flag(g)
    add_switch(g, "--cuda-graph", False, "replay the forward from CUDA graphs (fcdm.cuda_graph); CUDA only")
    add_switch(g, "--progress", True, "tqdm bar on rank 0")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Each model and sampling flag left unset: the checkpoint's stored training args, else the paper's setting.
    stored = read_checkpoint_args(args.ckpt)
    vars(args).update(model_config(stored, args.model, in_channels=args.in_channels, num_classes=args.num_classes))
    vars(args).update(sampling_config(stored, **{k: getattr(args, k) for k in DEFAULT_SAMPLING}))
    args.sampler = args.sampler or OBJECTIVES[args.objective].default_sampler
    for failed, message in [
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


def load_model(args, device: torch.device):
    """The FCDM (EMA weights unless --no-prefer-ema) on `device`, in eval mode; CUDA-graphed with --cuda-graph."""
    model, loaded = load_fcdm(args.ckpt, args.prefer_ema, args.learn_sigma, device, model=args.model,
                              hidden_size=args.hidden_size, depth=args.depth, in_channels=args.in_channels,
                              num_classes=args.num_classes)
    if not loaded.has_null_label and args.cfg_scale != 1:
        raise ValueError("the checkpoint has no null-label row (trained without label dropout); use --cfg-scale 1")
    args.learn_sigma = loaded.config["learn_sigma"]
    distributed.print0(f"Loaded {args.model} from {args.ckpt}: using {loaded.describe()}; "
                       f"learn_sigma={args.learn_sigma}")
    return GraphedForward(model) if args.cuda_graph else model


def load_decoder(args, device: torch.device):
    """(VAE or None for --vae none, the latent shape (C, h, w))."""
    vae = load_vae(args.vae, device) if args.vae.lower() != "none" else None
    factor = downsampling_factor(vae) if vae is not None else 1
    if args.image_size % (4 * factor):
        raise ValueError(f"--image-size {args.image_size} must be divisible by {4 * factor} (VAE factor {factor} x "
                         "FCDM's 4)")
    if vae is None and args.in_channels not in (1, 3):
        raise ValueError(f"pixel-space sampling (--vae none) needs 1 or 3 image channels, got --in-channels "
                         f"{args.in_channels}")
    return vae, (args.in_channels, args.image_size // factor, args.image_size // factor)


def run_name(args) -> str:
    """The sub-directory of --sample-dir: --run-name, or one derived from the settings that change the samples."""
    return args.run_name or (
        f"{args.model}-{os.path.splitext(os.path.basename(args.ckpt))[0]}-size-{args.image_size}-{args.objective}-"
        f"{args.sampler}-{args.respacing or args.steps}-cfg-{args.cfg_scale}"
        + ("-allch" if args.cfg_scale != 1 and args.guide_all_channels else "")
        + ("-gi-{}-{}".format(*args.guidance_interval) if args.guidance_interval is not None else "")
        + (f"-eta-{args.eta}" if args.eta else "") + f"-{args.labels}-seed-{args.global_seed}")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        info = distributed.init(args.device)
        if args.backend is not None:
            set_backend(args.backend)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            torch.backends.cudnn.allow_tf32 = args.tf32
        with torch.no_grad():
            sample(args, info)
    except (ValueError, ImportError) as err:  # checkpoint, VAE, device and run-directory errors: a message
        if os.environ.get("FCDM_DEBUG"):
            raise
        print(f"sample.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        distributed.cleanup()


def sample(args, info) -> None:
    """Every batch of this rank that has no shard yet, then (rank 0) the merged .npz."""
    model = load_model(args, info.device)
    vae, shape = load_decoder(args, info.device)
    objective = build_objective(args.objective, **({"prediction": args.prediction} if args.objective == "flow"
                                                   else {"learn_sigma": args.learn_sigma}))
    options = {k: getattr(args, k) for k in objective.sampler_options if hasattr(args, k)}  # eta, respacing, ...
    out_dir = os.path.join(args.sample_dir, run_name(args))
    shards = NpzShards(out_dir, args.num_fid_samples, args.per_proc_batch_size)
    if info.rank == 0:
        shards.record_settings({k: getattr(args, k) for k in RUN_KEYS})  # refuses a directory of other settings
        if args.save_png:
            os.makedirs(os.path.join(out_dir, "png"), exist_ok=True)
    distributed.barrier()
    if not os.path.exists(shards.settings_path):
        raise SystemExit(2)  # rank 0 refused the directory and has said why
    mine, todo = shards.todo(info.rank, info.world_size)
    distributed.print0(f"{args.num_fid_samples} samples in {len(shards.blocks)} batches of {args.per_proc_batch_size} "
                       f"over {info.world_size} process(es); rank 0 has {len(mine) - len(todo)} of {len(mine)} batches "
                       f"done already. Output: {out_dir}.npz")
    autocast = torch.bfloat16 if (args.bf16 and info.device.type == "cuda") else None
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="batch", dynamic_ncols=True,
               disable=info.rank != 0 or not args.progress)
    stats = {}
    for k in todo:
        indices = shards.blocks[k]
        y, noise, generators = seeded_batch(indices.tolist(), args.global_seed, args.num_classes, shape, info.device,
                                            balanced_labels=args.labels == "balanced")
        x = generate(model, objective, y, shape, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                     guide_all_channels=args.guide_all_channels, guidance_interval=args.guidance_interval,
                     noise=noise, generator=generators, autocast_dtype=autocast, stats=stats, **options)
        x = decode(vae, x, args.vae_scaling_factor) if vae is not None else x.expand(-1, 3, -1, -1)  # grey -> RGB
        images = to_uint8(x).cpu().numpy()
        shards.write(k, y.cpu().numpy(), images)
        for i, image in zip(indices, images) if args.save_png else ():
            Image.fromarray(image).save(os.path.join(out_dir, "png", f"{i:06d}.png"))
        bar.update(1)
        bar.set_postfix(nfe=stats.get("nfe"))
    bar.close()
    distributed.barrier()
    if info.rank == 0:
        shape_out = shards.merge(out_dir + ".npz")
        print(f"Wrote {out_dir}.npz: arr_0 {shape_out} uint8" + (f"; {stats['nfe']} model evaluations per sample "
              f"({stats['forward_passes']} network passes per batch)" if stats else ""), flush=True)
    distributed.barrier()


if __name__ == "__main__":
    main()
