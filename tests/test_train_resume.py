"""Exact resume: 10 steps straight equal 5 steps, a stop, and 5 resumed steps, bit for bit in fp32 on CPU."""
import os
import signal
import sys

import pytest
import torch

from fcdm.train import resume as ckpt_io

from .test_train_common import (REPO, TINY, assert_state_dicts_equal, final_checkpoint, read_metrics, run_train,
                                signal_mid_run, slow_loader_path)

# Label dropout on, grad accumulation on, so the per-step RNG and the data position inside the epoch both matter:
# 40 images / batch 4 = 10 steps per epoch, so step 5 stops mid-epoch.
RESUME_FLAGS = ["--max-train-steps", "10", "--grad-accum", "2", "--class-dropout-prob", "0.3", "--ckpt-every", "5"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    state, run_dir = run_train(tmp_path_factory.mktemp("straight"), *RESUME_FLAGS)
    assert state.step == 10
    return final_checkpoint(run_dir), run_dir


def _compare(ckpt, reference):
    for key in ("model", "ema"):
        assert_state_dicts_equal(ckpt[key], reference[key], key)
    assert ckpt["train_state"]["step"] == reference["train_state"]["step"] == 10
    assert ckpt["train_state"]["images_seen"] == 40
    for a, b in zip(ckpt["opt"]["state"].values(), reference["opt"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_stop_at_5_then_resume_auto_equals_straight_10(tmp_path, straight_run):
    reference, straight_dir = straight_run
    state, run_dir = run_train(tmp_path, *RESUME_FLAGS[:1], "5", *RESUME_FLAGS[2:])
    assert state.step == 5 and (state.epoch, state.batch_in_epoch) == (0, 5)
    assert [s for s, _ in ckpt_io.list_checkpoints(os.path.join(run_dir, "checkpoints"))] == [5]
    state, _ = run_train(tmp_path, *RESUME_FLAGS, "--resume", "auto")
    assert state.step == 10
    _compare(final_checkpoint(run_dir), reference)
    # The logged losses of the resumed half equal the straight run's.
    straight = {m["step"]: m["loss"] for m in read_metrics(straight_dir) if "loss" in m}
    resumed = {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}
    assert straight == resumed and len(straight) == 10


def test_sigterm_saves_at_end_of_step_and_resume_is_exact(tmp_path, straight_run):
    reference, _ = straight_run
    # Same thread count as this process, so float reductions (and hence the weights) match bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": f"{slow_loader_path(tmp_path)}{os.pathsep}{REPO}"}
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *TINY, "--results-dir", str(tmp_path), "--run-name",
           "run", *RESUME_FLAGS[:1], "1000", *RESUME_FLAGS[2:]]
    proc, out = signal_mid_run(cmd, env, signal.SIGTERM)
    assert proc.returncode == 0, out
    assert "stopping after step" in out and "SIGTERM" in out
    steps = [s for s, _ in ckpt_io.list_checkpoints(os.path.join(tmp_path, "run", "checkpoints"))]
    assert steps and 2 <= steps[-1] < 10, out
    state, run_dir = run_train(tmp_path, *RESUME_FLAGS, "--resume", "auto")
    assert state.step == 10
    _compare(final_checkpoint(run_dir), reference)
