"""Atomic file writes: a temporary file in the same directory, fsynced, then renamed over the target.

A crash (even SIGKILL) at any point leaves either the old file or the complete new one, never a torn file. Used for
checkpoints, post-hoc EMA snapshots, a run's args.json and a latent store's index and shards.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """Call write(file) on a temporary file next to `path`, fsync it, then rename it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save(obj) to `path`, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path: str) -> None:
    """`obj` as indented JSON at `path`, atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, default=str), binary=False)


def settings_differences(path: str, settings: dict) -> dict:
    """{key: (stored, now)} for every setting that differs from the JSON record at `path` (empty when there is no
    record yet). `settings` is compared as a reread would see it (tuples become lists)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        stored = json.load(f)
    now = json.loads(json.dumps(settings, default=str))
    return {k: (stored.get(k), now.get(k)) for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)}
