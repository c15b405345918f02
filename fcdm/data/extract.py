"""Encode an ImageFolder into a latent store: `torchrun --nproc_per_node=N -m fcdm.data.extract --data-path ...`.

Each rank takes every N-th image, ADM-centre-crops it, encodes it and its mirror with a diffusers AutoencoderKL, and
writes the posterior mean and std (not a sample) to its own shards of --shard-size images. Rank 0 writes index.json
once all ranks are done. An interrupted extraction resumes: rerun the same command, and the shards already written
are kept (extract.json records the settings; a rerun with other settings is refused, naming them).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from fcdm import distributed
from fcdm.data.imagefolder import ImageFolderDataset
from fcdm.data.latent_store import shard_complete, write_index, write_shard
from fcdm.files import atomic_write_json, settings_differences
from fcdm.flags import add_device_flag, add_vae_flags
from fcdm.vae import PIXEL_SPACE, SD_VAE_SCALE, VAE_ALIASES, load_vae, resolve_vae_name

SETTINGS_FILE = "extract.json"  # what the stored latents depend on (batch size, workers, device may change)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True, help="ImageFolder root (class sub-folders)")
    p.add_argument("--output", "--features-path", dest="output", required=True, help="latent store directory")
    add_vae_flags(p, default="ema", help=f"{' | '.join(VAE_ALIASES)} (the SD-VAE decoders, as in DiT; default ema) "
                  "| a diffusers AutoencoderKL directory or hub name", scale_default=SD_VAE_SCALE,
                  scale_help="stored as the store's default scale")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per GPU per forward (each is encoded with its mirror image: the VAE sees twice as many)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file (the unit of resuming)")
    p.add_argument("--num-workers", type=int, default=4)
    add_device_flag(p)
    args = p.parse_args(argv)
    for flag in ("image_size", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.num_workers < 0:
        p.error("--num-workers must be >= 0")
    if not os.path.isdir(args.data_path):
        p.error(f"--data-path {args.data_path!r} is not a directory")
    if os.path.exists(os.path.join(args.output, "index.json")):
        p.error(f"--output {args.output!r} already holds a complete latent store (index.json); choose a new directory")
    if resolve_vae_name(args.vae) is None:
        p.error(f"--vae {PIXEL_SPACE}: a latent store needs a VAE; to train in pixel space, skip extraction and run "
                f"train.py --data-path DIR --vae {PIXEL_SPACE}")
    args.vae = resolve_vae_name(args.vae)
    return args


@torch.no_grad()
def encode_both_flips(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, 3, H, W) in [-1, 1] -> posterior mean and std, each (B, 2, C, h, w); index 1 is the mirror."""
    both = torch.cat([x, x.flip(-1)])                 # (2B, 3, H, W)
    dist = vae.encode(both).latent_dist
    b = len(x)
    mean = torch.stack([dist.mean[:b], dist.mean[b:]], dim=1)
    std = torch.stack([dist.std[:b], dist.std[b:]], dim=1)
    return mean, std


def shard_plan(num_images: int, world_size: int, shard_size: int) -> list[tuple[int, str, list[int]]]:
    """(rank, prefix, image indices) of every shard: rank r takes images r, r + N, ... in runs of shard_size."""
    plan = []
    for rank in range(world_size):
        mine = list(range(rank, num_images, world_size))
        plan += [(rank, f"r{rank:03d}_s{k:05d}", mine[start: start + shard_size])
                 for k, start in enumerate(range(0, len(mine), shard_size))]
    return plan


def check_settings(output: str, settings: dict) -> None:
    """Refuse to continue a store written with other settings, naming each one that differs."""
    diffs = [f"{k}: {stored!r} in the store vs {now!r} now"
             for k, (stored, now) in settings_differences(os.path.join(output, SETTINGS_FILE), settings).items()]
    if diffs:
        raise SystemExit(f"--output {output!r} holds a partial extraction written with other settings:\n  "
                         + "\n  ".join(diffs) + "\nRerun with its settings to resume it, or choose a new --output.")


def extract_shard(vae, dataset, indices: list[int], args, device, progress) -> tuple[np.ndarray, ...]:
    """Posterior means, stds (n, 2, C, h, w) and labels (n,) of the images `indices`."""
    loader = DataLoader(Subset(dataset, indices), batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    means, stds, labels = [], [], []
    for x, y in loader:
        mean, std = encode_both_flips(vae, x.to(device))
        means.append(mean.float().cpu().numpy()), stds.append(std.float().cpu().numpy()), labels.append(y.numpy())
        progress.update(len(y))
    return np.concatenate(means), np.concatenate(stds), np.concatenate(labels)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = distributed.init(args.device)
    dataset = ImageFolderDataset(args.data_path, args.image_size, flip=False)
    settings = {"data_path": os.path.abspath(args.data_path), "num_images": len(dataset), "classes": dataset.classes,
                "image_size": args.image_size, "vae": args.vae, "vae_scaling_factor": args.vae_scaling_factor,
                "shard_size": args.shard_size, "world_size": info.world_size}
    check_settings(args.output, settings)
    plan = shard_plan(len(dataset), info.world_size, args.shard_size)
    todo = [(prefix, indices) for rank, prefix, indices in plan
            if rank == info.rank and not shard_complete(args.output, prefix)]
    if todo:
        try:
            vae = load_vae(args.vae, info.device)
        except (ValueError, ImportError) as err:
            raise SystemExit(f"--vae: {err}. Pass a local copy with --vae <local dir> (a diffusers AutoencoderKL "
                             f"directory)") from err
    distributed.barrier()  # every rank has checked the settings before rank 0 records them
    if info.is_main:
        os.makedirs(args.output, exist_ok=True)
        atomic_write_json(settings, os.path.join(args.output, SETTINGS_FILE))
    distributed.barrier()
    skipped = sum(1 for rank, _, _ in plan if rank == info.rank) - len(todo)
    if skipped and info.is_main:
        print(f"resuming: {skipped} shard(s) of rank 0 already written")
    with tqdm(total=sum(len(i) for _, i in todo), disable=not info.is_main, desc="encoding") as progress:
        for prefix, indices in todo:
            write_shard(args.output, prefix, *extract_shard(vae, dataset, indices, args, info.device, progress))
    distributed.barrier()
    if info.is_main:
        shape = np.load(os.path.join(args.output, f"{plan[0][1]}.mean.npy"), mmap_mode="r").shape[2:]
        write_index(args.output, [{"prefix": prefix, "count": len(indices)} for _, prefix, indices in plan], shape,
                    args.vae_scaling_factor, dataset.classes, args.image_size, args.vae)
        print(f"wrote {len(dataset)} images x 2 flips to {args.output}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
