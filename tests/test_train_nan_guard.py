"""The NaN guard end to end: a NaN in the data skips exactly the steps it reaches; a NaN everywhere stops the run."""
import os

import numpy as np
import pytest

from fcdm.train import resume as ckpt_io
from fcdm.train.guards import NonFiniteStepError

from .test_train_common import final_checkpoint, read_metrics, run_train


def _npy_dataset(root, n=8, poisoned=(3,)):
    feats, labels = root / "features", root / "labels"
    feats.mkdir(), labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        if i in poisoned:
            x[0, 1, 2, 3] = np.nan
        np.save(feats / f"{i:05d}.npy", x)
        np.save(labels / f"{i:05d}.npy", np.array([i % 3]))
    return ["--feature-path", feats, "--label-path", labels, "--num-classes", "3"]


def test_nan_in_one_image_skips_only_the_steps_that_contain_it(tmp_path):
    data = _npy_dataset(tmp_path)
    # 8 images / batch 4: each epoch has one poisoned batch, so 3 epochs skip exactly 3 of 6 steps.
    state, run_dir = run_train(tmp_path, *data, "--max-train-steps", "6")
    assert state.step == 6 and state.skipped_steps == 3
    ckpt = final_checkpoint(run_dir)
    assert ckpt_io.all_finite(ckpt["model"]) and ckpt_io.all_finite(ckpt["ema"])
    skips = [m for m in read_metrics(run_dir) if "skipped_steps" in m and "loss" not in m]
    assert len(skips) == 3
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert all(loss is None or np.isfinite(loss) for loss in losses)


def test_consecutive_non_finite_steps_stop_the_run_and_keep_finite_checkpoints(tmp_path):
    data = _npy_dataset(tmp_path, poisoned=range(8))
    with pytest.raises(NonFiniteStepError, match="3 consecutive steps"):
        run_train(tmp_path, *data, "--max-train-steps", "20", "--max-consecutive-skips", "3", "--ckpt-every", "1")
    # Checkpoints written before the stop hold the (untouched, finite) initial weights.
    ckpts = ckpt_io.list_checkpoints(os.path.join(tmp_path, "run", "checkpoints"))
    assert [s for s, _ in ckpts] == [1, 2]
    assert ckpt_io.all_finite(ckpt_io.load(ckpts[-1][1])["model"])
