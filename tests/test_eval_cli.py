"""`python -m fcdm.eval` end to end, the feature extractor, and the in-training FID hook, on tiny images.

The real Inception weights cannot be downloaded in CI, so the network here is a RANDOMLY INITIALISED Inception-v3
(torch-fidelity's architecture, random weights): its numbers are meaningless; the tests check the plumbing, shapes
and invariants. The hook tests use an even cheaper stand-in feature map, since the hook only needs "some features".
"""
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from fcdm.eval.__main__ import main
from fcdm.eval.evaluate import open_inputs
from fcdm.eval.features import (LOGITS_DIM, POOL_DIM, SPATIAL_DIM, InceptionFeatureExtractor, InceptionWeightsMissing,
                                weights_filename)
from fcdm.eval.fid_hook import InTrainingFID
from fcdm.eval.metrics import feature_statistics
from fcdm.eval.npz import save_batch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("inception_score", "fid", "sfid", "precision", "recall")


@pytest.fixture(scope="module")
def tiny_batches(tmp_path_factory):
    """Two tiny ADM batches of different image sizes (the network resizes to 299 anyway)."""
    folder = tmp_path_factory.mktemp("batches")
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)  # 4: the fewest k=3 precision/recall accepts
    ref = rng.integers(0, 256, (5, 12, 20, 3), dtype=np.uint8)
    save_batch(folder / "samples.npz", samples, arr_1=rng.integers(0, 1000, 4))
    save_batch(folder / "ref.npz", ref)
    return folder, samples, ref


@pytest.fixture(scope="module")
def random_inception():
    """An untrained Inception-v3 feature extractor (random weights, seed 0)."""
    return InceptionFeatureExtractor(device="cpu", random_weights_seed=0)


def test_cli_end_to_end_with_random_untrained_inception(tmp_path, tiny_batches, random_inception):
    """Untrained (random-weight) Inception saved as a weights file: the real file is not available in CI."""
    folder, _, _ = tiny_batches
    weights = tmp_path / "random-inception.pth"
    torch.save(random_inception.model.state_dict(), weights)
    out = tmp_path / "results" / "metrics.json"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, "-m", "fcdm.eval", "--sample-batch", str(folder / "samples.npz"), "--ref-batch",
         str(folder / "ref.npz"), "--out", str(out), "--inception-weights", str(weights), "--batch-size", "4",
         "--device", "cpu", "--fid-method", "eigh"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert printed == json.loads(out.read_text())
    assert all(np.isfinite(printed[key]) for key in METRICS), printed
    assert printed["inception_score"] >= 1.0
    assert printed["fid"] > 0 and printed["sfid"] > 0  # random images of two different sets
    assert 0.0 <= printed["precision"] <= 1.0 and 0.0 <= printed["recall"] <= 1.0
    assert printed["num_samples"] == 4 and printed["num_reference_images"] == 5
    assert printed["inception_weights"] == str(weights)
    assert "does not start with 6726825d" in run.stderr  # a random file is flagged as not the published weights


def test_features_have_adm_shapes_and_do_not_depend_on_batching(tiny_batches, random_inception):
    """Untrained (random-weight) Inception: pool 2048, spatial 17*17*7, logits 1008; batching changes nothing."""
    _, samples, _ = tiny_batches
    captured = []
    handle = random_inception.model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: captured.append(output.clone()))
    try:
        pool, spatial, logits = random_inception(samples[:3])
    finally:
        handle.remove()
    assert pool.shape == (3, POOL_DIM) and spatial.shape == (3, SPATIAL_DIM) and logits.shape == (3, LOGITS_DIM)
    assert (spatial >= 0).all() and spatial.std() > 0  # post-ReLU, and not dead
    # sFID feature: channels 0-6 of TF mixed_6/conv (torch Mixed_6d.branch1x1), flattened in TF's (H, W, C) order.
    full = captured[0]  # (3, 192, 17, 17)
    assert full.shape == (3, 192, 17, 17)
    np.testing.assert_array_equal(spatial.reshape(3, 17, 17, 7).numpy(), full[:, :7].permute(0, 2, 3, 1).numpy())
    # IS logits: pool_3 times the softmax weights WITHOUT the bias, as ADM's softmax/logits/MatMul.
    fc = random_inception.model.fc
    assert fc.bias.abs().max() > 0
    np.testing.assert_allclose(logits.numpy(), (pool @ fc.weight.T).numpy(), rtol=1e-5, atol=1e-5)
    single = random_inception(samples[:1])
    for batched, alone in zip((pool, spatial, logits), single):
        np.testing.assert_allclose(batched[:1].numpy(), alone.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        random_inception(samples.astype(np.float32))


class PixelProjection:
    """Stand-in for Inception in the hook tests: a fixed random projection of the pixels to 6 features (fast)."""

    def __init__(self, height, width, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(height * width * 3, 6, generator=generator, dtype=torch.float64)

    def __call__(self, images):
        images = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))
        assert images.dtype == torch.uint8 and images.dim() == 4, "the hook must hand over uint8 NHWC"
        pool = (images.flatten(1).double() / 255) @ self.weight  # (N, 6)
        return pool, None, None

    def activations(self, batches, **kwargs):
        return types.SimpleNamespace(pool=np.concatenate([self(batch)[0].numpy() for batch in batches]))


def test_features_ignore_a_callers_bf16_autocast(tiny_batches, random_inception):
    """Called from inside a bf16 training step, the extractor still computes in fp32 (else FID moves ~0.4%)."""
    _, samples, _ = tiny_batches
    plain = random_inception(samples)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = random_inception(samples)
    for a, b in zip(plain, inside):
        assert b.dtype == torch.float32 and torch.equal(a, b)


NEW_TF32_API = r"""
import sys, torch
from fcdm.eval.features import _no_tf32
torch.backends.cuda.matmul.fp32_precision = "tf32"   # the newer API: reading the legacy flags now raises
with _no_tf32():
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
assert torch.backends.cuda.matmul.fp32_precision == "tf32"
print("OK")
"""


def test_full_fp32_also_under_the_new_tf32_settings():
    """A process that set TF32 with `fp32_precision` (torch >= 2.9) cannot read the legacy flags; the extractor
    switches the new settings instead. In a subprocess: the setting would otherwise stick to later tests."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision settings")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", NEW_TF32_API], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize("reference", ["images", "precomputed"])
def test_in_training_fid_hook(tmp_path, reference):
    """Generated images equal to the reference give FID 0; other images do not; generate_fn is called in batches."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
    features = PixelProjection(6, 5)
    if reference == "images":
        save_batch(tmp_path / "ref.npz", images)
    else:
        stats = feature_statistics(features(images)[0].numpy())
        np.savez(tmp_path / "ref.npz", mu=stats.mu, sigma=stats.sigma)
    fid_eval = InTrainingFID(tmp_path / "ref.npz", num_images=11, batch_size=4, extractor=features)
    served = []

    def generate(count):  # stands in for "sample `count` images from the EMA model"
        start = sum(served)
        served.append(count)
        return torch.from_numpy(images[start:start + count])

    fid = fid_eval(generate)
    assert served == [4, 4, 3]
    assert np.isfinite(fid) and abs(fid) < 1e-9 * np.trace(fid_eval.reference.sigma)
    other = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    assert fid_eval(lambda count: other[:count]) > 0.1 * np.trace(fid_eval.reference.sigma)
    with pytest.raises(ValueError, match="expected 4 images"):
        fid_eval(lambda count: images[:1])


def test_in_training_fid_fails_at_construction_not_at_first_evaluation(tmp_path, tiny_batches, monkeypatch):
    folder, _, _ = tiny_batches
    stand_in = PixelProjection(16, 16)
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(5))
    with pytest.raises(ValueError, match="neither mu/sigma nor images"):
        InTrainingFID(tmp_path / "labels.npz", extractor=stand_in)
    with pytest.raises(ValueError, match="num_images"):
        InTrainingFID(folder / "ref.npz", num_images=1, extractor=stand_in)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    with pytest.raises(InceptionWeightsMissing, match=weights_filename()):
        InTrainingFID(folder / "ref.npz")


def test_cli_missing_weights_says_which_file_and_where(tmp_path, tiny_batches, monkeypatch, capsys):
    folder, _, _ = tiny_batches
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--sample-batch", str(folder / "samples.npz"), "--ref-batch", str(folder / "ref.npz")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    expected_cache = os.path.join(str(tmp_path / "torch-home"), "hub", "checkpoints", weights_filename())
    assert weights_filename() in message and "https://" in message and expected_cache in message


@pytest.mark.parametrize("change, match", [
    (["--batch-size", "0"], "--batch-size"),
    (["--inception-weights", "/nonexistent/weights.pth"], "inception_weights: no such file"),
    (["--sample-batch", "FLOAT"], "--sample-batch: 'arr_0' .* dtype float32"),
    (["--fid-method", "svd"], "--fid-method"),
    (["--device", "not-a-device"], "--device"),
])
def test_cli_rejects_bad_arguments(tmp_path, tiny_batches, monkeypatch, capsys, change, match):
    folder, _, _ = tiny_batches
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights to fall back on
    np.savez(tmp_path / "float.npz", arr_0=np.random.default_rng(1).random((5, 8, 8, 3), dtype=np.float32))
    args = {"--sample-batch": str(folder / "samples.npz"), "--ref-batch": str(folder / "ref.npz")}
    args.update(zip(change[::2], change[1::2]))
    if args["--sample-batch"] == "FLOAT":
        args["--sample-batch"] = str(tmp_path / "float.npz")
    with pytest.raises(SystemExit) as exit_info:
        main([item for pair in args.items() for item in pair])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_open_inputs_validates_before_any_network_is_built(tmp_path, tiny_batches):
    folder, samples, _ = tiny_batches
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 4))
    np.savez(tmp_path / "stats_only.npz", mu=a.mean(0), sigma=np.cov(a, rowvar=False), mu_s=a.mean(0)[:2],
             sigma_s=np.cov(a[:, :2], rowvar=False))
    inputs = open_inputs(folder / "samples.npz", tmp_path / "stats_only.npz")  # FID/sFID only: allowed
    assert inputs.ref_images is None and inputs.ref_stats["spatial"].mu.shape == (2,)

    np.savez(tmp_path / "pool_only.npz", mu=a.mean(0), sigma=np.cov(a, rowvar=False))
    with pytest.raises(ValueError, match="--ref-batch: .*neither images"):
        open_inputs(folder / "samples.npz", tmp_path / "pool_only.npz")
    save_batch(tmp_path / "three.npz", samples[:3])
    with pytest.raises(ValueError, match="--sample-batch: 3 images"):
        open_inputs(tmp_path / "three.npz", folder / "ref.npz")
    with pytest.raises(ValueError, match="--ref-batch: 3 images"):
        open_inputs(folder / "samples.npz", tmp_path / "three.npz")
