"""The --eval-every hook (pluggable evaluator, best.pt) and the demo-quality pieces (classifier, Frechet distance)."""
import os

import numpy as np
import pytest
import torch

import fcdm.train.loop as loop
from fcdm.eval import demo_quality
from fcdm.train import resume as ckpt_io

from .test_train_common import read_metrics, run_train


class ScriptedEvaluator:
    """Returns a fixed sequence of scores, lower is better, and records which models it saw."""

    metric = "score"
    lower_is_better = True

    def __init__(self, values):
        self.values, self.calls = list(values), []

    def __call__(self, model):
        assert not model.training  # the EMA copy, always in eval mode
        self.calls.append(sum(p.sum().item() for p in model.parameters()))
        return {"score": self.values[len(self.calls) - 1]}


def test_eval_every_calls_the_evaluator_on_the_ema_and_keeps_best(tmp_path, monkeypatch):
    evaluator = ScriptedEvaluator([3.0, 1.0, 2.0])
    monkeypatch.setattr(loop, "build_evaluator", lambda *a, **k: evaluator)
    state, run_dir = run_train(tmp_path, "--max-train-steps", "6", "--eval-every", "2")
    assert len(evaluator.calls) == 3 and len(set(evaluator.calls)) == 3  # steps 2, 4 and the final step 6
    assert (state.best_metric, state.best_step) == (1.0, 4)
    best = ckpt_io.load(os.path.join(run_dir, "checkpoints", "best.pt"))
    assert best["train_state"]["step"] == 4 and best["train_state"]["best_metric"] == 1.0
    assert [m["eval/score"] for m in read_metrics(run_dir) if "eval/score" in m] == [3.0, 1.0, 2.0]
    assert [s for s, _ in ckpt_io.list_checkpoints(os.path.join(run_dir, "checkpoints"))][-1] == 6


def test_eval_every_on_real_data_needs_a_reference(tmp_path):
    feats, labels = tmp_path / "f", tmp_path / "l"
    feats.mkdir(), labels.mkdir()
    for i in range(4):
        np.save(feats / f"{i}.npy", np.random.randn(4, 8, 8).astype(np.float32))
        np.save(labels / f"{i}.npy", np.array([i % 2]))
    with pytest.raises(ValueError, match="--eval-every on real data needs --fid-ref"):
        run_train(tmp_path, "--feature-path", feats, "--label-path", labels, "--num-classes", "2",
                  "--eval-every", "1", "--max-train-steps", "1")


def test_demo_classifier_is_deterministic_cached_and_accurate(tmp_path):
    a = demo_quality.train_classifier(8, steps=60, cache_dir=str(tmp_path / "a"), log=lambda m: None)
    b = demo_quality.train_classifier(8, steps=60, cache_dir=str(tmp_path / "b"), log=lambda m: None)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert len(os.listdir(tmp_path / "a")) == 1
    messages = []
    demo_quality.train_classifier(8, steps=60, cache_dir=str(tmp_path / "a"), log=messages.append)
    assert messages == []  # loaded from the cache
    x, y = demo_quality._real_images(8, 200, seed=5)
    with torch.no_grad():
        accuracy = (a(x)[1].argmax(1) == y).float().mean().item()
    assert accuracy > 0.3  # 60 steps at 8 px: well above chance (0.1); the demo's 500 steps at 16 px reach ~0.99


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((400, 6))
    assert abs(demo_quality.frechet_distance(feats, feats)) < 1e-6
    shifted = demo_quality.frechet_distance(feats, feats + 2.0)
    assert shifted == pytest.approx(6 * 4.0, rel=1e-6)   # ||mu1 - mu2||^2 with equal covariances


def test_fid_ref_evaluator_runs_end_to_end_with_a_random_inception(tmp_path, monkeypatch):
    """The --fid-ref adapter to fcdm.eval; the Inception weights file is not available here, so its network is
    randomly initialised (the number is meaningless, the plumbing is what is tested)."""
    features = pytest.importorskip("fcdm.eval.features")
    npz = pytest.importorskip("fcdm.eval.npz")
    try:
        features._inception_module()
    except ImportError as e:
        pytest.skip(str(e))
    real = features.InceptionFeatureExtractor
    monkeypatch.setattr(features, "InceptionFeatureExtractor",
                        lambda device=None, **kw: real(device=device, random_weights_seed=0))
    ref = tmp_path / "ref.npz"
    npz.save_batch(str(ref), np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    state, run_dir = run_train(tmp_path, "--fid-ref", ref, "--eval-samples", "12", "--max-train-steps", "2",
                               "--eval-every", "1")
    fids = [m["eval/fid"] for m in read_metrics(run_dir) if "eval/fid" in m]
    assert len(fids) == 2 and all(np.isfinite(f) and f >= 0 for f in fids)
    assert state.best_metric == min(fids)
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "best.pt"))


def test_fid_split_over_processes_equals_one_process(tmp_path, monkeypatch):
    """Each of 3 processes generates every third chunk; the gathered features, put back in chunk order, give the
    same FID as one process generating everything (chunk k's labels and noise depend on k alone)."""
    import argparse

    from fcdm import distributed
    from fcdm.eval.fid_hook import InTrainingFID
    from fcdm.eval.npz import save_batch
    from fcdm.models import FCDM_models
    from fcdm.objectives import build_objective
    from fcdm.train import evaluation

    from .test_eval_cli import PixelProjection

    cpu = torch.device("cpu")
    save_batch(str(tmp_path / "ref.npz"), np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    evaluator = evaluation.InceptionFID.__new__(evaluation.InceptionFID)  # the real one loads Inception weights
    evaluator.args = argparse.Namespace(num_classes=5, global_seed=3, in_channels=3, input_size=8, sampler="ddpm",
                                        num_sampling_steps=2, cfg_scale=1.0, vae_scaling_factor=1.0, fsdp=False)
    evaluator.objective, evaluator.device, evaluator.vae, evaluator.amp = build_objective("ddpm"), cpu, None, None
    evaluator.fid = InTrainingFID(tmp_path / "ref.npz", num_images=10, batch_size=3, extractor=PixelProjection(8, 8))
    torch.manual_seed(0)
    model = FCDM_models["FCDM-T"](in_channels=3, num_classes=5).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    single = evaluator(model)["fid"]

    class Gathered(Exception):
        pass

    local = {}

    def stop_at_gather(rank):
        def gather(features):
            local[rank] = features
            raise Gathered
        return gather

    for rank in range(3):  # each rank's share, stopped at the gather
        monkeypatch.setattr(distributed, "info", lambda r=rank: distributed.DistInfo(r, 3, r, cpu))
        monkeypatch.setattr(distributed, "all_gather_object", stop_at_gather(rank))
        with pytest.raises(Gathered):
            evaluator(model)
    assert [len(local[r]) for r in range(3)] == [3 + 1, 3, 3]  # chunks (0, 3), (1), (2) of sizes 3, 3, 3, 1
    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(1, 3, 1, cpu))
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [local[0], obj, local[2]])
    split = evaluator(model)["fid"]
    assert np.isfinite(single) and split == pytest.approx(single, rel=1e-9)
