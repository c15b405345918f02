"""A sharded latent store: VAE posterior mean and std of both horizontal flips of every image, plus labels.

Layout of a store directory (written by `python -m fcdm.data.extract`):

    index.json                 format, latent shape, scaling factor, classes, and the shard list
    <shard>.mean.npy           float16 (n, 2, C, H, W): posterior mean; [:, 0] the image, [:, 1] its mirror
    <shard>.std.npy            float16 (n, 2, C, H, W): posterior standard deviation
    <shard>.label.npy          int64 (n,)

Shards are memory-mapped, so random access costs one page read and any number of workers can share them. Each
training step picks a flip and draws z = (mean + std * eps) * scaling_factor, instead of the single latent sample the
official extractor bakes in.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from fcdm.files import atomic_write, atomic_write_json

FORMAT = "fcdm-latent-store"
VERSION = 1


def write_shard(root: str, prefix: str, mean: np.ndarray, std: np.ndarray, labels: np.ndarray) -> dict:
    """Write one shard's three arrays; returns its index entry."""
    if mean.shape != std.shape or mean.ndim != 5 or mean.shape[1] != 2 or len(labels) != len(mean):
        raise ValueError(f"shard arrays disagree: mean {mean.shape}, std {std.shape}, labels {labels.shape}")
    # Each file appears whole or not at all, and the labels come last: a shard whose label file exists is complete
    # (what an interrupted extraction checks to resume).
    for name, arr in (("mean", mean.astype(np.float16)), ("std", std.astype(np.float16)),
                      ("label", labels.astype(np.int64))):
        atomic_write(os.path.join(root, f"{prefix}.{name}.npy"), lambda f, a=arr: np.save(f, a))
    return {"prefix": prefix, "count": int(len(labels))}


def shard_complete(root: str, prefix: str) -> bool:
    return os.path.isfile(os.path.join(root, f"{prefix}.label.npy"))


def write_index(root: str, shards: list[dict], latent_shape, scaling_factor: float, classes: list[str],
                image_size: int, vae: str) -> None:
    """Write index.json last (atomically), so a store without it is visibly incomplete."""
    index = {"format": FORMAT, "version": VERSION, "num_latents": sum(s["count"] for s in shards),
             "latent_shape": list(latent_shape), "scaling_factor": scaling_factor, "num_classes": len(classes),
             "classes": list(classes), "image_size": image_size, "vae": vae, "shards": shards}
    atomic_write_json(index, os.path.join(root, "index.json"))


def read_index(root: str) -> dict:
    path = os.path.join(root, "index.json")
    if not os.path.isfile(path):
        raise ValueError(f"--latent-store {root!r} has no index.json (write one with `python -m fcdm.data.extract`)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path} is not a version-{VERSION} {FORMAT} index")
    return index


class LatentStore(Dataset):
    """Latents drawn from the stored posteriors: a random flip (unless flip=False: always the image as stored) and
    a fresh Gaussian sample per access."""

    def __init__(self, root: str, scaling_factor: float | None = None, flip: bool = True):
        self.root, self.index, self.flip = root, read_index(root), flip
        self.scaling_factor = self.index["scaling_factor"] if scaling_factor is None else scaling_factor
        counts = [s["count"] for s in self.index["shards"]]
        self.offsets = np.cumsum([0] + counts)                # shard k holds items offsets[k] .. offsets[k+1]-1
        self.channels, self.latent_size = self.index["latent_shape"][0], self.index["latent_shape"][-1]
        self.num_classes = self.index["num_classes"]
        for s in self.index["shards"]:
            missing = [n for n in ("mean", "std", "label")
                       if not os.path.isfile(os.path.join(root, f"{s['prefix']}.{n}.npy"))]
            if missing:
                raise ValueError(f"latent store {root!r} is missing {missing} of shard {s['prefix']!r}")
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, k: int):
        # Opened lazily so each DataLoader worker maps the files itself.
        if k not in self._maps:
            prefix = os.path.join(self.root, self.index["shards"][k]["prefix"])
            self._maps[k] = tuple(np.load(f"{prefix}.{n}.npy", mmap_mode="r") for n in ("mean", "std", "label"))
        return self._maps[k]

    def posterior(self, index: int):
        """(mean, std) float32 (2, C, H, W) and the label of item `index`, unscaled."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        mean, std, label = self._shard(k)
        i = index - self.offsets[k]
        return mean[i].astype(np.float32), std[i].astype(np.float32), int(label[i])

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        mean, std, label = self.posterior(index)
        rng = np.random.default_rng(sample_seed)
        drawn = int(rng.integers(2))  # drawn either way, so that the noise below does not depend on self.flip
        flip = drawn if self.flip else 0
        eps = rng.standard_normal(mean.shape[1:], dtype=np.float32)
        z = (mean[flip] + std[flip] * eps) * self.scaling_factor  # (C, H, W)
        return torch.from_numpy(z), torch.tensor(label, dtype=torch.long)

    def describe(self) -> str:
        c, h, w = self.index["latent_shape"]
        return (f"latent store {self.root} ({len(self)} images x 2 flips, latents {c}x{h}x{w}, "
                f"scale {self.scaling_factor}, {self.num_classes} classes)")
