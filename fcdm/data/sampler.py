"""The data order: a seeded permutation per epoch, cut into global batches, each split across ranks.

Because the order is defined on the *global* batch, 1 process with batch G sees exactly the samples that
N processes with G/N each see together, and a resumed run restarts at the saved (epoch, batch) position. Each sample
also carries a seed derived from (seed, epoch, position) for its augmentation, so flips and latent draws are the same
whatever the world size, worker count or restart point.
"""
from __future__ import annotations

import torch


class GlobalBatchSampler:
    """Infinite iterator over this rank's micro-batches: lists of (dataset index, sample seed) pairs."""

    def __init__(self, dataset_len: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 accumulation: int = 1, seed: int = 0, shuffle: bool = True, start_step: int = 0):
        if global_batch % (world_size * accumulation):
            raise ValueError(f"global batch {global_batch} does not divide into {world_size} ranks x "
                             f"{accumulation} accumulation steps")
        if dataset_len < global_batch:
            raise ValueError(f"the dataset has {dataset_len} items, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.rank = dataset_len, global_batch, rank
        self.accumulation, self.seed, self.shuffle = accumulation, seed, shuffle
        self.micro_batch = global_batch // (world_size * accumulation)   # per rank, per forward
        self.steps_per_epoch = dataset_len // global_batch              # the incomplete last batch is dropped
        self.start_step = start_step

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of optimiser step `step`."""
        return divmod(step, self.steps_per_epoch)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        epoch, batch = self.position(self.start_step)
        while True:
            order = self._order(epoch)
            for b in range(batch, self.steps_per_epoch):
                for micro in range(self.accumulation):
                    # Within a global batch: micro-batches in order, and within each, ranks side by side.
                    first = b * self.global_batch + micro * self.global_batch // self.accumulation \
                        + self.rank * self.micro_batch
                    yield [(int(order[p]), (self.seed, epoch, p)) for p in range(first, first + self.micro_batch)]
            epoch, batch = epoch + 1, 0
