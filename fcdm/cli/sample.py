"""Sample N images from an FCDM checkpoint into one ADM-evaluator .npz (key arr_0, uint8 NHWC), or a quick grid.

    python sample.py --ckpt ckpt.pt --class-labels 207 360 "otter" --grid out.png   # one image per class (pipeline)
    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --model FCDM-XL --num-fid-samples 50000 --sample-dir out
    python sample.py ...                     # one process (CPU or one GPU)
    fcdm-sample ...                          # the same code, installed with fcdm (torchrun --no-python fcdm-sample)

Sample i uses its own seed global_seed + i and the global batches are fixed blocks of --per-proc-batch-size
samples, so the output does not depend on the number of processes. Each finished batch is written as a shard file;
rerunning the same command skips finished shards (resume), and rank 0 merges the shards into `<run>.npz`.
The flags are in fcdm.cli.sample_config; the model, VAE and grid come from fcdm.pipeline, the shards from
fcdm.eval.npz; --scheduler runs a diffusers scheduler (fcdm.schedulers). See docs/sampling.md.
"""
from __future__ import annotations

import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from fcdm import distributed, set_backend
from fcdm.eval.npz import NpzShards
from fcdm.pipeline import FCDMPipeline, image_grid, save_image, to_images
from fcdm.sampling import generate, seeded_batch
from fcdm.vae import to_uint8

from .sample_config import RUN_KEYS, parse_args


def load_pipeline(args, info) -> FCDMPipeline:
    """The checkpoint as an FCDMPipeline on this rank's device: EMA weights unless --no-prefer-ema."""
    arch = {k: getattr(args, k) for k in ("model", "hidden_size", "depth", "in_channels", "num_classes")}
    pipe = FCDMPipeline.from_checkpoint(
        args.ckpt, args.image_size, args.objective, args.vae, args.vae_scaling_factor, args.prefer_ema,
        args.learn_sigma, arch, prediction=args.prediction, device=info.device, backend=args.backend,
        dtype="bf16" if args.bf16 and info.device.type == "cuda" else None, cuda_graph=args.cuda_graph, tf32=args.tf32)
    if not pipe.spec["architecture"]["null_label"] and args.cfg_scale != 1:
        raise ValueError("the checkpoint has no null-label row (trained without label dropout); use --cfg-scale 1")
    args.learn_sigma = pipe.model.learn_sigma
    distributed.print0(f"Loaded {args.model} from {pipe.loaded_from}; learn_sigma={args.learn_sigma}")
    return pipe


def sampler_settings(args, objective) -> dict:
    """generate()'s sampler, scheduler, guidance and sampler options from the flags."""
    options = {} if args.scheduler else {k: getattr(args, k) for k in objective.sampler_options if hasattr(args, k)}
    return dict(sampler=None if args.scheduler else args.sampler, scheduler=args.scheduler,
                guide_all_channels=args.guide_all_channels, guidance_interval=args.guidance_interval, **options)


def run_name(args) -> str:
    """The sub-directory of --sample-dir: --run-name, or one derived from the settings that change the samples."""
    return args.run_name or (
        f"{args.model}-{os.path.splitext(os.path.basename(args.ckpt))[0]}-size-{args.image_size}-{args.objective}-"
        f"{args.scheduler or args.sampler}-{args.respacing or args.steps}-cfg-{args.cfg_scale}"
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
            if args.class_labels is None:
                sample(args, info)
            elif info.rank == 0:  # a handful of images: one process draws them all
                quick_look(args, info)
    except (ValueError, ImportError) as err:  # checkpoint, VAE, device and run-directory errors: a message
        if os.environ.get("FCDM_DEBUG"):
            raise
        print(f"sample.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        distributed.cleanup()


def sample(args, info) -> None:
    """Every batch of this rank that has no shard yet, then (rank 0) the merged .npz."""
    pipe = load_pipeline(args, info)
    vae, shape = pipe.decoder()
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
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="batch", dynamic_ncols=True,
               disable=info.rank != 0 or not args.progress)
    stats = {}
    for k in todo:
        indices = shards.blocks[k]
        y, noise, generators = seeded_batch(indices.tolist(), args.global_seed, args.num_classes, shape, info.device,
                                            balanced_labels=args.labels == "balanced")
        x = generate(pipe.network, pipe.objective, y, shape, steps=args.steps, cfg_scale=args.cfg_scale, noise=noise,
                     generator=generators, autocast_dtype=pipe.autocast_dtype, stats=stats,
                     **sampler_settings(args, pipe.objective))
        images = to_uint8(to_images(vae, x, args.vae_scaling_factor)).cpu().numpy()
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


def quick_look(args, info) -> None:
    """--class-labels: one image per label (image i from seed global_seed + i) through FCDMPipeline, as one grid."""
    pipe = load_pipeline(args, info)
    out = pipe(args.class_labels, guidance_scale=args.cfg_scale, num_inference_steps=args.steps, seed=args.global_seed,
               progress=args.progress, **sampler_settings(args, pipe.objective))
    path = args.grid or os.path.join(args.sample_dir, "grid.png")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(image_grid(out.images), path)
    print(f"Wrote {path}: classes {out.class_labels}", flush=True)


if __name__ == "__main__":
    main()
