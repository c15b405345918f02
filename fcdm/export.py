"""Export a training checkpoint as weights people can share: `python -m fcdm.export CKPT OUT_DIR`.

    python -m fcdm.export results/000-FCDM-XL/checkpoints/0400000.pt fcdm-xl-256/      # fcdm's or official .pt
    python -m fcdm.export ckpt.pt fcdm-xl-256/ --push-to-hub user/fcdm-xl-256           # and upload it

OUT_DIR gets `model.safetensors` (the EMA weights, fp32), `config.json` (architecture, learn_sigma, null label,
objective, image size, VAE and latent scale, class names) and a model card `README.md`; each file is written
atomically. `fcdm.FCDMPipeline.from_pretrained(OUT_DIR or "user/repo")` loads it. Model flags left unset come from
the checkpoint's stored training args, else the paper's setting (FCDM-XL, 256 px, ddpm, sd-vae-ft-ema, 0.18215).
"""
from __future__ import annotations

import argparse
import os
import sys

from fcdm.flags import add_switch, add_vae_flags, existing_file, positive
from fcdm.load import CheckpointError
from fcdm.models import FCDM_models
from fcdm.objectives import OBJECTIVES
from fcdm.pipeline import FCDMPipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fcdm.export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", type=existing_file, help="fcdm or official checkpoint, a state_dict or .safetensors")
    p.add_argument("out_dir", help="folder to write (created; files already there are replaced)")
    p.add_argument("--model", choices=list(FCDM_models), default=None)
    p.add_argument("--num-classes", type=positive(int), default=None)
    p.add_argument("--in-channels", type=positive(int), default=None)
    p.add_argument("--image-size", type=positive(int), default=None, help="pixels")
    p.add_argument("--objective", choices=list(OBJECTIVES), default=None)
    add_vae_flags(p, default=None, help="the VAE to record: hub name, directory, ema, mse or none (pixel space)",
                  scale_default=None, scale_help="latent scale to record")
    add_switch(p, "--prefer-ema", True, "export the EMA weights when the checkpoint has them")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload the folder to this repository")
    add_switch(p, "--private", False, "with --push-to-hub: create the repository private")
    return p


def export(args: argparse.Namespace) -> FCDMPipeline:
    """Write args.out_dir from args.ckpt (and upload it with args.push_to_hub); returns the pipeline written."""
    architecture = {k: getattr(args, k) for k in ("model", "num_classes", "in_channels")}
    pipe = FCDMPipeline.from_checkpoint(args.ckpt, image_size=args.image_size, objective=args.objective,
                                        vae=args.vae, vae_scaling_factor=args.vae_scaling_factor,
                                        prefer_ema=args.prefer_ema, architecture=architecture, device="cpu")
    pipe.save_pretrained(args.out_dir)
    if args.push_to_hub:
        pipe.push_to_hub(args.push_to_hub, private=args.private)
    return pipe


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pipe = export(args)
    except (CheckpointError, ValueError, OSError) as err:
        if os.environ.get("FCDM_DEBUG"):
            raise
        print(f"fcdm.export: error: {err}", file=sys.stderr)
        return 2
    arch = pipe.spec["architecture"]
    print(f"Wrote {os.path.join(args.out_dir, 'model.safetensors')} and config.json: {arch['model']}, "
          f"{arch['num_classes']} classes, learn_sigma={arch['learn_sigma']}, {pipe.spec['objective']}, "
          f"{pipe.spec['image_size']} px, VAE {pipe.spec['autoencoder']['name'] or 'none (pixel space)'}"
          + (f"; uploaded to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
