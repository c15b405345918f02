"""`python -m fcdm.models [--latent-size 32]`: print each config's parameter count and forward GMACs."""
import argparse

import torch

from . import FCDM_CONFIGS, FCDM_models
from .flops import count_macs


def zoo_table(latent_size: int = 32, in_channels: int = 4) -> str:
    rows = [f"{'model':<8} {'C':>4}  {'depths':<17} {'params':>9}  {f'GMACs @ {latent_size}x{latent_size}':>14}"]
    for name, (C, depth) in FCDM_CONFIGS.items():
        with torch.device("meta"):  # no memory, no init cost: only shapes are needed
            n = sum(p.numel() for p in FCDM_models[name](in_channels=in_channels).parameters())
        macs = count_macs(C, depth, latent_size, in_channels)
        rows.append(f"{name:<8} {C:>4}  {str(list(depth)):<17} {n / 1e6:>8.1f}M  {macs / 1e9:>14.1f}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (image side / 8 with the SD VAE)")
    parser.add_argument("--in-channels", type=int, default=4)
    args = parser.parse_args()
    print(zoo_table(args.latent_size, args.in_channels))
    print("GMACs are multiply-accumulates of one forward pass (the paper calls them GFLOPs).")


if __name__ == "__main__":
    main()
