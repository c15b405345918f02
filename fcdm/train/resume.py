"""Saving a training run and resuming it: what a checkpoint holds, its files, and finding the one to resume from.

A checkpoint is a .pt dict with the official keys `model`, `ema`, `opt`, `args` (so official tooling and sample.py
read it), plus `train_state`, `rng` (one entry per rank), `world_size` and `format`. Every value is a tensor or a
plain Python type, so loading uses `weights_only=True` and never runs pickled code. Files are written atomically,
the newest --keep-last are kept, and a file that does not load is skipped when looking for the newest valid one.
(fcdm.load reads any checkpoint, ours or official, into a model for sampling.)
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import socket
import time

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from fcdm import __version__ as FCDM_VERSION, distributed
from fcdm.files import atomic_torch_save, atomic_write_json
from fcdm.load import CheckpointError, fit_state, read_checkpoint_file

from .state import TrainState, capture_rng, restore_rng

# ---- checkpoint files --------------------------------------------------------------------------------------------
FORMAT = "fcdm-train-v1"
_NAME = re.compile(r"^(\d{7,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"{step:07d}.pt"  # the official naming


def atomic_save(obj: dict, path: str) -> None:
    """torch.save to `path` atomically (fcdm.files): a crash leaves the old file or the new one, never a torn file."""
    atomic_torch_save(obj, path)


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the step checkpoints in `directory`, oldest first (best.pt and temporaries excluded)."""
    found = []
    for path in glob.glob(os.path.join(directory, "*.pt")):
        m = _NAME.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def is_milestone(step: int, keep_every: int) -> bool:
    """A step checkpoint kept for good: every `keep_every` steps (none when keep_every is 0)."""
    return keep_every > 0 and step % keep_every == 0


def prune(directory: str, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep_last` step checkpoints that are not milestones (0 keeps everything);
    milestones, every `keep_every` steps, are never deleted."""
    if keep_last > 0:
        others = [(s, p) for s, p in list_checkpoints(directory) if not is_milestone(s, keep_every)]
        for _, path in others[:-keep_last]:
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


def write_checkpoint(payload: dict, path: str, keep_last: int | None = None, keep_every: int = 0) -> None:
    """Refuse non-finite weights, write `payload` atomically to `path`, then keep the milestones and the newest
    `keep_last` other step checkpoints of its directory (None: prune nothing, as for best.pt)."""
    if not (all_finite(payload["model"]) and all_finite(payload["ema"])):
        step = payload["train_state"]["step"]
        raise RuntimeError(f"refusing to save non-finite weights at step {step}")
    atomic_save(payload, path)
    if keep_last is not None:
        prune(os.path.dirname(path), keep_last, keep_every)


# ---- what a checkpoint holds -------------------------------------------------------------------------------------
def training_payload(model, ema, opt, args, state: TrainState, posthoc=None) -> dict:
    """The checkpoint dict (collective under FSDP or DDP; meaningful on rank 0)."""
    state_of = full_state_of(args)
    model_sd, ema_sd = state_of(model), state_of(ema.module)
    if args.fsdp:
        opt_sd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        opt_sd = opt.state_dict()
    rng = distributed.all_gather_object(capture_rng())
    payload = {"model": model_sd, "ema": ema_sd, "opt": opt_sd, "args": dict(vars(args)),
               "train_state": state.to_dict(), "rng": rng, "world_size": distributed.info().world_size,
               "format": FORMAT}
    if posthoc is not None:  # the power-function EMAs, so that a resumed run continues their profiles exactly
        payload["posthoc_ema"] = posthoc.state_dict(full_state_of(args))
    return payload


def restore(ckpt: dict, model, ema, opt, state: TrainState, args, log, posthoc=None) -> None:
    """Load a checkpoint into the (unwrapped, or FSDP-sharded) model, EMA, optimiser, state, RNGs and post-hoc EMAs
    (which start from the model when the checkpoint has none)."""
    if "model" not in ckpt:  # e.g. a post-hoc EMA reconstruction: its EMA weights are the starting point
        ckpt = {**ckpt, "model": ckpt["ema"]}
    if args.fsdp:
        load = load_full_state(args)
        load(model, ckpt["model"])
        load(ema.module, ckpt.get("ema", ckpt["model"]))
        if "opt" in ckpt:
            set_optimizer_state_dict(model, opt, ckpt["opt"], options=StateDictOptions(full_state_dict=True))
    else:
        try:
            fit_state(model, ckpt["model"], "its 'model' entry")
            fit_state(ema.module, ckpt.get("ema", ckpt["model"]), "its 'ema' entry")
        except CheckpointError as e:  # missing keys or shape mismatches: a checkpoint of another architecture
            raise ValueError(f"the checkpoint does not fit this model (check --model, --hidden-size, --depth, "
                             f"--num-classes, --objective): {e}") from e
        if "opt" in ckpt:
            opt.load_state_dict(ckpt["opt"])
    if posthoc is not None:
        restore_posthoc(posthoc, ckpt, args, log)
    if ckpt.get("format") != FORMAT:
        log("loaded weights and optimiser from an official checkpoint; step and data position start at 0")
        return
    restored = TrainState.from_dict(ckpt["train_state"])
    state.__dict__.update(restored.__dict__)
    info = distributed.info()
    rng = ckpt.get("rng", [])
    if ckpt.get("world_size") == info.world_size and info.rank < len(rng):
        restore_rng(rng[info.rank])
    else:
        log(f"world size changed ({ckpt.get('world_size')} -> {info.world_size}): per-rank RNG states not "
            f"restored; data order and per-step noise are unaffected")


def full_state_of(args):
    """module -> its full (unsharded) state dict, on the CPU under FSDP: a collective there, as every rank calls it."""
    if not args.fsdp:
        return lambda module: module.state_dict()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return lambda module: get_model_state_dict(module, options=full)


def load_full_state(args):
    """(module, full state dict) -> loaded, sharding it under FSDP."""
    if not args.fsdp:
        return lambda module, sd: module.load_state_dict(sd)
    return lambda module, sd: set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))


def restore_posthoc(posthoc, ckpt: dict, args, log) -> None:
    if "posthoc_ema" in ckpt:
        posthoc.load_state_dict(ckpt["posthoc_ema"], load_full_state(args))
        return
    for module in posthoc.modules:  # their profiles start here (a power-function EMA forgets its start anyway)
        load_full_state(args)(module, {k: v.float() for k, v in ckpt["model"].items()})
    log("the checkpoint has no post-hoc EMA state: the power-function EMAs start from its weights")


def write_run_record(run_dir: str, args, world_size: int) -> None:
    """<run>/args.json, atomically: the command line, the resolved settings and where the run started."""
    record = {"command": getattr(args, "command", None), "config": dict(vars(args)), "world_size": world_size,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
              "torch": torch.__version__, "fcdm": FCDM_VERSION}
    atomic_write_json(record, os.path.join(run_dir, "args.json"))



# ---- where the run lives and what it resumes from ----------------------------------------------------------------
def run_directory(args) -> str:
    """<results-dir>/<run>: the run being resumed, --run-name, or the next free NNN-<model> (official naming).
    Rank 0 chooses and creates it; every rank gets its path."""
    run_dir = None
    if distributed.info().is_main:
        resume_path = args.resume if args.resume not in (None, "auto") else args.ckpt
        if resume_path and os.path.basename(os.path.dirname(os.path.abspath(resume_path))) == "checkpoints":
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
        elif args.run_name:
            run_dir = os.path.join(args.results_dir, args.run_name)
        elif args.resume == "auto":
            run_dir = newest_run_with_a_checkpoint(args.results_dir, args.model)
        if run_dir is None:
            os.makedirs(args.results_dir, exist_ok=True)
            index = len(os.listdir(args.results_dir))
            run_dir = os.path.join(args.results_dir, f"{index:03d}-{args.model}" +
                                   (f"-{args.vae_name}" if args.vae_name else ""))
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    return distributed.broadcast_object(run_dir)


def newest_run_with_a_checkpoint(results_dir: str, model: str) -> str | None:
    """The highest-numbered NNN-<model>... run directory that holds a step checkpoint, or None."""
    suffix = "-" + model
    runs = sorted(d for d in (os.listdir(results_dir) if os.path.isdir(results_dir) else [])
                  if d[:3].isdigit() and d[3:].startswith(suffix))
    for name in reversed(runs):
        if list_checkpoints(os.path.join(results_dir, name, "checkpoints")):
            return os.path.join(results_dir, name)
    return None


def find_resume_checkpoint(args, ckpt_dir: str, log) -> tuple[str, dict] | None:
    """(path, contents) of the checkpoint to start from, or None. Rank 0 chooses, so all ranks load the same file."""
    path = args.resume or args.ckpt
    if args.resume == "auto":
        found = find_latest_valid(ckpt_dir, log) if distributed.info().is_main else None
        path = distributed.broadcast_object(found[0] if found else None)
        if found is not None:
            return found  # rank 0 has it loaded already
    return (path, load(path)) if path else None
