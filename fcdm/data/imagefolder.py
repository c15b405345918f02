"""Class-subfolder image datasets (`root/<class>/<image>`) with the ADM centre crop, in pixel space [-1, 1]."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: box-halve while the short side is >= 2x the target, bicubic-resize the short side to
    image_size, then crop the centre. Returns uint8 (H, W, 3)."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs and the sorted class names of a class-subfolder tree; ValueError if unusable."""
    if not os.path.isdir(root):
        raise ValueError(f"--data-path {root!r} is not a directory")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"--data-path {root!r} has no class sub-folders (expected root/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            items += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise ValueError(f"--data-path {root!r} has class folders but no images with extensions {IMAGE_EXTENSIONS}")
    return items, classes


class ImageFolderDataset(Dataset):
    """Images from class sub-folders, centre-cropped, randomly flipped (seeded per sample), as (3, H, W) in [-1, 1]."""

    channels = 3

    def __init__(self, root: str, image_size: int, flip: bool = True):
        self.items, self.classes = scan_image_folder(root)
        self.root, self.image_size, self.flip = root, image_size, flip
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> np.ndarray:
        """uint8 (H, W, 3) centre crop of image `index`."""
        path, _ = self.items[index]
        with Image.open(path) as image:
            return center_crop_arr(image.convert("RGB"), self.image_size)

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        arr = self.load(index)
        if self.flip and np.random.default_rng(sample_seed).random() < 0.5:
            arr = arr[:, ::-1]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
        return x, torch.tensor(self.items[index][1], dtype=torch.long)

    def describe(self) -> str:
        return f"ImageFolder {self.root} ({len(self)} images, {self.num_classes} classes, {self.image_size}px)"
