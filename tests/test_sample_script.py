"""sample.py end to end on CPU: tiny FCDM + tiny random AutoencoderKL (no download), 1 vs 2 processes, resume."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fcdm.cli import sample

from .test_load import random_fcdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers.models import AutoencoderKL
    root = tmp_path_factory.mktemp("sample_assets")
    torch.manual_seed(0)
    model = random_fcdm(num_classes=5)
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    # The official layout: model, ema, optimizer state and the pickled argparse args.
    torch.save({"model": model.state_dict(), "ema": ema, "opt": {"state": {}}, "args": argparse.Namespace(lr=1e-4)},
               root / "ckpt.pt")
    # A 2x-downsampling VAE with 4 latent channels: 16 px images <-> 8x8 latents.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae")
    return root


def common_args(assets, sample_dir):
    return ["--ckpt", str(assets / "ckpt.pt"), "--model", "FCDM-T", "--num-classes", "5", "--image-size", "16",
            "--vae", str(assets / "vae"), "--num-fid-samples", "5", "--per-proc-batch-size", "2", "--steps", "3",
            "--cfg-scale", "1.5", "--sample-dir", str(sample_dir), "--run-name", "run", "--no-tf32", "--no-progress",
            "--device", "cpu"]


def test_one_and_two_processes_agree_and_resume(assets, tmp_path, capsys, single_thread):
    # single_thread: torchrun workers run one thread each, and the same count keeps CPU results bit-comparable.
    args = common_args(assets, tmp_path / "one") + ["--save-png"]
    sample.main(args)
    out = capsys.readouterr().out
    assert "using its EMA weights" in out
    with np.load(tmp_path / "one" / "run.npz") as f:
        assert list(f.keys()) == ["arr_0"]
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert len(np.unique(images)) > 10 and not np.array_equal(images[0], images[1])
    from PIL import Image
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "run" / "png" / f"{i:06d}.png")), images[i])

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(REPO, "sample.py"), *common_args(assets, tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    with np.load(tmp_path / "two" / "run.npz") as f:
        assert np.array_equal(f["arr_0"], images), "the output must not depend on the number of processes"

    shards = sorted((tmp_path / "one" / "run" / "shards").glob("batch_*.npz"))
    assert [s.name for s in shards] == ["batch_000000.npz", "batch_000001.npz", "batch_000002.npz"]
    mtimes = {s.name: s.stat().st_mtime_ns for s in shards}
    os.remove(shards[1])
    os.remove(tmp_path / "one" / "run.npz")
    sample.main(args)
    assert "2 of 3 batches done" in capsys.readouterr().out
    for s in (shards[0], shards[2]):
        assert s.stat().st_mtime_ns == mtimes[s.name], "finished shards must not be redone"
    assert shards[1].exists()
    with np.load(tmp_path / "one" / "run.npz") as f:
        assert np.array_equal(f["arr_0"], images)

    with pytest.raises(SystemExit):  # same directory, different settings: refuse rather than mix runs
        sample.main(common_args(assets, tmp_path / "one") + ["--cfg-scale", "2.0"])  # the last value wins
    assert "other settings" in capsys.readouterr().err


def test_flow_objective_in_pixel_space(tmp_path, capsys, single_thread):
    torch.manual_seed(1)
    model = random_fcdm(num_classes=3, in_channels=3, learn_sigma=False)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state_dict
    args = ["--ckpt", str(tmp_path / "bare.pt"), "--model", "FCDM-T", "--num-classes", "3", "--in-channels", "3",
            "--image-size", "8", "--vae", "none", "--objective", "flow", "--sampler", "heun", "--steps", "2",
            "--guide-all-channels", "--guidance-interval", "0.5", "1.0", "--labels", "balanced",
            "--num-fid-samples", "3", "--per-proc-batch-size", "3", "--sample-dir", str(tmp_path), "--no-progress",
            "--device", "cpu"]
    sample.main(args)
    out = capsys.readouterr().out
    assert "'bare'" in out and "learn_sigma=False" in out and "4 model evaluations" in out
    npz = [p for p in tmp_path.glob("*.npz")]
    assert len(npz) == 1
    with np.load(npz[0]) as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    with np.load(next(tmp_path.glob("*/shards/batch_000000.npz"))) as f:
        assert f["labels"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "heun"], "does not fit --objective ddpm"),
    (["--save-png", "False"], "unrecognized arguments"),
    (["--guidance-interval", "0.8", "0.2"], "--guidance-interval"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--steps", "0"], "--steps"),
    (["--eta", "0.5"], "--eta applies to --sampler ddim"),
    (["--model", "FCDM-XXL"], "invalid choice"),
])
def test_bad_flags_give_clear_errors(assets, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(common_args(assets, tmp_path) + extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cuda_graph_without_cuda_is_refused(assets, tmp_path, capsys):  # common_args ask for --device cpu
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(common_args(assets, tmp_path) + ["--cuda-graph"])
    assert exit_info.value.code == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_boolean_flags_parse_strictly(assets, tmp_path):
    args = sample.parse_args(common_args(assets, tmp_path) + ["--no-save-png", "--guide-all-channels"])
    assert args.save_png is False and args.guide_all_channels is True and args.sampler == "ddpm"


def test_unreadable_checkpoints(assets, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((assets / "ckpt.pt").read_bytes()[:5000])
    for path in (garbage, truncated):
        argv = common_args(assets, tmp_path)
        argv[1] = str(path)
        with pytest.raises(SystemExit) as exit_info:
            sample.main(argv)
        assert exit_info.value.code == 2 and "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", str(tmp_path / "missing.pt")])
    assert "does not exist" in capsys.readouterr().err


def test_model_flags_default_to_the_checkpoints_training_args(tmp_path, capsys, single_thread):
    """A trainer checkpoint needs only --ckpt: model, custom width/depth, sizes, classes and pixel space come from
    its stored args; a flag given on the command line still wins."""
    torch.manual_seed(2)
    model = random_fcdm(num_classes=4, in_channels=3, hidden_size=16, depth=(1, 1, 1, 1, 1))
    train_args = dict(model="FCDM-T", hidden_size=16, depth=[1, 1, 1, 1, 1], image_size=8, num_classes=4,
                      in_channels=3, objective="ddpm", vae=None, vae_scaling_factor=0.18215)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": train_args}, tmp_path / "t.pt")
    args = sample.parse_args(["--ckpt", str(tmp_path / "t.pt"), "--num-fid-samples", "2", "--steps", "2",
                              "--sample-dir", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert (args.model, args.hidden_size, args.image_size, args.num_classes, args.in_channels, args.vae) == \
        ("FCDM-T", 16, 8, 4, 3, "none")
    sample.main(["--ckpt", str(tmp_path / "t.pt"), "--num-fid-samples", "2", "--per-proc-batch-size", "2",
                 "--steps", "2", "--sample-dir", str(tmp_path), "--no-progress", "--device", "cpu"])
    with np.load(next(tmp_path.glob("*.npz"))) as f:
        assert f["arr_0"].shape == (2, 8, 8, 3)
    assert sample.parse_args(["--ckpt", str(tmp_path / "t.pt"), "--num-classes", "9"]).num_classes == 9
    no_args = tmp_path / "bare.pt"
    torch.save(model.state_dict(), no_args)
    fallback = sample.parse_args(["--ckpt", str(no_args)])
    assert (fallback.model, fallback.image_size, fallback.vae) == ("FCDM-XL", 256, "stabilityai/sd-vae-ft-ema")
