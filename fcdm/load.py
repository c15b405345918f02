"""Reading model weights for sampling from fcdm or official FCDM/DiT-style checkpoints, preferring EMA weights.

Accepted: a dict with an `ema` and/or `model` entry (official: {"model", "ema", "opt", "args"}), a dict with a
`state_dict` entry, a bare state_dict, or a .safetensors file. Loading uses torch.load(weights_only=True), with
argparse.Namespace allowed because the official checkpoints pickle their `args`.
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping

import torch
from safetensors.torch import load_file

# Prefixes added by DistributedDataParallel and torch.compile; stripped so any of them loads into a bare model.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold usable model weights."""


def read_checkpoint_file(path: str):
    """A checkpoint file's contents, read safely (weights_only); CheckpointError if missing or unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        if path.endswith(".safetensors"):
            return load_file(path, device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read checkpoint {path!r} ({type(err).__name__}: {err}). Is it complete, and "
                              "does it hold only tensors and plain containers?") from err


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_model_state(path: str, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, which) where which names the entry used: 'ema', 'model', 'state_dict' or 'bare'."""
    obj = read_checkpoint_file(path)
    order = ("ema", "model", "state_dict") if prefer_ema else ("model", "ema", "state_dict")
    if isinstance(obj, Mapping):
        for key in order:
            if key in obj and _is_state_dict(obj[key]):
                return _strip_prefixes(obj[key]), key
    if _is_state_dict(obj):
        return _strip_prefixes(obj), "bare"
    keys = sorted(map(str, obj.keys()))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"checkpoint {path!r} holds no model weights: expected 'ema'/'model'/'state_dict' entries "
                          f"or a bare state_dict, found {keys}")


def fit_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with a CheckpointError that names the mismatching keys or shapes."""
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit the model: missing keys {sorted(missing)[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected keys {sorted(unexpected)[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{source} does not fit the model: {err}") from err


def load_model_weights(model: torch.nn.Module, path: str, prefer_ema: bool = True) -> str:
    """Load a checkpoint's weights into `model` strictly; returns which entry was used ('ema', 'model', ...)."""
    state, which = read_model_state(path, prefer_ema)
    fit_state(model, state, f"checkpoint {path!r} ({which})")
    return which


def read_checkpoint_args(path: str) -> dict:
    """The training arguments stored in a checkpoint (`args`, a dict or an argparse.Namespace), or {} if none.

    The file is memory-mapped, so reading the arguments of a multi-GB checkpoint costs no copy of its tensors.
    """
    if path.endswith(".safetensors") or not os.path.isfile(path):
        return {}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mmapped; the weights loader reports real corruption
        return {}
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


__all__ = ["CheckpointError", "read_checkpoint_file", "read_model_state", "read_checkpoint_args", "fit_state", "load_model_weights"]
