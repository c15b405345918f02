"""Command-line flags that several of fcdm's programs share, defined once: --backend, --device, --vae and
--vae-scaling-factor (train.py, sample.py and `python -m fcdm.data.extract`), and the value checks of their flags.

Each program passes the help text that says what the flag means there (the VAE's default, for example, differs).
"""
from __future__ import annotations

import argparse

from fcdm_kernels.dispatch import BACKENDS

DEVICES = ("auto", "cpu", "cuda")


def positive(kind):
    """An argparse type: `kind(text)`, refused unless > 0."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def non_negative(kind):
    """An argparse type: `kind(text)`, refused unless >= 0."""
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def add_backend_flag(group) -> None:
    group.add_argument("--backend", choices=BACKENDS, default=None,
                       help="fused-op backend (default: the FCDM_BACKEND environment variable, else auto)")


def add_device_flag(group) -> None:
    group.add_argument("--device", choices=DEVICES, default="auto",
                       help="auto: this process's GPU when there is one, else the CPU")


def add_vae_flags(group, default: str | None, help: str, scale_default: float | None, scale_help: str) -> None:
    """--vae (with the official trainer's names for it, --hf-model-dir and --hf-model-name) and
    --vae-scaling-factor, the scale of the latents (fcdm.vae)."""
    group.add_argument("--vae", "--hf-model-dir", "--hf-model-name", dest="vae", default=default, help=help)
    group.add_argument("--vae-scaling-factor", type=positive(float), default=scale_default, help=scale_help)
