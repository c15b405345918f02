"""fcdm.load: a checkpoint to a ready model in one call. The architecture comes from the arguments, then the stored
training args, then the default; learn_sigma and the null label come from the weights; the EMA is preferred."""
import argparse

import pytest
import torch

import fcdm
from fcdm.load import (DEFAULT_CONFIG, DEFAULT_SAMPLING, CheckpointError, load_fcdm, load_model_weights, model_config,
                       read_model_state, sampling_config)


def random_fcdm(**kwargs) -> torch.nn.Module:
    """FCDM-T with every weight random (adaLN-zero init would make a constant predictor)."""
    model = fcdm.FCDM_models["FCDM-T"](**kwargs)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def test_a_trainer_checkpoint_loads_with_its_path_alone(tmp_path):
    torch.manual_seed(0)
    trained = random_fcdm(in_channels=3, num_classes=4, hidden_size=16, depth=(1, 1, 1, 1, 1), learn_sigma=False)
    ema = {k: v + 0.5 for k, v in trained.state_dict().items()}
    stored = dict(model="FCDM-T", hidden_size=16, depth=[1, 1, 1, 1, 1], in_channels=3, num_classes=4, lr=1e-4)
    torch.save({"model": trained.state_dict(), "ema": ema, "args": stored}, tmp_path / "run.pt")

    model, loaded = load_fcdm(str(tmp_path / "run.pt"))
    assert not model.training and loaded.weights == "ema" and loaded.args == stored
    assert loaded.config == dict(model="FCDM-T", hidden_size=16, depth=(1, 1, 1, 1, 1), in_channels=3, num_classes=4,
                                 learn_sigma=False)
    assert loaded.has_null_label and model.num_classes == 4 and not model.learn_sigma
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())

    assert loaded.describe() == "its EMA weights ('ema')"
    model, loaded = load_fcdm(str(tmp_path / "run.pt"), prefer_ema=False)
    assert loaded.weights == "model" and loaded.describe() == "its 'model' weights, EMA weights not preferred"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_an_official_checkpoint_with_a_namespace_and_explicit_sizes(tmp_path):
    torch.manual_seed(1)
    trained = random_fcdm(num_classes=7, class_dropout_prob=0.0)  # no label dropout: no null row
    official = {"model": trained.state_dict(), "ema": trained.state_dict(), "opt": {},
                "args": argparse.Namespace(model="FCDM-T", image_size=256)}
    torch.save(official, tmp_path / "0400000.pt")
    model, loaded = load_fcdm(str(tmp_path / "0400000.pt"), num_classes=7)
    assert loaded.config["model"] == "FCDM-T" and loaded.config["in_channels"] == DEFAULT_CONFIG["in_channels"]
    assert loaded.config["learn_sigma"] and not loaded.has_null_label
    # Label rows that fit neither num_classes nor num_classes + 1 are named, not a shape error deep in PyTorch.
    with pytest.raises(CheckpointError, match="7 label rows; num_classes 5 expects 6"):
        load_fcdm(str(tmp_path / "0400000.pt"), num_classes=5)


def test_architecture_precedence():
    stored = {"model": "FCDM-S", "hidden_size": 48, "depth": [1, 2, 3, 2, 1], "in_channels": 3, "num_classes": 10}
    assert model_config(stored) == dict(model="FCDM-S", hidden_size=48, depth=(1, 2, 3, 2, 1), in_channels=3,
                                        num_classes=10)
    # Another model name: the stored width and depth belong to FCDM-S, not to it.
    assert model_config(stored, model="FCDM-T", num_classes=5) == dict(
        model="FCDM-T", hidden_size=None, depth=None, in_channels=3, num_classes=5)
    assert model_config({}) == {**DEFAULT_CONFIG, "hidden_size": None, "depth": None}
    assert model_config({"model": "not-a-model"})["model"] == DEFAULT_CONFIG["model"]
    with pytest.raises(ValueError, match="model must be one of"):
        model_config({}, model="FCDM-XXL")


def test_a_bare_state_dict_needs_its_architecture_named(tmp_path):
    torch.manual_seed(2)
    torch.save(random_fcdm(num_classes=3).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_fcdm(str(tmp_path / "bare.pt"), num_classes=3)  # taken for the default, FCDM-XL
    model, loaded = load_fcdm(str(tmp_path / "bare.pt"), model="FCDM-T", num_classes=3)
    assert loaded.weights == "bare" and loaded.args == {}
    assert loaded.describe() == "its 'bare' weights, the checkpoint has no EMA weights"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_fcdm(str(tmp_path / "missing.pt"))


def test_how_a_checkpoint_is_sampled():
    trained = {"image_size": 64, "objective": "flow", "vae": "my/vae", "vae_scaling_factor": 0.5, "lr": 1e-4}
    assert sampling_config(trained) == {"image_size": 64, "objective": "flow", "vae": "my/vae", "vae_scaling_factor": 0.5}
    assert sampling_config(trained, image_size=32, vae=None)["image_size"] == 32  # None: not given
    assert sampling_config({"vae": None, "input_size": 8})["vae"] == "none"        # trained in pixel space
    assert sampling_config({}) == DEFAULT_SAMPLING == {"image_size": 256, "objective": "ddpm",
                                                       "vae": "stabilityai/sd-vae-ft-ema", "vae_scaling_factor": 0.18215}
    with pytest.raises(TypeError, match="cfg_scale"):
        sampling_config({}, cfg_scale=1.5)


def test_checkpoint_reader(tmp_path):
    model = random_fcdm(num_classes=5)
    state = model.state_dict()
    ema = {k: v + 1 for k, v in state.items()}
    torch.save({"model": state, "ema": ema}, tmp_path / "both.pt")
    got, which = read_model_state(str(tmp_path / "both.pt"))
    assert which == "ema" and torch.equal(got["x_embedder.weight"], ema["x_embedder.weight"])
    assert read_model_state(str(tmp_path / "both.pt"), prefer_ema=False)[1] == "model"
    torch.save({"model": state}, tmp_path / "model_only.pt")
    assert read_model_state(str(tmp_path / "model_only.pt"))[1] == "model"
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pt")
    fresh = random_fcdm(num_classes=5)
    assert load_model_weights(fresh, str(tmp_path / "wrapped.pt")) == "bare"
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    torch.save({"step": 3, "opt": {}}, tmp_path / "no_weights.pt")
    with pytest.raises(CheckpointError, match="no model weights"):
        read_model_state(str(tmp_path / "no_weights.pt"))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_weights(random_fcdm(num_classes=7), str(tmp_path / "both.pt"))
