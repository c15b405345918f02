"""fcdm against numbers computed by the official FCDM code (tests/data/official_golden.safetensors).

The NCHW oracle (fcdm/models/official_layout.py) shares the embedders with the model, so comparing the two cannot
catch a bug in those; these golden values can. They were computed once from star-kwon/FCDM in fp32 on a CPU
(tests/data/make_official_golden.py; commit and date in the file's metadata), with every parameter a fixed
non-zero value (tests/golden.py) loaded by its official key, and they cover the timestep embedder (frequencies and
MLP), the label embedder (including the null class), the final layer and a whole tiny model. Each test loads the
same weights into fcdm's module strictly, so key names and shapes are checked too.
"""
import pytest
import torch

import fcdm
from fcdm.models.embeddings import LabelEmbedder, TimestepEmbedder, timestep_frequencies
from fcdm.models.fcdm import FCDM, FinalLayer
from fcdm.models.official_layout import NCHWFCDM
from tests import golden
from tests.numerics import assert_rel_close

# fp32 against fp32: the same maths in another order (channels-last, the fused ops' references) differs slightly.
FP32_TOL = 5e-6  # measured: 4.7e-7 for the whole tiny model, 0 for the embedders and the final layer


@pytest.fixture(scope="module")
def gold():
    tensors, metadata = golden.load()
    assert metadata["source"].startswith("github.com/star-kwon/FCDM@"), metadata
    return tensors, metadata["shapes"]


def loaded(module: torch.nn.Module, name: str, shapes: dict) -> torch.nn.Module:
    """`module` with the golden weights of `name`, loaded strictly by the official keys."""
    theirs = {k: tuple(s) for k, s in shapes[name].items()}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert ours == theirs, f"{name}: state-dict keys or shapes differ from the official module's"
    module.load_state_dict(golden.state_dict(name + ".", shapes[name]), strict=True)
    return module.eval()


def test_stored_inputs_are_the_documented_ones(gold):
    tensors, _ = gold
    for name, value in golden.inputs().items():
        assert torch.equal(tensors[name], value), f"{name} in the golden file is not tests/golden.py's input"


def test_timestep_frequencies_match_official(gold, single_thread):
    tensors, _ = gold
    ours = timestep_frequencies(tensors["t_embedder.t"], 256)
    assert_rel_close(ours, tensors["t_embedder.frequencies"], 1e-6,
                     "timestep frequency embedding vs the official one (layout [cos | sin], max period 10000)")


def test_timestep_embedder_matches_official(gold, single_thread):
    tensors, shapes = gold
    embedder = loaded(TimestepEmbedder(golden.EMBED_WIDTH), "t_embedder", shapes)
    with torch.no_grad():
        out = embedder(tensors["t_embedder.t"])
    assert_rel_close(out, tensors["t_embedder.out"], FP32_TOL,
                     "TimestepEmbedder vs the official one (frequency layout [cos | sin], then Linear-SiLU-Linear)")


def test_label_embedder_and_its_null_class_match_official(gold, single_thread):
    tensors, shapes = gold
    embedder = loaded(LabelEmbedder(golden.NUM_CLASSES, golden.EMBED_WIDTH, 0.1), "y_embedder", shapes)
    labels = tensors["y_embedder.labels"]
    with torch.no_grad():
        assert torch.equal(embedder(labels, train=False), tensors["y_embedder.out"]), "label embedding lookup"
        embedder.dropout_prob = 1.0  # every label dropped, as the official force_drop_ids did
        dropped = embedder(labels, train=True)
    assert torch.equal(dropped, tensors["y_embedder.dropped"]), \
        "a dropped label must embed as the official null class (row num_classes of the table)"


def test_final_layer_matches_official(gold, single_thread):
    tensors, shapes = gold
    layer = loaded(FinalLayer(golden.FINAL_WIDTH, golden.FINAL_WIDTH), "final_layer", shapes)
    with torch.no_grad():
        out = layer(tensors["final_layer.x"].permute(0, 2, 3, 1).contiguous(), tensors["final_layer.c"])
    assert_rel_close(out, tensors["final_layer.out"], FP32_TOL,
                     "FinalLayer vs the official one (LayerNorm, x * (1 + scale) + shift with [shift | scale] "
                     "chunks, conv3x3)")


@pytest.mark.parametrize("model_class", [FCDM, NCHWFCDM], ids=["FCDM", "NCHW_oracle"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tiny_model_with_all_weights_random_matches_official(gold, model_class, dtype, single_thread):
    tensors, shapes = gold
    model = loaded(model_class(**golden.MODEL_CONFIG), "model", shapes).to(dtype)
    x = tensors["model.x"].to(dtype)
    with torch.no_grad(), fcdm.use_backend("torch"):
        out = model(x, tensors["model.t"].to(dtype), tensors["model.y"])
    assert out.dtype == dtype
    # fp64 differs from the fp32 golden values by their own rounding; the timestep frequencies are fp32 in both.
    assert_rel_close(out, tensors["model.out"], FP32_TOL,
                     f"{model_class.__name__} with the official keys vs the official model, one forward")
