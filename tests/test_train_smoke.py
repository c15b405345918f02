"""The default run (shortened), official flag names, exact --max-train-steps, outputs, and clear startup errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fcdm.train import resume as ckpt_io
from fcdm.train.config import parse_args

from .test_train_common import TINY, final_checkpoint, read_metrics, run_script, run_train


def test_default_flags_are_the_demo_and_real_data_gets_the_paper_recipe(tmp_path):
    demo = parse_args([])
    assert (demo.data_source, demo.model, demo.image_size, demo.objective) == ("procedural", "FCDM-T", 16, "ddpm")
    assert demo.learn_sigma and demo.ema_warmup
    feats, labels = tmp_path / "f", tmp_path / "l"
    feats.mkdir(), labels.mkdir()
    paper = parse_args(["--feature-path", str(feats), "--label-path", str(labels)])
    assert (paper.model, paper.lr, paper.weight_decay, paper.ema_decay, paper.global_batch_size) == \
        ("FCDM-XL", 1e-4, 0.0, 0.9999, 256)
    assert not paper.ema_warmup and paper.warmup_steps == 0 and paper.image_size == 256


def test_official_flag_names_parse(tmp_path):
    feats, labels = tmp_path / "f", tmp_path / "l"
    feats.mkdir(), labels.mkdir()
    args = parse_args(["--model", "FCDM-S", "--results-dir", "r", "--global-batch-size", "64", "--max-train-steps",
                       "7", "--epochs", "3", "--ckpt-every", "5", "--log-every", "2", "--num-workers", "1",
                       "--global-seed", "3", "--cfg-scale", "1.5", "--feature-path", str(feats), "--label-path",
                       str(labels), "--image-size", "256", "--vae-scaling-factor", "0.2", "--vae-name", "ema",
                       "--num-classes", "1000", "--in-channels", "4", "--num-sampling-steps", "10"])
    assert (args.model, args.global_batch_size, args.max_train_steps, args.epochs, args.ckpt_every) == \
        ("FCDM-S", 64, 7, 3, 5)
    assert (args.global_seed, args.cfg_scale, args.vae_scaling_factor, args.data_source) == (3, 1.5, 0.2, "npy")


@pytest.mark.parametrize("argv, message", [
    (["--global-batch-size", "0"], "must be positive"),
    (["--model", "FCDM-Q"], "invalid choice"),
    (["--data-path", "/nonexistent/imagenet"], "is not a directory"),
    (["--feature-path", "/nonexistent"], "go together"),
    (["--resume", "/nonexistent.pt"], "neither 'auto' nor an existing file"),
    (["--global-batch-size", "6", "--grad-accum", "4"], "not divisible by --grad-accum"),
    (["--zarr-path", "x"], "not supported"),
])
def test_bad_flags_fail_at_once(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_smoke_default_run_writes_checkpoints_metrics_and_a_sample_grid(tmp_path):
    state, run_dir = run_train(tmp_path, "--max-train-steps", "7", "--ckpt-every", "3", "--keep-last", "2")
    assert state.step == 7  # exactly: the official loop leaks a step
    steps = [s for s, _ in ckpt_io.list_checkpoints(os.path.join(run_dir, "checkpoints"))]
    assert steps == [6, 7]  # keep-last 2 pruned step 3
    ckpt = final_checkpoint(run_dir)
    assert {"model", "ema", "opt", "args", "train_state", "rng"} <= ckpt.keys()
    assert ckpt["args"]["model"] == "FCDM-T" and ckpt["args"]["hidden_size"] == 8
    # Every metric of a log line is in metrics.jsonl, and finite.
    logged = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, 8))
    for key in ("loss", "steps_per_s", "img_per_s", "grad_norm", "lr"):
        assert all(np.isfinite(m[key]) for m in logged), key
    assert logged[-1]["loss"] < 2.0
    # The model trained: weights moved away from the init and stayed finite.
    assert not torch.equal(ckpt["model"]["final_layer.conv.weight"], torch.zeros_like(ckpt["model"]["final_layer.conv.weight"]))
    assert ckpt_io.all_finite(ckpt["model"]) and ckpt_io.all_finite(ckpt["ema"])
    grid = np.asarray(Image.open(os.path.join(run_dir, "samples", "0000007.png")))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0
    with open(os.path.join(run_dir, "log.txt")) as f:
        log = f.read()
    for needle in ("parameters", "GFLOPs", "world size 1", "global batch 4", "backend torch", "procedural shapes",
                   "no wrapper", "Checkpoints in"):
        assert needle in log, needle


def test_epochs_bound_the_run(tmp_path):
    state, _ = run_train(tmp_path, "--epochs", "1", "--max-train-steps", "1000", "--dataset-size", "12")
    assert state.step == 3 and state.epoch == 1 and state.batch_in_epoch == 0


def test_script_entry_point_and_clear_runtime_errors(tmp_path):
    ok = run_script([*TINY, "--results-dir", tmp_path, "--max-train-steps", "2"])
    assert ok.returncode == 0, ok.stderr
    assert "done: 2 steps" in ok.stdout + ok.stderr and "Checkpoints in" in ok.stdout + ok.stderr
    # Resuming with a different model is refused before any training, naming the mismatch.
    run = next(d for d in os.listdir(tmp_path))
    ckpt = os.path.join(tmp_path, run, "checkpoints", "0000002.pt")
    bad = run_script([*TINY, "--results-dir", tmp_path, "--max-train-steps", "4", "--resume", ckpt,
                      "--hidden-size", "16"])
    assert bad.returncode == 2 and "cannot resume" in bad.stderr and "hidden_size" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_flow_objective_bf16_autocast_and_grad_checkpointing_train(tmp_path):
    state, run_dir = run_train(tmp_path, "--objective", "flow", "--precision", "bf16", "--grad-checkpointing",
                               "--max-train-steps", "3")
    ckpt = final_checkpoint(run_dir)
    assert state.step == 3 and ckpt["args"]["objective"] == "flow" and not ckpt["args"]["learn_sigma"]
    assert ckpt["model"]["final_layer.conv.weight"].shape[0] == 3          # no sigma channels for flow
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # autocast: master weights stay fp32
    assert ckpt_io.all_finite(ckpt["model"])
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert "precision bf16" in f.read()


def test_ckpt_flag_starts_from_an_official_checkpoint(tmp_path, capsys):
    import argparse
    _, run_dir = run_train(tmp_path / "first", "--max-train-steps", "2")
    ours = final_checkpoint(run_dir)
    official = {k: ours[k] for k in ("model", "ema", "opt")}
    official["args"] = argparse.Namespace(model="FCDM-T", image_size=8)   # as the official trainer pickles it
    path = tmp_path / "0050000.pt"
    torch.save(official, path)
    state, run_dir = run_train(tmp_path / "second", "--ckpt", path, "--max-train-steps", "1", "--lr", "1e-12",
                               "--warmup-steps", "0")
    assert state.step == 1
    assert "official checkpoint" in capsys.readouterr().out
    after = final_checkpoint(run_dir)["model"]
    for name, value in official["model"].items():     # lr 1e-12: the weights are the loaded ones, barely moved
        torch.testing.assert_close(after[name], value, atol=1e-9, rtol=0)


def test_ckpt_flag_takes_the_architecture_from_the_checkpoint(tmp_path):
    """--ckpt (or --resume PATH) without --model builds what the checkpoint was trained as, read through fcdm.load;
    --model given explicitly still wins, and a mismatch is then refused by the resume check."""
    path = tmp_path / "0000001.pt"
    torch.save({"model": {}, "args": {"model": "FCDM-S", "hidden_size": 24, "depth": [1, 2, 1, 2, 1]}}, path)
    args = parse_args(["--ckpt", str(path)])
    assert (args.model, args.hidden_size, args.depth) == ("FCDM-S", 24, [1, 2, 1, 2, 1])
    assert parse_args(["--resume", str(path), "--depth", "1", "1", "1", "1", "1"]).depth == [1, 1, 1, 1, 1]
    explicit = parse_args(["--ckpt", str(path), "--model", "FCDM-T"])
    assert (explicit.model, explicit.hidden_size, explicit.depth) == ("FCDM-T", 32, [1, 1, 2, 1, 1])
    assert parse_args([]).model == "FCDM-T"  # no checkpoint: the data source's default
