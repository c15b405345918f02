"""The official FCDM latent layout: one .npy per image in --feature-path and its label .npy in --label-path.

Files are paired by sorted name, as the official trainer does. The official extractor already applied a random flip
and drew one latent sample per image, so this reader applies no augmentation.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset


class NpyFeatureDataset(Dataset):
    """Pre-extracted latents (C, H, W) and integer labels from two directories of per-image .npy files."""

    def __init__(self, feature_path: str, label_path: str):
        for flag, path in (("--feature-path", feature_path), ("--label-path", label_path)):
            if not os.path.isdir(path):
                raise ValueError(f"{flag} {path!r} is not a directory")
        self.features = sorted(f for f in os.listdir(feature_path) if f.endswith(".npy"))
        self.labels = sorted(f for f in os.listdir(label_path) if f.endswith(".npy"))
        if not self.features:
            raise ValueError(f"--feature-path {feature_path!r} holds no .npy files")
        if len(self.features) != len(self.labels):
            raise ValueError(f"--feature-path has {len(self.features)} .npy files but --label-path has "
                             f"{len(self.labels)}; they must pair one to one")
        self.feature_path, self.label_path = feature_path, label_path
        first = self._load_feature(0)
        self.channels, self.latent_size = first.shape[0], first.shape[-1]
        # Labels are not scanned up front (ImageNet has 1.28M files); the class count comes from --num-classes.

    def _load_feature(self, index: int) -> np.ndarray:
        x = np.load(os.path.join(self.feature_path, self.features[index]))
        x = x.reshape(x.shape[-3:]) if x.ndim == 4 and x.shape[0] == 1 else x  # official files are (1, C, H, W)
        if x.ndim != 3:
            raise ValueError(f"feature {self.features[index]!r} has shape {x.shape}; expected (C, H, W) or (1, C, H, W)")
        return x

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        x = torch.from_numpy(self._load_feature(index).astype(np.float32))
        y = np.load(os.path.join(self.label_path, self.labels[index])).reshape(-1)
        return x, torch.tensor(int(y[0]), dtype=torch.long)

    def describe(self) -> str:
        return (f".npy features {self.feature_path} + labels {self.label_path} "
                f"({len(self)} latents of {self.channels}x{self.latent_size}x{self.latent_size})")
