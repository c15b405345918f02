"""Checkpoint files: atomic writes, keep-last-K, finding the newest valid one, and safe loading.

A checkpoint is a .pt dict with the official keys `model`, `ema`, `opt`, `args` (so official tooling and sample.py
read it), plus `train_state`, `rng` (one entry per rank), `world_size` and `format`. Every value is a tensor or a
plain Python type, so loading uses `weights_only=True` and never runs pickled code.
"""
from __future__ import annotations

import argparse
import glob
import os
import re

import torch

from fcdm.load import read_checkpoint_file

FORMAT = "fcdm-train-v1"
_NAME = re.compile(r"^(\d{7,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"{step:07d}.pt"  # the official naming


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: dict, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync it, then rename over `path`.

    A crash at any point leaves either the old file or the complete new one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the step checkpoints in `directory`, oldest first (best.pt and temporaries excluded)."""
    found = []
    for path in glob.glob(os.path.join(directory, "*.pt")):
        m = _NAME.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune(directory: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (0 keeps everything)."""
    if keep_last > 0:
        for _, path in list_checkpoints(directory)[:-keep_last]:
            os.remove(path)


def load(path: str) -> dict:
    """Load a checkpoint on the CPU through fcdm.load's safe reader (weights_only=True, argparse.Namespace
    allow-listed because official checkpoints store args that way); args come back as a dict."""
    ckpt = read_checkpoint_file(path)  # a CheckpointError (a ValueError) for a missing or unreadable file
    if not isinstance(ckpt, dict) or not ("model" in ckpt or "ema" in ckpt):
        raise ValueError(f"{path!r} is not an FCDM checkpoint (no 'model' or 'ema' entry)")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def find_latest_valid(directory: str, log=print) -> tuple[str, dict] | None:
    """The newest step checkpoint in `directory` that loads, with its contents; None if there is none.

    A file that fails to load (e.g. truncated by a full disk) is reported and skipped."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            ckpt = load(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, with the reason logged
            log(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
            continue
        if ckpt.get("format") == FORMAT:
            return path, ckpt
        log(f"skipping {path}: not a resumable {FORMAT} checkpoint")
    return None


# Settings a resumed run must share with the run that wrote the checkpoint; anything else may change.
COMPATIBLE_KEYS = ("model", "hidden_size", "depth", "in_channels", "image_size", "num_classes", "objective",
                   "learn_sigma", "global_batch_size", "global_seed", "data_source")


def check_compatible(saved_args: dict, args: dict, path: str) -> None:
    """Raise ValueError listing every setting that differs between the checkpoint and this run."""
    diffs = [f"{k}: checkpoint {saved_args.get(k)!r} vs now {args.get(k)!r}"
             for k in COMPATIBLE_KEYS if k in saved_args and saved_args.get(k) != args.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was written with different settings:\n  "
                         + "\n  ".join(diffs) + "\nStart a new run (--results-dir / --run-name), or pass the "
                         "original settings.")


def all_finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point())
