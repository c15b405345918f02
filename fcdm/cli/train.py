"""`fcdm-train` and the root train.py: train an FCDM (`fcdm-train` or `python train.py` is the CPU demo; under torchrun,
`torchrun --nproc_per_node=N train.py ...` or `torchrun --nproc_per_node=N --no-python fcdm-train ...`; under SLURM,
`srun python train.py ...` also works, each task taking its rank from SLURM's variables).

All the work is in fcdm.train; see docs/training.md for the flags, data formats, resume and multi-node use.
Set FCDM_DEBUG=1 to see the traceback behind an error message.
"""
import os
import sys

from fcdm import distributed
from fcdm.train.config import parse_args
from fcdm.train.guards import NonFiniteStepError
from fcdm.train.loop import train


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, NonFiniteStepError) as e:  # configuration and data errors: a message, not a traceback
        if os.environ.get("FCDM_DEBUG"):
            raise
        info = distributed.info()
        where = f" (rank {info.rank})" if info.world_size > 1 else ""
        print(f"train.py: error{where}: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ValueError) else 3
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
