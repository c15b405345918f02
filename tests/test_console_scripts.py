"""The console commands of an installed wheel: fcdm-train (under torchrun), fcdm-sample and fcdm-eval, end to end.

A plain `pip install .` copies no train.py or sample.py, so the installed package must carry all of their code. The
wheel is built from this checkout and installed with --no-deps into a fresh virtual environment that has no fcdm
source, no editable hook and no PYTHONPATH. Its third-party packages (torch, numpy, ...) are the ones of the Python
running the tests, reached through one .pth line: installing the dependencies again would copy a second torch, some
GB for a CUDA build. The commands then run from an empty directory, and the test checks that they imported the wheel.
"""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("fcdm-train", "fcdm-sample", "fcdm-eval")
# A 0.05M-parameter FCDM on 8x8 procedural images in pixel space, two steps (see test_train_common.TINY).
TINY_TRAIN = ["--hidden-size", "8", "--depth", "1", "1", "1", "1", "1", "--image-size", "8", "--global-batch-size", "4",
              "--dataset-size", "40", "--num-sampling-steps", "2", "--no-final-eval", "--no-progress",
              "--max-train-steps", "2", "--ckpt-every", "0", "--backend", "torch", "--num-workers", "0",
              "--device", "cpu", "--run-name", "run"]


def run(command, cwd, env, timeout=300):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin directory, environment) of a fresh venv holding only the fcdm wheel built from this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(FCDM_SKIP_CUDA="1", OMP_NUM_THREADS="1")  # the wheel's pure-Python part is what is tested here
    # From a copy without build output: setuptools would pack stale files left in build/lib by an earlier build.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "results", "*.so",
                                                                 "*.egg-info", "__pycache__", ".pytest_cache"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
         root / "dist", source], cwd=root, env=env)
    (wheel,) = (root / "dist").glob("fcdm-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    purelib = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       cwd=root, env=env).stdout.strip())
    # Paths listed in a .pth file join sys.path after the venv's own site-packages, and the .pth files inside them
    # (such as an editable install's hook) are not run, so fcdm can only come from the wheel.
    (purelib / "third_party.pth").write_text("\n".join(site.getsitepackages() + [sysconfig.get_path("purelib")]) + "\n")
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps",
         "--no-index", wheel], cwd=root, env=env)
    return venv / "bin", env, purelib


@pytest.mark.slow
def test_commands_are_installed_and_import_the_wheel(installed, tmp_path):
    bin_dir, env, purelib = installed
    for command in COMMANDS:
        assert (bin_dir / command).is_file(), f"{command} is not installed"
        usage = run([bin_dir / command, "--help"], cwd=tmp_path, env=env).stdout
        assert usage.startswith("usage:") and "--" in usage, usage
    where = run([bin_dir / "python", "-c", "import fcdm, fcdm_kernels; print(fcdm.__file__, fcdm_kernels.__file__)"],
                cwd=tmp_path, env=env).stdout.split()
    assert all(Path(path).is_relative_to(purelib) for path in where), where
    assert not (purelib / "train.py").exists() and not (purelib / "sample.py").exists()
    # Package data: the ImageNet class names travel in the wheel, and `python -m fcdm.export` runs from it.
    labels = run([bin_dir / "python", "-c", "from fcdm.labels import IMAGENET_ID2LABEL as L; print(len(L), L[207])"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert labels == "1000 golden retriever", labels
    assert run([bin_dir / "python", "-m", "fcdm.export", "--help"], cwd=tmp_path, env=env).stdout.startswith("usage:")


@pytest.mark.slow
def test_train_under_torchrun_then_sample_then_evaluate(installed, tmp_path):
    """fcdm-train on 2 processes under torchrun (as `torchrun train.py`), fcdm-sample from its checkpoint, and
    fcdm-eval of the samples against a reference batch, with an untrained Inception (the real weights cannot be
    downloaded here): the numbers are meaningless, the test checks that the three commands work together."""
    bin_dir, env, _ = installed
    python = bin_dir / "python"
    run([python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
         bin_dir / "fcdm-train", *TINY_TRAIN, "--results-dir", tmp_path / "results"], cwd=tmp_path, env=env)
    (checkpoint,) = (tmp_path / "results" / "run" / "checkpoints").glob("*.pt")

    run([bin_dir / "fcdm-sample", "--ckpt", checkpoint, "--num-fid-samples", "4", "--per-proc-batch-size", "2",
         "--steps", "2", "--device", "cpu", "--no-progress", "--sample-dir", tmp_path / "samples", "--run-name", "s"],
        cwd=tmp_path, env=env)
    with np.load(tmp_path / "samples" / "s.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and f["arr_0"].dtype == np.uint8

    from fcdm.eval.features import InceptionFeatureExtractor
    from fcdm.eval.npz import save_batch
    weights = tmp_path / "random-inception.pth"
    torch.save(InceptionFeatureExtractor(device="cpu", random_weights_seed=0).model.state_dict(), weights)
    save_batch(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    printed = run([bin_dir / "fcdm-eval", "--sample-batch", tmp_path / "samples" / "s.npz", "--ref-batch",
                   tmp_path / "ref.npz", "--inception-weights", weights, "--batch-size", "4", "--device", "cpu",
                   "--fid-method", "eigh"], cwd=tmp_path, env=env).stdout
    metrics = json.loads(printed)
    assert metrics["num_samples"] == 4 and metrics["num_reference_images"] == 5
    assert all(np.isfinite(metrics[key]) for key in ("inception_score", "fid", "sfid", "precision", "recall"))
