"""Experiment trackers next to log.txt and metrics.jsonl: TensorBoard (scalars and sample grids) and Weights & Biases.

Both are optional packages (`pip install 'fcdm[track]'`); parse_args refuses --wandb or --tensorboard when the
package is missing, naming the install command. Trackers run on rank 0 only. A W&B run keeps its id in the training
checkpoint, so a resumed training run (--resume) continues the same W&B run.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np


class TensorBoardTracker:
    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # optional: imported only when used
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        self.writer.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, args, run_dir: str, run_id: str | None):
        import wandb  # optional: imported only when used
        self.wandb = wandb
        self.run = wandb.init(project=args.wandb_project, entity=args.wandb_entity,
                              name=args.wandb_run_name or os.path.basename(os.path.abspath(run_dir)),
                              id=run_id, resume="allow", dir=run_dir,
                              config={k: v for k, v in vars(args).items() if _plain(v)})
        self.run_id = self.run.id

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, grid: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(grid)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple))


def open_trackers(args, run_dir: str, state) -> list:
    """The trackers this run asked for (rank 0 only). Sets state.wandb_run_id to the W&B run's id."""
    trackers = []
    tensorboard = args.tensorboard if args.tensorboard is not None else \
        importlib.util.find_spec("tensorboard") is not None
    if tensorboard:
        trackers.append(TensorBoardTracker(run_dir))
    if args.wandb:
        tracker = WandbTracker(args, run_dir, state.wandb_run_id)
        state.wandb_run_id = tracker.run_id
        trackers.append(tracker)
    return trackers
