"""Class-conditional sample grids from the EMA model, written as PNG (one row per class)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fcdm.sampling import generate
from fcdm.vae import SD_VAE_SCALE, decode, to_uint8

# The official trainer's preview classes for ImageNet.
IMAGENET_PREVIEW_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)


def preview_classes(num_classes: int) -> list[int]:
    if num_classes <= 10:
        return list(range(num_classes))
    picked = [c for c in IMAGENET_PREVIEW_CLASSES if c < num_classes]
    return picked if len(picked) == len(IMAGENET_PREVIEW_CLASSES) else list(range(min(num_classes, 8)))


@torch.no_grad()
def viewable(x: torch.Tensor, vae=None, scaling_factor: float = SD_VAE_SCALE) -> torch.Tensor:
    """Model outputs -> images in [-1, 1]: VAE-decoded latents, pixels as they are, or (no VAE) the first three
    latent channels stretched per image so their structure is visible."""
    if vae is not None:
        return decode(vae, x, scaling_factor)
    if x.shape[1] == 3:
        return x.clamp(-1, 1)
    x = x[:, :3]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


def to_grid(images: torch.Tensor, ncol: int, pad: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (rows*(H+pad), ncol*(W+pad), 3)."""
    n, _, h, w = images.shape
    rows = -(-n // ncol)
    u8 = to_uint8(images).cpu().numpy()
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = u8[i]
    return grid


def save_png(grid: np.ndarray, path: str, min_side: int = 256) -> None:
    """Write the grid, upscaled with nearest-neighbour so tiny demo images are visible."""
    image = Image.fromarray(grid)
    factor = max(1, -(-min_side // min(image.size)))
    image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(path)


@torch.no_grad()
def sample_grid(model, objective, args, device, vae=None, per_class: int = 8, autocast_dtype=None) -> np.ndarray:
    """A grid with one row per preview class, from the same seeded noise every time (so grids are comparable)."""
    classes = preview_classes(args.num_classes)
    y = torch.tensor(classes, device=device).repeat_interleave(per_class)
    g = torch.Generator(device=device).manual_seed(args.global_seed)
    x = generate(model, objective, y, shape=(args.in_channels, args.input_size, args.input_size),
                 sampler=args.sampler, steps=args.num_sampling_steps, cfg_scale=args.cfg_scale, generator=g,
                 autocast_dtype=autocast_dtype)
    return to_grid(viewable(x, vae, args.vae_scaling_factor), ncol=per_class)
