"""Command-line flags of train.py. The official FCDM flag names keep their meaning; new flags are additive.

Defaults depend on the data source: with no data flag the run is the CPU demo (a small FCDM on the built-in
procedural shapes, about 5 minutes on 2 cores); with real data they are the paper's recipe (FCDM-XL, 256 px,
batch 256, AdamW 1e-4 constant, EMA 0.9999). Any flag given explicitly wins.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from fcdm.flags import (add_backend_flag, add_device_flag, add_switch, add_vae_flags, existing_file, non_negative,
                        positive, unit_interval)
from fcdm.ema import MAX_SIGMA_REL
from fcdm.load import model_config, read_checkpoint_args
from fcdm.models import FCDM_CONFIGS
from fcdm.objectives import OBJECTIVES
from fcdm.optim import PAPER_LR, PAPER_WEIGHT_DECAY
from fcdm.vae import PIXEL_SPACE, VAE_ALIASES, resolve_vae_name

# Flags whose default depends on the data source: (demo, paper recipe).
SOURCE_DEFAULTS = {
    "model": ("FCDM-T", "FCDM-XL"),
    "image_size": (16, 256),
    "global_batch_size": (32, 256),
    "epochs": (1_000_000, 1400),
    "max_train_steps": (2000, 2_000_000),
    "lr": (1e-3, PAPER_LR),
    "warmup_steps": (50, 0),
    "ema_warmup": (True, False),
    "ckpt_every": (500, 50_000),
    "keep_every": (1000, 50_000),
    "posthoc_ema_every": (100, 50_000),
    "log_every": (50, 100),
    "sample_every": (0, 50_000),
    "eval_every": (0, 0),
    "final_eval": (True, False),
    "cfg_scale": (3.0, 4.0),
    "num_sampling_steps": (50, 250),
    "num_workers": (0, min(8, os.cpu_count() or 1)),
    "eval_samples": (200, 10_000),
}


# Optional packages behind a flag: (package to look for, install command).
OPTIONAL = {"wandb": ("wandb", "pip install 'fcdm[track]' (or: pip install wandb)"),
            "tensorboard": ("tensorboard", "pip install 'fcdm[track]' (or: pip install tensorboard)")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None: those flags say in their help what happens when they are absent,
    and the data-dependent ones show both their defaults."""

    def _get_help_string(self, action):
        if action.default is None or action.dest in SOURCE_DEFAULTS:
            return action.help
        return super()._get_help_string(action)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an FCDM (see docs/training.md). With no data flag: the CPU demo.",
                                formatter_class=HelpFormatter)
    add_data_flags(p.add_argument_group("data (at most one source; none = built-in procedural shapes)"))
    add_model_flags(p.add_argument_group("model and objective"))
    add_optimisation_flags(p.add_argument_group("optimisation"))
    add_output_flags(p.add_argument_group("duration and output"))
    add_cluster_flags(p.add_argument_group("trackers and clusters"))
    for action in p._actions:
        if action.dest in SOURCE_DEFAULTS:
            demo, paper = SOURCE_DEFAULTS[action.dest]
            action.help = ((action.help + " ") if action.help else "") + \
                f"(default: {_shown(demo)} for the demo, {_shown(paper)} with real data)"
    return p


def add_data_flags(g) -> None:
    pos, nonneg = positive, non_negative
    g.add_argument("--data-path", help="ImageFolder root (class sub-folders), encoded to latents by --vae "
                   "(pixel space with --vae none)")
    g.add_argument("--feature-path", help="official layout: directory of per-image latent .npy files")
    g.add_argument("--label-path", help="official layout: directory of per-image label .npy files")
    g.add_argument("--latent-store", help="a store written by `python -m fcdm.data.extract`")
    g.add_argument("--zarr-path", help=argparse.SUPPRESS)  # official; unsupported, rejected with advice
    add_vae_flags(g, default=None, help=f"{' | '.join(VAE_ALIASES)} (the SD-VAE decoders, as in DiT) | {PIXEL_SPACE} "
                  "(pixel space) | a diffusers AutoencoderKL directory or hub name: encodes --data-path on the fly "
                  "and decodes latent sample grids (default: ema with --data-path, as DiT; none otherwise: grids "
                  "of latent data then show the first three latent channels)", scale_default=None,
                  scale_help="latent scale (default: a latent store's recorded scale, else 0.18215, SD-VAE's)")
    add_switch(g, "--random-flip", True, "random horizontal flips of --data-path images and latent-store entries "
               "(turn off for digits, text, ...)")
    g.add_argument("--vae-name", default=None, help="official flag, only used in the run name")
    g.add_argument("--image-size", type=pos(int), default=None, help="pixel size (ImageFolder crop, procedural)")
    g.add_argument("--num-classes", type=pos(int), default=None, help="default: from the data (1000 for .npy)")
    g.add_argument("--in-channels", type=pos(int), default=None, help="default: from the data")
    g.add_argument("--dataset-size", type=pos(int), default=10_000, help="procedural dataset length")
    g.add_argument("--num-workers", type=nonneg(int), default=None, help="DataLoader workers per process")


def add_model_flags(g) -> None:
    pos, nonneg = positive, non_negative
    g.add_argument("--model", choices=list(FCDM_CONFIGS), default=None, help="architecture (FCDM_CONFIGS)")
    g.add_argument("--hidden-size", type=pos(int), default=None, help="override the config's base width C")
    g.add_argument("--depth", type=pos(int), nargs=5, default=None, metavar="N",
                   help="override the config's 5 block counts (enc1 enc2 latent dec2 dec1)")
    g.add_argument("--objective", choices=list(OBJECTIVES), default="ddpm",
                   help="ddpm: 1000-step DDPM, learned sigma, hybrid loss (the paper); flow: flow matching")
    g.add_argument("--class-dropout-prob", type=unit_interval(include_one=False), default=0.1,
                   help="label dropout for CFG")
    add_backend_flag(g)
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward")


def add_optimisation_flags(g) -> None:
    pos, nonneg = positive, non_negative
    g.add_argument("--global-batch-size", type=pos(int), default=None, help="images per step over all ranks")
    g.add_argument("--grad-accum", type=pos(int), default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=pos(float), default=None, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=nonneg(float), default=PAPER_WEIGHT_DECAY, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=nonneg(int), default=None, help="linear lr warmup, then constant")
    g.add_argument("--max-grad-norm", type=nonneg(float), default=0.0, help="clip gradients (0 = off)")
    g.add_argument("--ema-decay", type=unit_interval(include_one=False), default=0.9999,
                   help="decay of the EMA saved as `ema` (applied after every optimiser step)")
    add_switch(g, "--ema-warmup", None, "decay min(ema_decay, (1+step)/(10+step))")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    add_device_flag(g)
    g.add_argument("--dist-timeout-minutes", type=pos(float), default=30.0,
                   help="how long a process waits in a collective (e.g. while rank 0 writes a checkpoint) before "
                        "the job is aborted; NCCL's own default is 10")
    g.add_argument("--max-consecutive-skips", type=pos(int), default=10,
                   help="stop after this many consecutive non-finite steps")


def add_output_flags(g) -> None:
    pos, nonneg = positive, non_negative
    g.add_argument("--epochs", type=pos(int), default=None, help="stop after this many epochs")
    g.add_argument("--max-train-steps", type=pos(int), default=None, help="stop exactly after this many steps")
    g.add_argument("--global-seed", type=int, default=0, help="seeds the weights, data order and noise")
    g.add_argument("--results-dir", default="results", help="where run directories are created")
    g.add_argument("--run-name", default=None, help="default: NNN-<model>, the next free index")
    g.add_argument("--ckpt-every", type=nonneg(int), default=None, help="checkpoint every N steps (0 = only the final one)")
    g.add_argument("--keep-every", type=nonneg(int), default=None, help="keep the checkpoint of every N-th step for "
                   "good (0 = none)")
    g.add_argument("--keep-last", type=nonneg(int), default=3, help="other step checkpoints kept, newest first "
                   "(0 = all)")
    g.add_argument("--log-every", type=pos(int), default=None, help="log line and metrics row every N steps")
    g.add_argument("--sample-every", type=nonneg(int), default=None, help="EMA sample grid every N steps (0 = end)")
    g.add_argument("--eval-every", type=nonneg(int), default=None, help="evaluate the EMA every N steps, keep best.pt")
    add_switch(g, "--final-eval", None, "evaluate once at the end")
    g.add_argument("--eval-samples", type=pos(int), default=None, help="images generated per evaluation")
    g.add_argument("--fid-ref", type=existing_file, default=None,
                   help="ADM reference .npz: evaluate with Inception FID (fcdm.eval)")
    g.add_argument("--cfg-scale", type=nonneg(float), default=None, help="guidance of sample grids and evaluations")
    g.add_argument("--num-sampling-steps", type=pos(int), default=None, help="sampler steps of grids and "
                   "evaluations")
    g.add_argument("--sampler", default=None, help="fcdm.sampling sampler (default: ddpm, or sde for flow)")
    g.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint of the run) or a path")
    g.add_argument("--ckpt", type=existing_file, default=None, help="official flag: start from this checkpoint "
                   "(exact resume when it is one of ours, weights only when official)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to log.txt)")
    add_switch(g, "--posthoc-ema", False, "also track power-function EMAs and save snapshots for post-hoc EMA "
               "(EDM2; `python -m fcdm.ema reconstruct` after training)")
    g.add_argument("--posthoc-ema-sigma-rels", type=positive(float), nargs="+", default=[0.05, 0.10], metavar="S",
                   help="relative standard deviations of the tracked EMA profiles")
    g.add_argument("--posthoc-ema-every", type=pos(int), default=None, help="snapshot interval in steps")
    g.add_argument("--posthoc-ema-dtype", choices=("fp16", "fp32"), default="fp16", help="snapshot precision")


def add_cluster_flags(g) -> None:
    add_switch(g, "--wandb", False, "log to Weights & Biases (pip install 'fcdm[track]'; WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", default="fcdm", help="W&B project")
    g.add_argument("--wandb-entity", default=None, help="W&B team or user (default: yours)")
    g.add_argument("--wandb-run-name", default=None, help="W&B run name (default: the run directory's name)")
    add_switch(g, "--tensorboard", None, "scalars and sample grids for TensorBoard in <run>/tensorboard (default: "
               "on when tensorboard is installed)")
    add_switch(g, "--slurm-requeue", True, "under SLURM, after SIGUSR1 (time limit near) has saved a checkpoint, "
               "requeue the job with scontrol so that --resume auto continues it")


def data_source(args) -> str:
    if args.latent_store:
        return "latent_store"
    if args.feature_path or args.label_path:
        return "npy"
    if args.data_path:
        return "imagefolder_latent" if args.vae else "imagefolder"
    return "procedural"


def check_optional_packages(p, args) -> None:
    """--wandb or --tensorboard without the package: an error that names the flag and the install command."""
    for flag in OPTIONAL:
        package, install = OPTIONAL[flag]
        if getattr(args, flag) and importlib.util.find_spec(package) is None:
            p.error(f"--{flag} needs the {package} package, which is not installed: {install}")


def architecture_from_checkpoint(args) -> None:
    """With --ckpt or --resume PATH and no --model: the model, width and depth the checkpoint was trained with (as
    its stored args say; fcdm.load reads them as sampling does). Flags given explicitly win."""
    path = args.ckpt or (args.resume if args.resume != "auto" else None)
    stored = read_checkpoint_args(path) if path else {}
    if args.model is None and stored.get("model") in FCDM_CONFIGS:
        config = model_config(stored, hidden_size=args.hidden_size, depth=args.depth)
        args.model, args.hidden_size = config["model"], config["hidden_size"]
        args.depth = list(config["depth"]) if config["depth"] is not None else None


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate; every inconsistency is an argparse error naming the flag."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.zarr_path:
        p.error("--zarr-path is not supported; convert with `python -m fcdm.data.extract` and use --latent-store")
    sources = [f for f, v in (("--data-path", args.data_path), ("--feature-path/--label-path",
               args.feature_path or args.label_path), ("--latent-store", args.latent_store)) if v]
    if len(sources) > 1:
        p.error(f"give at most one data source, got {' and '.join(sources)}")
    if bool(args.feature_path) != bool(args.label_path):
        p.error("--feature-path and --label-path go together")
    for flag, path in (("--data-path", args.data_path), ("--feature-path", args.feature_path),
                       ("--label-path", args.label_path), ("--latent-store", args.latent_store)):
        if path and not os.path.isdir(path):
            p.error(f"{flag} {path!r} is not a directory")
    if args.resume and args.ckpt:
        p.error("give --resume or --ckpt, not both")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        p.error(f"--resume {args.resume!r} is neither 'auto' nor an existing file")

    given_vae = args.vae
    if args.vae is None:  # DiT's default for images; latent data is decoded only with an explicit --vae
        args.vae = "ema" if args.data_path else PIXEL_SPACE
    args.vae = resolve_vae_name(args.vae)
    if args.vae and not (args.data_path or args.latent_store or args.feature_path):
        p.error(f"--vae {given_vae}: the built-in demo data is in pixel space; --vae applies to --data-path and "
                "latent data")
    check_optional_packages(p, args)
    args.command = list(sys.argv[1:] if argv is None else argv)
    args.data_source = data_source(args)
    architecture_from_checkpoint(args)
    demo = args.data_source == "procedural"
    for name, (demo_value, paper_value) in SOURCE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, demo_value if demo else paper_value)
    hidden, depth = FCDM_CONFIGS[args.model]
    args.hidden_size = args.hidden_size or hidden
    args.depth = list(args.depth or depth)
    args.learn_sigma = args.objective == "ddpm"
    if args.posthoc_ema and not all(s < MAX_SIGMA_REL for s in args.posthoc_ema_sigma_rels):
        p.error(f"--posthoc-ema-sigma-rels must be below {MAX_SIGMA_REL:.4f}, got {args.posthoc_ema_sigma_rels}")
    if args.global_batch_size % args.grad_accum:
        p.error(f"--global-batch-size {args.global_batch_size} is not divisible by --grad-accum {args.grad_accum}")
    return args
