"""What the trainer computes, not only that it computes it repeatably.

The other trainer tests compare runs of the same code with each other (resume, DDP, FSDP2), which proves determinism
but would pass with an EMA one step stale or a wrong null label. Here each property is checked against what it
should be, computed independently: the EMA after every step, by hand; the labels the objective sees, from the
dataset's own labels; the data order, as a permutation per epoch; the loss, falling. (That a resumed run logs the
straight run's loss at every step is in test_train_resume.py.)
"""
import os

import pytest
import torch

from fcdm.data.procedural import ProceduralShapes
from fcdm.train import resume as ckpt_io
from fcdm.train import loop
from fcdm.train.builders import build_dataset, build_model

from .test_train_common import read_metrics, run_train, tiny_args

# 40 images, batches of 4: 10 steps per epoch, two epochs; a checkpoint after every step; half the labels dropped.
RUN_FLAGS = ["--epochs", "2", "--max-train-steps", "20", "--ema-decay", "0", "--no-ema-warmup", "--ckpt-every", "1",
             "--keep-last", "0", "--class-dropout-prob", "0.5", "--lr", "3e-3"]


def checkpoints(run_dir) -> dict[int, dict]:
    return {step: ckpt_io.load(path) for step, path in ckpt_io.list_checkpoints(os.path.join(run_dir, "checkpoints"))}


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """One run of RUN_FLAGS, recording the dataset items fetched and the labels the objective is given, in order."""
    fetched, labels_seen = [], []
    get_item = ProceduralShapes.__getitem__

    def recording_get_item(self, key):
        fetched.append(key[0] if isinstance(key, tuple) else key)
        return get_item(self, key)

    def recording_objective(name):
        objective = build_objective(name)
        losses = objective.training_losses

        def training_losses(model, x, t, model_kwargs=None, noise=None):
            labels_seen.append(model_kwargs["y"].clone())
            return losses(model, x, t, model_kwargs=model_kwargs, noise=noise)
        objective.training_losses = training_losses
        return objective

    build_objective = loop.build_objective
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProceduralShapes, "__getitem__", recording_get_item)
        mp.setattr(loop, "build_objective", recording_objective)
        state, run_dir = run_train(tmp_path_factory.mktemp("semantics"), *RUN_FLAGS)
    assert state.step == 20
    return dict(run_dir=run_dir, fetched=fetched, labels=torch.cat(labels_seen).tolist())


def test_ema_with_decay_0_equals_the_model_after_every_step(recorded_run):
    saved = checkpoints(recorded_run["run_dir"])
    assert sorted(saved) == list(range(1, 21))
    for step, ckpt in saved.items():
        for key, weight in ckpt["model"].items():
            assert torch.equal(ckpt["ema"][key], weight), (
                f"step {step}: with decay 0 the EMA must equal the model after the optimiser step, but {key} differs "
                f"by {(ckpt['ema'][key] - weight).abs().max():.3g} (is the EMA updated before the step?)")


def test_ema_with_decay_d_is_d_old_plus_1_minus_d_new(tmp_path):
    decay = 0.75
    flags = ["--max-train-steps", "2", "--ema-decay", str(decay), "--no-ema-warmup", "--ckpt-every", "1",
             "--keep-last", "0"]
    _, run_dir = run_train(tmp_path, *flags)
    saved = checkpoints(run_dir)
    # Before step 1 the EMA is the initial model, which the trainer builds right after seeding with --global-seed.
    args = tiny_args(tmp_path, *flags)
    build_dataset(args)  # sets the model's input size, channels and classes from the data
    torch.manual_seed(args.global_seed)
    initial = build_model(args).state_dict()
    before = {0: initial, 1: saved[1]["ema"]}
    for step in (1, 2):
        for key, new in saved[step]["model"].items():
            expected = decay * before[step - 1][key].double() + (1 - decay) * new.double()
            torch.testing.assert_close(saved[step]["ema"][key].double(), expected, rtol=1e-6, atol=1e-8, msg=lambda m: (
                f"step {step}, {key}: EMA != {decay} * EMA before + {1 - decay} * model after the step: {m}"))
        moved = any(not torch.equal(saved[step]["model"][k], before[step - 1][k]) for k in initial)
        assert moved, f"step {step} did not change the model; the EMA check would not exercise anything"


def test_every_epoch_visits_each_item_once_in_a_new_order(recorded_run):
    fetched = recorded_run["fetched"]
    assert len(fetched) == 80  # 2 epochs of 40
    first, second = fetched[:40], fetched[40:]
    assert sorted(first) == list(range(40)), "epoch 1 is not a permutation of the dataset"
    assert sorted(second) == list(range(40)), "epoch 2 is not a permutation of the dataset"
    assert first != second, "both epochs saw the data in the same order"


def test_label_dropout_gives_the_null_class_at_about_the_requested_rate(recorded_run):
    """Labels reach the objective as the dataset's own label or, when dropped for CFG, as num_classes exactly."""
    dataset, null = ProceduralShapes(8, 40), ProceduralShapes.num_classes
    true = [dataset.label(i) for i in recorded_run["fetched"]]
    seen = recorded_run["labels"]
    assert len(seen) == len(true) == 80
    changed = [(t, s) for t, s in zip(true, seen) if t != s]
    assert all(s == null for _, s in changed), f"dropped labels must be the null class {null}: {changed}"
    dropped = sum(s == null for s in seen)
    assert 24 <= dropped <= 56, f"{dropped} of 80 labels dropped at --class-dropout-prob 0.5"


def test_loss_falls(recorded_run):
    losses = [m["loss"] for m in read_metrics(recorded_run["run_dir"]) if "loss" in m]
    assert len(losses) == 20
    early, late = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert late < 0.85 * early, f"mean loss of the last 5 steps {late:.3f} vs the first 5 {early:.3f}: not learning"


def test_logged_lr_follows_the_warmup(recorded_run):
    lrs = [m["lr"] for m in read_metrics(recorded_run["run_dir"]) if "lr" in m]
    assert lrs[:3] == pytest.approx([1.5e-3, 3e-3, 3e-3]), "--warmup-steps 2 at --lr 3e-3"
