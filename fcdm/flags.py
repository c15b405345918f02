"""Command-line flags that several of fcdm's programs share, defined once: --backend, --device, --vae and
--vae-scaling-factor (train.py, sample.py and `python -m fcdm.data.extract`), and the value checks of their flags.

Each program passes the help text that says what the flag means there (the VAE's default, for example, differs).
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from fcdm_kernels.dispatch import BACKENDS

DEVICES = ("auto", "cpu", "cuda")


def _checked(kind, ok, wanted: str):
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


def positive(kind):
    """An argparse type: `kind(text)`, refused unless finite and > 0."""
    return _checked(kind, lambda v: v > 0, "positive")


def non_negative(kind):
    """An argparse type: `kind(text)`, refused unless finite and >= 0."""
    return _checked(kind, lambda v: v >= 0, ">= 0")


def unit_interval(include_one: bool = True):
    """An argparse type: a float in [0, 1], or [0, 1) without include_one."""
    if include_one:
        return _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
    return _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def existing_file(text: str) -> str:
    """An argparse type: the path of an existing file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist or is not a file")
    return text


def add_switch(group, flag: str, default, help: str) -> None:
    """A boolean --flag / --no-flag. A stray value, such as the official `--ddpm False`, is refused rather than read
    as True."""
    group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


def add_backend_flag(group) -> None:
    group.add_argument("--backend", choices=BACKENDS, default=None,
                       help="fused-op backend (default: the FCDM_BACKEND environment variable, else auto)")


def _device(text: str) -> str:
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for, but no CUDA GPU is visible")
    return text


def add_device_flag(group) -> None:
    """--device auto | cpu | cuda; cuda is refused at once where no GPU is visible."""
    group.add_argument("--device", type=_device, choices=DEVICES, default="auto",
                       help="auto: this process's GPU when there is one, else the CPU")


def add_vae_flags(group, default: str | None, help: str, scale_default: float | None, scale_help: str) -> None:
    """--vae (with the official trainer's names for it, --hf-model-dir and --hf-model-name) and
    --vae-scaling-factor, the scale of the latents (fcdm.vae)."""
    group.add_argument("--vae", "--hf-model-dir", "--hf-model-name", dest="vae", default=default, help=help)
    group.add_argument("--vae-scaling-factor", type=positive(float), default=scale_default, help=scale_help)
