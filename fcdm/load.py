"""Load a trained FCDM from a checkpoint in one call, or read the parts of one: its weights and its training args.

    model, loaded = load_fcdm("results/000-FCDM-XL/checkpoints/0400000.pt")   # EMA weights, eval mode, on the CPU
    loaded.weights    # the entry used: 'ema', 'model', 'state_dict' or 'bare'
    loaded.config     # the FCDM_models[...] arguments the model was built with, learn_sigma included
    loaded.args       # the training args the checkpoint stores ({} when it has none)
    sampling_config(loaded.args)   # how to sample it: image size, objective, VAE and latent scale

Accepted: a dict with an `ema` and/or `model` entry (fcdm's and the official trainer's {"model", "ema", "opt",
"args"}), a dict with a `state_dict` entry, a bare state_dict, or a .safetensors file; EMA weights are preferred.
The architecture comes from the caller's arguments, else from the training args the checkpoint stores (fcdm's and
the official ones do), else FCDM-XL on Stable Diffusion latents (4 channels, 1000 classes); learn_sigma and the
null label of classifier-free guidance are read from the weights. Loading uses torch.load(weights_only=True), with
argparse.Namespace allowed because the official checkpoints pickle their `args`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file

from fcdm.models import FCDM, FCDM_models
from fcdm.vae import SD_VAE, SD_VAE_SCALE

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


# The architecture a checkpoint that stores no training args is assumed to have, and how it is sampled: the paper's
# ImageNet 256 model.
DEFAULT_CONFIG = {"model": "FCDM-XL", "in_channels": 4, "num_classes": 1000}
DEFAULT_SAMPLING = {"image_size": 256, "objective": "ddpm", "vae": SD_VAE, "vae_scaling_factor": SD_VAE_SCALE}


def model_config(stored_args: Mapping, model: str | None = None, hidden_size: int | None = None,
                 depth: Sequence[int] | None = None, in_channels: int | None = None,
                 num_classes: int | None = None) -> dict:
    """The architecture to build: each argument given wins, then `stored_args` (a checkpoint's training args), then
    DEFAULT_CONFIG. -> {model, hidden_size, depth, in_channels, num_classes}; hidden_size and depth are None where
    the named config's own apply."""
    stored_model = stored_args.get("model") if stored_args.get("model") in FCDM_models else None
    name = model or stored_model or DEFAULT_CONFIG["model"]
    if name not in FCDM_models:
        raise ValueError(f"model must be one of {sorted(FCDM_models)}, got {name!r}")
    # A run trained with a custom width or depth stores them; they belong to its model name only.
    same_model = name == stored_model
    if hidden_size is None and same_model:
        hidden_size = stored_args.get("hidden_size")
    if depth is None and same_model:
        depth = stored_args.get("depth")
    return {"model": name, "hidden_size": None if hidden_size is None else int(hidden_size),
            "depth": None if depth is None else tuple(int(d) for d in depth),
            "in_channels": int(in_channels or stored_args.get("in_channels") or DEFAULT_CONFIG["in_channels"]),
            "num_classes": int(num_classes or stored_args.get("num_classes") or DEFAULT_CONFIG["num_classes"])}


def sampling_config(stored_args: Mapping, **given) -> dict:
    """How to sample a checkpoint: {image_size (pixels), objective, vae ('none': pixel space), vae_scaling_factor}.
    Each value given (not None) wins, then `stored_args`, then DEFAULT_SAMPLING."""
    unknown = set(given) - set(DEFAULT_SAMPLING)
    if unknown:
        raise TypeError(f"sampling_config() got unexpected arguments {sorted(unknown)}")
    stored = {k: stored_args.get(k) for k in DEFAULT_SAMPLING}
    if "vae" in stored_args:  # a run that stores no VAE was trained in pixel space
        stored["vae"] = stored_args["vae"] or "none"
    return {k: given.get(k) or stored[k] or default for k, default in DEFAULT_SAMPLING.items()}


def build_fcdm(config: Mapping, state: Mapping[str, torch.Tensor], learn_sigma: bool | None = None) -> FCDM:
    """An FCDM of `config` (from model_config) shaped to hold `state`: learn_sigma (unless given) and the null-label
    row of classifier-free guidance are read from the weights. Its weights are not loaded yet."""
    in_channels, num_classes = config["in_channels"], config["num_classes"]
    out_w = state.get("final_layer.conv.weight")
    if learn_sigma is None:
        learn_sigma = out_w is None or out_w.shape[0] == 2 * in_channels
    label_w = state.get("y_embedder_1.embedding_table.weight")
    rows = None if label_w is None else label_w.shape[0]
    if rows is not None and rows not in (num_classes, num_classes + 1):
        raise CheckpointError(f"the checkpoint has {rows} label rows; num_classes {num_classes} expects "
                              f"{num_classes + 1} (with the null label) or {num_classes}")
    has_null_label = rows is None or rows == num_classes + 1
    shape = {k: config[k] for k in ("hidden_size", "depth") if config.get(k) is not None}
    # class_dropout_prob > 0 is what gives the label table its null row; sampling runs in eval mode and drops none.
    return FCDM_models[config["model"]](in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma,
                                        class_dropout_prob=0.1 if has_null_label else 0.0, **shape)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What load_fcdm read, besides the model."""

    path: str
    weights: str         # the entry used: 'ema', 'model', 'state_dict' or 'bare'
    config: dict         # model_config's result plus learn_sigma: what the model was built with
    args: dict           # the training args stored in the checkpoint ({} when it has none)
    has_null_label: bool  # the label table has the null row, so classifier-free guidance can run
    prefer_ema: bool = True

    def describe(self) -> str:
        """Which weights were loaded, and why, e.g. "its EMA weights ('ema')"."""
        if self.weights == "ema":
            return "its EMA weights ('ema')"
        why = "EMA weights not preferred" if not self.prefer_ema else "the checkpoint has no EMA weights"
        return f"its {self.weights!r} weights, {why}"


def load_fcdm(path: str, prefer_ema: bool = True, learn_sigma: bool | None = None,
              device: torch.device | str = "cpu", **architecture) -> tuple[FCDM, LoadedCheckpoint]:
    """Read a checkpoint, build the FCDM it holds and load its weights strictly. -> (model in eval mode, details).

    `architecture` takes model_config's arguments (model, hidden_size, depth, in_channels, num_classes) where the
    checkpoint's stored args are missing or should be overridden. CheckpointError when the file cannot be read or its
    weights do not fit."""
    args = read_checkpoint_args(path)
    config = model_config(args, **architecture)
    state, which = read_model_state(path, prefer_ema)
    model = build_fcdm(config, state, learn_sigma)
    fit_state(model, state, f"checkpoint {path!r} ({which})")
    config["learn_sigma"] = model.learn_sigma
    loaded = LoadedCheckpoint(path, which, config, args, model.y_embedder_1.has_null_class, prefer_ema)
    return model.to(device).eval(), loaded


__all__ = ["CheckpointError", "DEFAULT_CONFIG", "DEFAULT_SAMPLING", "LoadedCheckpoint", "build_fcdm", "fit_state",
           "load_fcdm", "load_model_weights", "model_config", "read_checkpoint_args", "read_checkpoint_file",
           "read_model_state", "sampling_config"]
