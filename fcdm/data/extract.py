"""Encode an ImageFolder into a latent store: `torchrun --nproc_per_node=N -m fcdm.data.extract --data-path ...`.

Each rank takes every N-th image, ADM-centre-crops it, encodes it and its mirror with a diffusers AutoencoderKL, and
writes the posterior mean and std (not a sample) to its own shards. Rank 0 writes index.json once all ranks are done.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from fcdm import distributed
from fcdm.data.imagefolder import ImageFolderDataset
from fcdm.data.latent_store import write_index, write_shard
from fcdm.flags import add_device_flag, add_vae_flags
from fcdm.vae import SD_VAE, SD_VAE_SCALE, load_vae


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True, help="ImageFolder root (class sub-folders)")
    p.add_argument("--output", "--features-path", dest="output", required=True, help="latent store directory")
    add_vae_flags(p, default=SD_VAE, help="diffusers AutoencoderKL directory or hub name", scale_default=SD_VAE_SCALE,
                  scale_help="stored as the store's default scale")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per GPU per forward (each is encoded with its mirror image: the VAE sees twice as many)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
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
        p.error(f"--output {args.output!r} already holds a latent store (index.json); choose a new directory")
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


def main(argv=None) -> None:
    args = parse_args(argv)
    info = distributed.init(args.device)
    dataset = ImageFolderDataset(args.data_path, args.image_size, flip=False)
    mine = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=info.device.type == "cuda")
    try:
        vae = load_vae(args.vae, info.device)
    except (ValueError, ImportError) as err:
        raise SystemExit(f"--vae: {err}") from err
    os.makedirs(args.output, exist_ok=True)

    shards, means, stds, labels, latent_shape = [], [], [], [], None

    def flush():
        if labels:
            prefix = f"r{info.rank:03d}_s{len(shards):05d}"
            shards.append(write_shard(args.output, prefix, np.concatenate(means), np.concatenate(stds),
                                      np.concatenate(labels)))
            means.clear(), stds.clear(), labels.clear()

    for x, y in tqdm(loader, disable=not info.is_main, desc="encoding"):
        mean, std = encode_both_flips(vae, x.to(info.device))
        latent_shape = tuple(mean.shape[2:])
        means.append(mean.float().cpu().numpy()), stds.append(std.float().cpu().numpy()), labels.append(y.numpy())
        if sum(len(l) for l in labels) >= args.shard_size:
            flush()
    flush()
    with open(os.path.join(args.output, f"rank{info.rank:03d}.json"), "w") as f:
        json.dump({"shards": shards, "latent_shape": latent_shape}, f)
    distributed.barrier()
    if info.is_main:
        parts = []
        for r in range(info.world_size):
            with open(os.path.join(args.output, f"rank{r:03d}.json")) as f:
                parts.append(json.load(f))
        shape = next(p["latent_shape"] for p in parts if p["latent_shape"])
        write_index(args.output, [s for p in parts for s in p["shards"]], shape, args.vae_scaling_factor,
                    dataset.classes, args.image_size, args.vae)
        for r in range(info.world_size):
            os.remove(os.path.join(args.output, f"rank{r:03d}.json"))
        print(f"wrote {len(dataset)} images x 2 flips to {args.output}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
