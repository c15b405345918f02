"""A built-in class-conditional image dataset that needs no download: 10 classes = 5 shapes x 2 colours.

Every image is rendered from (seed, index) alone, so the dataset is identical on every machine and every rank.
Shapes are drawn with signed distance functions and a one-pixel soft edge, so they stay recognisable at 16-32 px.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disc", "square", "triangle", "cross", "ring")
COLOURS = {"orange": (1.0, 0.55, 0.05), "blue": (0.15, 0.45, 1.0)}
CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)  # label = 2 * shape + colour
NUM_CLASSES = len(CLASS_NAMES)

_TRIANGLE_NORMALS = np.array([[np.cos(a), np.sin(a)] for a in np.deg2rad([90.0, 210.0, 330.0])])


def _shape_distance(shape: str, px: np.ndarray, py: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance (in pixels, negative inside) of a shape of size `radius` centred at the origin."""
    if shape == "disc":
        return np.hypot(px, py) - radius
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - 0.85 * radius
    if shape == "triangle":
        # Intersection of three half-planes (inradius radius/2), pointing down on screen.
        proj = np.stack([px * nx - py * ny for nx, ny in _TRIANGLE_NORMALS])
        return proj.max(axis=0) - 0.5 * radius
    if shape == "cross":
        arm = 0.3 * radius
        horizontal = np.maximum(np.abs(px) - radius, np.abs(py) - arm)
        vertical = np.maximum(np.abs(px) - arm, np.abs(py) - radius)
        return np.minimum(horizontal, vertical)
    if shape == "ring":
        return np.abs(np.hypot(px, py) - 0.75 * radius) - 0.25 * radius
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(label: int, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `label` as float32 (3, H, W) in [-1, 1]; position, size, hue and background vary."""
    shape, colour = SHAPES[label // len(COLOURS)], list(COLOURS.values())[label % len(COLOURS)]
    s = image_size / 32.0  # jitter ranges are defined at 32 px and scale with the image
    radius = rng.uniform(8.0, 11.0) * s
    cx, cy = (image_size - 1) / 2 + rng.uniform(-3.0, 3.0, size=2) * s
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    coverage = np.clip(0.5 - _shape_distance(shape, xs - cx, ys - cy, radius), 0.0, 1.0)  # (H, W) soft edge
    fg = np.clip(np.array(colour) * rng.uniform(0.85, 1.0) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    bg = rng.uniform(0.05, 0.25) * np.ones(3) + rng.uniform(-0.03, 0.03, size=3)
    img = bg[:, None, None] * (1 - coverage) + fg[:, None, None] * coverage  # (3, H, W) in [0, 1]
    return (img * 2 - 1).astype(np.float32)


class ProceduralShapes(Dataset):
    """`length` seeded images; label = index % 10, so every class is equally frequent in any window of 10."""

    num_classes = NUM_CLASSES
    channels = 3

    def __init__(self, image_size: int = 32, length: int = 10_000, seed: int = 0):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 for the shapes to be recognisable, got {image_size}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.image_size, self.length, self.seed = image_size, length, seed

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return index % NUM_CLASSES

    def image(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        return torch.from_numpy(render(self.label(index), self.image_size, rng))

    def __getitem__(self, key):
        # key is an index, or (index, sample_seed) from GlobalBatchSampler; the images need no augmentation.
        index = key[0] if isinstance(key, tuple) else key
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        return self.image(index), torch.tensor(self.label(index), dtype=torch.long)

    def describe(self) -> str:
        return f"procedural shapes ({NUM_CLASSES} classes, {self.length} images, {self.image_size}px, pixel space)"
