"""The latent autoencoder: load a diffusers AutoencoderKL, encode images to scaled latents, decode them, and uint8.

    vae = load_vae("stabilityai/sd-vae-ft-ema", device)     # frozen, in eval mode
    z = encode(vae, images, SD_VAE_SCALE)                    # (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8)
    images = decode(vae, z, SD_VAE_SCALE)                    # -> (N, 3, H, W) in [-1, 1], float32
    pixels = to_uint8(images)                                # -> (N, H, W, 3) uint8, as ADM .npz files hold them

FCDM models the VAE's latents multiplied by a scaling factor that brings them to about unit variance (0.18215 for
Stable Diffusion's VAE, as DiT and the official code use). The trainer, sampling and latent extraction all go through
these functions, so the scale is applied in one place. diffusers is an optional dependency (`pip install
'fcdm[vae]'`), imported only when a VAE is loaded.
"""
from __future__ import annotations

import os

import torch

SD_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of DiT and the official FCDM runs
SD_VAE_SCALE = 0.18215
# DiT's --vae spellings: the two fine-tuned Stable Diffusion decoders (same encoder, same latents and scale).
VAE_ALIASES = {"ema": SD_VAE, "mse": "stabilityai/sd-vae-ft-mse"}
PIXEL_SPACE = "none"  # --vae none: no autoencoder, the model works on pixels


def resolve_vae_name(name: str | None) -> str | None:
    """A --vae value -> what load_vae takes: 'ema' and 'mse' become their hub repositories (as in DiT), 'none'
    (any case) becomes None (pixel space), and a directory or any other hub name passes through unchanged."""
    if name is None or name.strip().lower() == PIXEL_SPACE:
        return None
    return VAE_ALIASES.get(name.strip().lower(), name)


def load_vae(name_or_path: str, device: torch.device | str = "cpu"):
    """A diffusers AutoencoderKL from a local directory or a hub name, on `device`, frozen and in eval mode.

    A local directory is read without touching the network; a hub name needs the local cache or the network.
    Raises ValueError naming `name_or_path` when it cannot be loaded, ImportError when diffusers is missing."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as err:
        raise ImportError("loading a VAE needs diffusers: pip install 'fcdm[vae]'") from err
    local = os.path.isdir(name_or_path)
    if not local and name_or_path.startswith((".", "/", "~")):
        raise ValueError(f"VAE {name_or_path!r} is not a directory")
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, local_files_only=local)
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError, HTTP errors, ...
        raise ValueError(f"cannot load the VAE {name_or_path!r}: {type(err).__name__}: {err}") from err
    return vae.to(device).eval().requires_grad_(False)  # encoding and decoding must not record a graph


def downsampling_factor(vae) -> int:
    """How many pixels one latent pixel spans along each side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def latent_shape(vae, image_size: int) -> tuple[int, int, int]:
    """(channels, height, width) of the latents of an image_size x image_size image, from one encoder pass."""
    device, dtype = _device_dtype(vae)
    probe = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)
    return tuple(vae.encode(probe).latent_dist.mean.shape[1:])


@torch.no_grad()
def encode(vae, images: torch.Tensor, scaling_factor: float = SD_VAE_SCALE,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> a sample of the VAE posterior times scaling_factor, float32.

    The sample draws from `generator`, or from the global RNG of the images' device when it is None."""
    _, dtype = _device_dtype(vae)
    posterior = vae.encode(images.to(dtype)).latent_dist
    return posterior.sample(generator=generator).float() * scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scaling_factor: float = SD_VAE_SCALE) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], float32."""
    _, dtype = _device_dtype(vae)
    return vae.decode(latents.to(dtype) / scaling_factor).sample.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) on the same device, rounded as DiT's sampler rounds
    (127.5 x + 128, clamped to [0, 255], truncated), so .npz files match DiT's bit for bit."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _device_dtype(vae) -> tuple[torch.device, torch.dtype]:
    parameter = next(vae.parameters())
    return parameter.device, parameter.dtype


__all__ = ["SD_VAE", "SD_VAE_SCALE", "VAE_ALIASES", "PIXEL_SPACE", "resolve_vae_name", "load_vae",
           "downsampling_factor", "latent_shape", "encode", "decode", "to_uint8"]
