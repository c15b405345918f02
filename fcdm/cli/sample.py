"""Sample N images from an FCDM checkpoint into one ADM-evaluator .npz (key arr_0, uint8 NHWC).

    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --model FCDM-XL --num-fid-samples 50000 --sample-dir out
    python sample.py ...                     # one process (CPU or one GPU)
    fcdm-sample ...                          # the same code, installed with fcdm (torchrun --no-python fcdm-sample)

Sample i uses its own seed global_seed + i and the global batches are fixed blocks of --per-proc-batch-size
samples, so the output does not depend on the number of processes. Each finished batch is written as a shard file;
rerunning the same command skips finished shards (resume), and rank 0 merges the shards into `<run>.npz`.
See docs/sampling.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import zipfile

import numpy as np
import torch

from fcdm import FCDM_models, set_backend
from fcdm.cuda_graph import GraphedForward
from fcdm.load import CheckpointError, fit_state, read_checkpoint_args, read_model_state
from fcdm.objectives import OBJECTIVES, build_objective
from fcdm.sampling import generate, seeded_batch
from fcdm import distributed

SAMPLERS = {name: objective.samplers for name, objective in OBJECTIVES.items()}
# Settings that change the samples; a run directory may only be resumed with the same values.
RUN_KEYS = ("ckpt", "model", "image_size", "num_classes", "in_channels", "learn_sigma", "objective", "prediction",
            "sampler", "steps", "respacing", "eta", "diffusion_norm", "last_step_size", "cfg_scale",
            "guide_all_channels", "guidance_interval", "global_seed", "labels", "vae", "vae_scaling_factor",
            "per_proc_batch_size", "bf16", "tf32", "backend")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, help="checkpoint: fcdm/official dict with 'ema'/'model', or a state_dict")
    # These default to the checkpoint's training args when it stores them (fcdm and official checkpoints do),
    # else to CHECKPOINT_FREE_DEFAULTS; a flag given on the command line always wins.
    g.add_argument("--model", choices=list(FCDM_models), default=None, help="default: the checkpoint's, or FCDM-XL")
    g.add_argument("--image-size", type=int, default=None,
                   help="pixels; the latent is image-size / VAE factor (8). Default: the checkpoint's, or 256")
    g.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, or 1000")
    g.add_argument("--in-channels", type=int, default=None, help="default: the checkpoint's, or 4")
    g.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="model outputs 2*C channels (default: read from the checkpoint)")
    g.add_argument("--prefer-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the checkpoint's EMA weights when present")
    g.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default=None,
                   help="fused-op backend (default: FCDM_BACKEND or auto)")
    g = p.add_argument_group("sampler")
    g.add_argument("--objective", choices=list(OBJECTIVES), default=None, help="default: the checkpoint's, or ddpm")
    g.add_argument("--prediction", choices=["velocity", "noise", "score"], default="velocity",
                   help="flow objective: what the model predicts")
    g.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "sde"], default=None,
                   help="default: ddpm for the ddpm objective, sde for flow (the official choices)")
    g.add_argument("--steps", "--num-sampling-steps", type=int, default=250, help="sampling steps (NFE = steps, "
                   "or 2*steps for heun)")
    g.add_argument("--respacing", default=None, help="ddpm/ddim timestep respacing, e.g. 'ddim50' or '10,15,25' "
                   "(overrides --steps)")
    g.add_argument("--eta", type=float, default=0.0, help="ddim noise scale (0: deterministic)")
    g.add_argument("--diffusion-norm", type=float, default=1.0, help="sde: diffusion coefficient scale")
    g.add_argument("--last-step-size", type=float, default=0.04, help="sde: size of the final deterministic step")
    g.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: off)")
    g.add_argument("--guide-all-channels", action=argparse.BooleanOptionalAction, default=False,
                   help="guide all latent channels (standard CFG) instead of the official first 3")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="apply CFG only where the noise level (0 data .. 1 noise) is in [LOW, HIGH]")
    g = p.add_argument_group("run")
    g.add_argument("--num-fid-samples", type=int, default=50_000)
    g.add_argument("--per-proc-batch-size", "--per_proc_batch_size", type=int, default=64)
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--labels", choices=["random", "balanced"], default="random",
                   help="random (official protocol) or class-balanced (sample i gets class i mod num_classes)")
    g.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL: hub name or local directory; 'none' for pixel-space models")
    g.add_argument("--vae-scaling-factor", type=float, default=None, help="default: the checkpoint's, or 0.18215")
    g.add_argument("--sample-dir", default="samples")
    g.add_argument("--run-name", default=None, help="sub-directory name (default: derived from the settings)")
    g.add_argument("--save-png", action=argparse.BooleanOptionalAction, default=False, help="also write PNGs")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPU")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: this process's GPU when there is one, else the CPU")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="replay the model forward from CUDA graphs (one launch per step; fcdm.cuda_graph); CUDA only")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar on rank 0")
    return p


CHECKPOINT_FREE_DEFAULTS = dict(model="FCDM-XL", image_size=256, num_classes=1000, in_channels=4, objective="ddpm",
                                vae="stabilityai/sd-vae-ft-ema", vae_scaling_factor=0.18215)


def fill_from_checkpoint(args: argparse.Namespace) -> None:
    """Fill the model flags left unset from the checkpoint's stored training args, then from the defaults."""
    stored = read_checkpoint_args(args.ckpt) if os.path.isfile(args.ckpt) else {}
    args.hidden_size = args.depth = None
    if args.model is None and stored.get("model") in FCDM_models:
        args.model = stored["model"]
        # A checkpoint trained with a custom width/depth stores them; the named config's values are the fallback.
        args.hidden_size, args.depth = stored.get("hidden_size"), stored.get("depth")
    for key, default in CHECKPOINT_FREE_DEFAULTS.items():
        if getattr(args, key) is None:
            value = stored.get(key, default)
            if key == "image_size" and "image_size" not in stored and "input_size" in stored:
                value = None  # latent size only: cannot tell the pixel size without the VAE
            if key == "vae" and key in stored and not value:
                value = "none"  # trained in pixel space
            setattr(args, key, default if value is None else value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    fill_from_checkpoint(args)
    args.sampler = args.sampler or OBJECTIVES[args.objective].default_sampler
    if args.sampler not in SAMPLERS[args.objective]:
        parser.error(f"--sampler {args.sampler} does not fit --objective {args.objective}; "
                     f"choose one of {SAMPLERS[args.objective]}")
    positive = ("num_fid_samples", "per_proc_batch_size", "steps", "image_size", "num_classes", "in_channels")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.objective == "ddpm" and args.steps > 1000 and args.respacing is None:
        parser.error(f"--steps must be <= 1000 for the ddpm objective, got {args.steps}")
    if args.sampler == "sde" and args.steps < 2:
        parser.error("--steps must be >= 2 for the sde sampler")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        parser.error(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    if args.guidance_interval is not None and not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        parser.error(f"--guidance-interval needs 0 <= LOW <= HIGH <= 1, got {args.guidance_interval}")
    if args.eta != 0 and args.sampler != "ddim":
        parser.error("--eta applies to --sampler ddim only")
    if args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    if args.respacing is not None and args.objective != "ddpm":
        parser.error("--respacing applies to the ddpm objective only")
    if not 0 <= args.last_step_size < 1:
        parser.error(f"--last-step-size must be in [0, 1), got {args.last_step_size}")
    if args.vae_scaling_factor <= 0:
        parser.error(f"--vae-scaling-factor must be > 0, got {args.vae_scaling_factor}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.cuda_graph and (args.device == "cpu" or not torch.cuda.is_available()):
        parser.error("--cuda-graph needs a CUDA device, and none is available"
                     + (" (--device cpu)" if args.device == "cpu" else ""))
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt!r} does not exist or is not a file")
    args.ckpt = os.path.abspath(args.ckpt)
    return args


def fail(message: str) -> None:
    print(f"sample.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- setup ---------------------------------------------------------------------------------------------------
def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from the trainer's process setup (torchrun or a single process; device 'auto' is
    this rank's GPU if there is one), with its errors reported as sample.py errors."""
    try:
        info = distributed.init(device)
    except ValueError as err:
        fail(str(err))
    return info.rank, info.world_size, info.device


def build_model(args, state: dict) -> torch.nn.Module:
    """FCDM with learn_sigma and the null-label row read from the checkpoint where the flags leave them open."""
    learn_sigma = args.learn_sigma
    out_w = state.get("final_layer.conv.weight")
    if learn_sigma is None:
        learn_sigma = out_w is None or out_w.shape[0] == 2 * args.in_channels
    label_w = state.get("y_embedder_1.embedding_table.weight")
    rows = None if label_w is None else label_w.shape[0]
    if rows is not None and rows not in (args.num_classes, args.num_classes + 1):
        fail(f"the checkpoint has {rows} label rows; --num-classes {args.num_classes} expects "
             f"{args.num_classes + 1} (with the null label) or {args.num_classes}")
    has_null = rows is None or rows == args.num_classes + 1
    if not has_null and args.cfg_scale != 1:
        fail("the checkpoint has no null-label row (trained without label dropout); use --cfg-scale 1")
    args.learn_sigma = learn_sigma
    shape = {} if args.hidden_size is None else dict(hidden_size=int(args.hidden_size), depth=tuple(args.depth))
    return FCDM_models[args.model](in_channels=args.in_channels, num_classes=args.num_classes,
                                   learn_sigma=learn_sigma, class_dropout_prob=0.1 if has_null else 0.0, **shape)


def load_vae(args, device):
    """(vae or None, downsampling factor)."""
    if args.vae.lower() == "none":
        return None, 1
    from diffusers.models import AutoencoderKL
    local = os.path.isdir(args.vae)
    try:
        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=local)
    except Exception as err:
        fail(f"cannot load --vae {args.vae!r}: {type(err).__name__}: {err}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.to(device).eval().requires_grad_(False), factor  # decoding must not record a graph


def run_name(args) -> str:
    name = (f"{args.model}-{os.path.splitext(os.path.basename(args.ckpt))[0]}-size-{args.image_size}-"
            f"{args.objective}-{args.sampler}-{args.respacing or args.steps}-cfg-{args.cfg_scale}")
    if args.cfg_scale != 1 and args.guide_all_channels:
        name += "-allch"
    if args.guidance_interval is not None:
        name += "-gi-{}-{}".format(*args.guidance_interval)
    if args.eta:
        name += f"-eta-{args.eta}"
    return name + f"-{args.labels}-seed-{args.global_seed}"


def check_run_config(out_dir: str, args, rank: int) -> None:
    """Record the run's settings; refuse to resume into a directory made with different ones."""
    path = os.path.join(out_dir, "config.json")
    config = {k: getattr(args, k) for k in RUN_KEYS}
    config["guidance_interval"] = list(config["guidance_interval"]) if config["guidance_interval"] else None
    if rank == 0:
        os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff:
                fail(f"{out_dir} holds a run with other settings ({', '.join(diff)} differ); pick another "
                     "--sample-dir or --run-name")
        else:
            with open(path + ".tmp", "w") as f:
                json.dump(config, f, indent=1)
            os.replace(path + ".tmp", path)
    distributed.barrier()
    if rank != 0 and not os.path.exists(path):
        raise SystemExit(2)  # rank 0 failed the check and has explained why


# ---- shards --------------------------------------------------------------------------------------------------
def shard_path(out_dir: str, batch: int) -> str:
    return os.path.join(out_dir, "shards", f"batch_{batch:06d}.npz")


def shard_done(path: str, indices: np.ndarray) -> bool:
    if not os.path.exists(path):
        return False
    try:
        with np.load(path) as shard:
            return np.array_equal(shard["indices"], indices) and shard["images"].shape[0] == len(indices)
    except Exception:
        return False  # a torn or corrupt shard is simply redone


def write_shard(path: str, indices: np.ndarray, labels: np.ndarray, images: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, indices=indices, labels=labels, images=images)
    os.replace(tmp, path)  # atomic: a shard exists only when complete


def merge_shards(out_dir: str, batches: list[np.ndarray], npz_path: str) -> tuple[int, ...]:
    """Stream the shards, in sample order, into one .npz holding arr_0 (N, H, W, 3) uint8, without holding all."""
    with np.load(shard_path(out_dir, 0)) as first:
        image_shape = first["images"].shape[1:]
    total = sum(len(b) for b in batches)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (total, *image_shape)}
    tmp = npz_path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for batch, indices in enumerate(batches):
                with np.load(shard_path(out_dir, batch)) as shard:
                    if not np.array_equal(shard["indices"], indices) or shard["images"].shape[1:] != image_shape:
                        fail(f"shard {shard_path(out_dir, batch)} does not hold samples {indices[0]}..{indices[-1]}")
                    f.write(np.ascontiguousarray(shard["images"], dtype=np.uint8).tobytes())
    os.replace(tmp, npz_path)
    return header["shape"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, with DiT's rounding (127.5 x + 128, clamped, truncated)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    if args.backend is not None:
        set_backend(args.backend)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    with torch.no_grad():
        run(args, rank, world, device)
    distributed.cleanup()


def run(args, rank: int, world: int, device: torch.device) -> None:
    def print0(*msg):
        if rank == 0:
            print(*msg, flush=True)

    try:
        state, which = read_model_state(args.ckpt, args.prefer_ema)
        model = build_model(args, state)
        fit_state(model, state, f"checkpoint {args.ckpt!r} ({which})")
    except CheckpointError as err:
        fail(str(err))
    del state
    model.to(device).eval()
    net = GraphedForward(model) if args.cuda_graph else model
    if which == "ema":
        source = "its EMA weights ('ema')"
    else:
        source = f"its {which!r} weights, " + ("not EMA (--no-prefer-ema)" if not args.prefer_ema
                                                 else "the checkpoint has no EMA weights")
    print0(f"Loaded {args.model} from {args.ckpt}: using {source}; learn_sigma={args.learn_sigma}")

    vae, factor = load_vae(args, device)
    if args.image_size % (4 * factor):
        fail(f"--image-size {args.image_size} must be divisible by {4 * factor} (VAE factor {factor} x FCDM's 4)")
    shape = (args.in_channels, args.image_size // factor, args.image_size // factor)
    if vae is None and args.in_channels not in (1, 3):
        fail(f"pixel-space sampling (--vae none) needs 1 or 3 image channels, got --in-channels {args.in_channels}")
    objective = build_objective(args.objective, **({"prediction": args.prediction} if args.objective == "flow"
                                                   else {"learn_sigma": args.learn_sigma}))
    options = ({"eta": args.eta, "respacing": args.respacing} if args.objective == "ddpm"
               else {"diffusion_norm": args.diffusion_norm, "last_step_size": args.last_step_size}
               if args.sampler == "sde" else {})
    if args.sampler == "ddpm":
        options.pop("eta")

    out_dir = os.path.join(args.sample_dir, args.run_name or run_name(args))
    check_run_config(out_dir, args, rank)
    if args.save_png and rank == 0:
        os.makedirs(os.path.join(out_dir, "png"), exist_ok=True)
    distributed.barrier()

    n, B = args.num_fid_samples, args.per_proc_batch_size
    batches = [np.arange(k * B, min((k + 1) * B, n), dtype=np.int64) for k in range(math.ceil(n / B))]
    mine = list(range(rank, len(batches), world))
    todo = [k for k in mine if not shard_done(shard_path(out_dir, k), batches[k])]
    print0(f"{n} samples in {len(batches)} batches of {B} over {world} process(es); rank 0 has "
           f"{len(mine) - len(todo)} of {len(mine)} batches done already. Output: {out_dir}.npz")
    autocast = torch.bfloat16 if (args.bf16 and device.type == "cuda") else None
    bar = None
    if rank == 0 and args.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="batch", dynamic_ncols=True)
    stats = {}
    for k in todo:
        indices = batches[k]
        y, noise, generators = seeded_batch(indices.tolist(), args.global_seed, args.num_classes, shape, device,
                                            balanced_labels=args.labels == "balanced")
        x = generate(net, objective, y, shape, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                     guide_all_channels=args.guide_all_channels, guidance_interval=args.guidance_interval,
                     noise=noise, generator=generators, autocast_dtype=autocast, stats=stats, **options)
        if vae is not None:
            x = vae.decode(x / args.vae_scaling_factor).sample
        images = to_uint8(x)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        write_shard(shard_path(out_dir, k), indices, y.cpu().numpy(), images)
        if args.save_png:
            from PIL import Image
            for i, image in zip(indices, images):
                Image.fromarray(image).save(os.path.join(out_dir, "png", f"{i:06d}.png"))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nfe=stats.get("nfe"))
    if bar is not None:
        bar.close()

    distributed.barrier()
    if rank == 0:
        npz_path = out_dir + ".npz"
        shape_out = merge_shards(out_dir, batches, npz_path)
        print(f"Wrote {npz_path}: arr_0 {shape_out} uint8" + (f"; {stats['nfe']} model evaluations per sample "
              f"({stats['forward_passes']} network passes per batch)" if stats else ""), flush=True)
    distributed.barrier()


if __name__ == "__main__":
    main()
