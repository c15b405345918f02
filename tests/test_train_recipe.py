"""What a user coming from DiT or the official code expects of the flags: --vae spellings and defaults, a --help that
shows every real default, the optimiser the benchmarks measure, milestone checkpoints and the run's args.json."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.model import make_train_step
from benchmarks import memory
from fcdm.optim import use_fused_adamw
from fcdm.train import resume as ckpt_io
from fcdm.train.builders import build_training_optimizer
from fcdm.train.config import SOURCE_DEFAULTS, build_parser, parse_args
from fcdm.vae import SD_VAE

from .test_train_common import run_script, run_train


@pytest.fixture
def dirs(tmp_path):
    """An (empty) ImageFolder root and an official .npy layout: enough for parse_args."""
    for d in ("images", "feats", "labels"):
        (tmp_path / d).mkdir()
    return {k: str(tmp_path / k) for k in ("images", "feats", "labels")}


def test_vae_spellings_and_defaults(dirs):
    images = ["--data-path", dirs["images"]]
    dit = parse_args(images)  # DiT's default: latents through the ema VAE
    assert (dit.vae, dit.data_source, dit.random_flip) == (SD_VAE, "imagefolder_latent", True)
    assert parse_args([*images, "--vae", "mse"]).vae == "stabilityai/sd-vae-ft-mse"
    pixels = parse_args([*images, "--vae", "None", "--no-random-flip"])
    assert (pixels.vae, pixels.data_source, pixels.random_flip) == (None, "imagefolder", False)
    assert parse_args([*images, "--vae", "/some/dir"]).vae == "/some/dir"
    latents = parse_args(["--feature-path", dirs["feats"], "--label-path", dirs["labels"]])
    assert latents.vae is None and latents.data_source == "npy"  # decoded grids only when asked for
    assert parse_args([]).vae is None                              # the demo stays offline


def test_vae_on_the_demo_data_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--vae", "ema"])
    assert "--vae ema: the built-in demo data is in pixel space" in capsys.readouterr().err


def test_a_vae_that_cannot_load_names_the_flag_the_repository_and_the_ways_out(tmp_path):
    """DiT's command line, offline and with an empty hub cache: a one-line error, not a traceback."""
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "cat" / "0.png")
    res = run_script(["--data-path", tmp_path / "images", "--results-dir", tmp_path, "--max-train-steps", "1",
                      "--device", "cpu"], timeout=240,
                     env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "FCDM_DEBUG": ""})
    assert res.returncode == 2, res.stderr[-2000:]
    message = res.stderr.strip().splitlines()[-1]
    for part in ("train.py: error: --vae", repr(SD_VAE), "--vae <local dir>", "--vae none"):
        assert part in message, message


def test_help_shows_every_default_and_both_data_dependent_ones():
    text = build_parser().format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
        if action.dest in SOURCE_DEFAULTS:
            assert "for the demo," in action.help and "with real data" in action.help, action.option_strings
    for shown in ("(default: 0.001 for the demo, 0.0001 with real data)", "(default: FCDM-T for the demo, FCDM-XL "
                  "with real data)", "(default: 1000 for the demo, 50000 with real data)", "(default: 3)"):
        assert shown in flat, shown


def test_trainer_and_memory_benchmark_build_the_same_optimizer(dirs):
    """The memory prediction is for a CUDA step; the trainer's optimiser on CUDA must be that one."""
    assert use_fused_adamw(torch.device("cuda")) and use_fused_adamw("cuda:1")
    assert not use_fused_adamw(torch.device("cpu")) and not use_fused_adamw("meta")
    paper = parse_args(["--feature-path", dirs["feats"], "--label-path", dirs["labels"]])
    model = torch.nn.Linear(3, 2)
    trainer = build_training_optimizer(model, paper, torch.device("cuda"))
    bench = make_train_step(model, 1, 4, torch.device("cpu"), "fp32",
                            fused_optimizer=use_fused_adamw("cuda")).optimizer
    assert type(trainer) is type(bench) is torch.optim.AdamW
    assert trainer.defaults == bench.defaults and trainer.defaults["fused"] is True
    assert "use_fused_adamw(\"cuda\")" in open(memory.__file__).read()  # what predict_train_step passes
    assert build_training_optimizer(model, paper, torch.device("cpu")).defaults["fused"] is False


def test_keep_every_keeps_milestones_and_keep_last_counts_the_others(tmp_path):
    for step in range(1, 11):
        ckpt_io.atomic_save({"model": {}, "ema": {}}, str(tmp_path / ckpt_io.checkpoint_name(step)))
    ckpt_io.prune(str(tmp_path), keep_last=2, keep_every=4)
    assert [s for s, _ in ckpt_io.list_checkpoints(str(tmp_path))] == [4, 8, 9, 10]
    ckpt_io.prune(str(tmp_path), keep_last=1, keep_every=0)
    assert [s for s, _ in ckpt_io.list_checkpoints(str(tmp_path))] == [10]


def test_a_run_keeps_milestones_and_records_its_args(tmp_path, dirs):
    assert parse_args(["--feature-path", dirs["feats"], "--label-path", dirs["labels"]]).keep_every == 50_000
    _, run_dir = run_train(tmp_path, "--max-train-steps", "7", "--ckpt-every", "1", "--keep-every", "3",
                           "--keep-last", "1")
    assert [s for s, _ in ckpt_io.list_checkpoints(os.path.join(run_dir, "checkpoints"))] == [3, 6, 7]
    with open(os.path.join(run_dir, "args.json")) as f:
        record = json.load(f)
    assert record["command"][-2:] == ["--keep-last", "1"] and record["world_size"] == 1
    config = record["config"]  # resolved: what the builders derived is there too
    assert (config["keep_every"], config["input_size"], config["in_channels"], config["backend"]) == (3, 8, 3, "torch")
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]
