"""The built-in procedural dataset and the global-batch sampler (data order, rank split, restart position)."""
import pytest
import torch

from fcdm.data import GlobalBatchSampler, ProceduralShapes
from fcdm.data.procedural import CLASS_NAMES, COLOURS


def test_images_are_seeded_deterministic_and_in_range():
    a, b, other = ProceduralShapes(16, 50, seed=1), ProceduralShapes(16, 50, seed=1), ProceduralShapes(16, 50, seed=2)
    x, y = a[7]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.item() == 7
    assert torch.equal(x, b[7][0]) and not torch.equal(x, other[7][0])
    assert torch.equal(a[(7, (0, 0, 0))][0], x)  # the sampler's (index, seed) key gives the same image
    assert -1 <= x.min() and x.max() <= 1 and torch.isfinite(x).all()
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError, match="image_size"):
        ProceduralShapes(4)


def test_classes_differ_in_colour_and_shape():
    ds = ProceduralShapes(32, 200)
    images = torch.stack([ds[i][0] for i in range(200)])
    labels = torch.tensor([ds[i][1] for i in range(200)])
    assert torch.bincount(labels).tolist() == [20] * len(CLASS_NAMES)
    # Colour: the brightest pixels of orange classes are red-dominant, of blue classes blue-dominant.
    colour_of = labels % len(COLOURS)
    red_minus_blue = (images[:, 0] - images[:, 2]).flatten(1).max(1).values
    assert (red_minus_blue[colour_of == 0] > 0.5).all() and (red_minus_blue[colour_of == 1] < 0.5).all()
    # Shape: the mean foreground coverage per class differs between shapes (a disc covers more than a ring).
    brightness = images.mean(1)  # (N, H, W)
    coverage = (brightness > brightness.flatten(1).median(1).values[:, None, None] + 0.3).float().mean((1, 2))
    per_shape = [coverage[labels // 2 == s].mean().item() for s in range(5)]
    assert len({round(c, 2) for c in per_shape}) == 5


def _epoch_items(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps * sampler.accumulation)]


def test_rank_split_and_accumulation_cover_exactly_the_single_process_batch():
    single = _epoch_items(GlobalBatchSampler(40, 8, seed=3), 5)
    for world, accum in ((2, 1), (4, 1), (2, 2)):
        shards = [_epoch_items(GlobalBatchSampler(40, 8, r, world, accum, seed=3), 5) for r in range(world)]
        for step in range(5):
            together = [item for r in range(world) for m in range(accum) for item in shards[r][step * accum + m]]
            assert sorted(together) == sorted(single[step]), (world, accum, step)
    # Every epoch visits each item at most once and drops the incomplete last batch.
    seen = [i for batch in single for i, _ in batch]
    assert len(seen) == len(set(seen)) == 40


def test_restart_position_and_new_order_each_epoch():
    full = _epoch_items(GlobalBatchSampler(12, 4, seed=0), 7)          # 3 steps per epoch
    resumed = _epoch_items(GlobalBatchSampler(12, 4, seed=0, start_step=4), 3)
    assert resumed == full[4:7]
    assert GlobalBatchSampler(12, 4).position(4) == (1, 1)
    epoch0 = [i for b in full[:3] for i, _ in b]
    epoch1 = [i for b in full[3:6] for i, _ in b]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert full[0][0][1] != full[3][0][1]  # per-sample seeds differ between epochs


def test_sampler_rejects_impossible_splits():
    with pytest.raises(ValueError, match="does not divide into 3 ranks"):
        GlobalBatchSampler(40, 8, world_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8)
