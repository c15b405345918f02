"""TensorBoard (scalars and sample grids) and Weights & Biases (offline here), and the errors when either is asked
for but not installed."""
import glob
import os
import re
import sys

import pytest

from fcdm.train.config import parse_args

from .test_train_common import final_checkpoint, run_train


@pytest.mark.parametrize("flag,package", [("--wandb", "wandb"), ("--tensorboard", "tensorboard")])
def test_a_tracker_that_is_not_installed_names_the_flag_and_the_install_command(flag, package, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # find_spec then reports it missing
    with pytest.raises(SystemExit):
        parse_args([flag])
    err = capsys.readouterr().err
    assert f"{flag} needs the {package} package" in err and "pip install 'fcdm[track]'" in err


def test_tensorboard_gets_the_scalars_and_the_sample_grids(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _, run_dir = run_train(tmp_path, "--max-train-steps", "4", "--sample-every", "2", "--tensorboard")
    events = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 4] and grids[0].width >= 8 and grids[0].height >= 8
    _, other = run_train(tmp_path / "off", "--max-train-steps", "1", "--no-tensorboard")
    assert not os.path.exists(os.path.join(other, "tensorboard"))


def test_wandb_offline_logs_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["--wandb", "--wandb-project", "fcdm-test", "--ckpt-every", "2", "--sample-every", "2"]
    _, run_dir = run_train(tmp_path, "--max-train-steps", "2", *common)
    run_id = final_checkpoint(run_dir)["train_state"]["wandb_run_id"]
    assert run_id
    run_train(tmp_path, "--max-train-steps", "4", *common, "--resume", "auto")
    assert final_checkpoint(run_dir)["train_state"]["wandb_run_id"] == run_id
    offline = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    # offline-run-<start second>-<run id>, with a -1 appended when both runs start within the same second
    folder = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?")
    assert len(offline) == 2 and all(folder.fullmatch(os.path.basename(d)) for d in offline), offline
    assert all(glob.glob(os.path.join(d, f"run-{run_id}.wandb")) for d in offline)
