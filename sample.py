"""Sample N images from an FCDM checkpoint into one ADM-evaluator .npz: `python sample.py --ckpt ...` or
`torchrun --nproc_per_node=N sample.py ...`.

The code is fcdm.cli.sample, which an installed fcdm also provides as the `fcdm-sample` command. See docs/sampling.md.
"""
import sys

from fcdm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
