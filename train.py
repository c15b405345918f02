"""Train an FCDM: `python train.py` (the CPU demo) or `torchrun --nproc_per_node=N train.py --feature-path ...`.

The code is fcdm.cli.train, which an installed fcdm also provides as the `fcdm-train` command. See docs/training.md.
"""
import sys

from fcdm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
