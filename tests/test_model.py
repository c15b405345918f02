"""The channels-last fused-op FCDM against the naive NCHW oracle, official key names, sizes and the model API."""
import pytest
import torch

import fcdm
from fcdm.models import FCDM, FCDM_CONFIGS, FCDM_models
from fcdm.models.flops import count_macs, model_macs
from fcdm.models.official_layout import NCHWFCDM
from tests.numerics import assert_rel_close

# A small but complete config: every level, two blocks where a level repeats, odd channel counts (C=12 -> J=36).
SMALL = dict(hidden_size=12, depth=(1, 2, 2, 2, 1), in_channels=4, num_classes=7)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace the zero adaLN / GRN init with random values so every path of the block is exercised."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def make_pair(dtype=torch.float64, **overrides):
    cfg = {**SMALL, **overrides}
    oracle = randomize_(NCHWFCDM(**cfg)).to(dtype)
    model = FCDM(**cfg).to(dtype)
    model.load_state_dict(oracle.state_dict(), strict=True)
    return oracle, model


def inputs(batch=3, size=8, dtype=torch.float64, num_classes=7):
    x = torch.randn(batch, 4, size, size, dtype=dtype)
    t = torch.rand(batch) * 999
    y = torch.randint(0, num_classes + 1, (batch,))  # includes the null label
    return x, t, y


@pytest.mark.parametrize("size", [8, 12])  # 12: levels at 12, 6, 3 pixels (odd at the bottom)
def test_matches_naive_nchw_oracle_fp64_forward_and_grads(size):
    oracle, model = make_pair()
    oracle.eval(), model.eval()
    x, t, y = inputs(size=size)
    xo, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fcdm.use_backend("torch"):
        out_m = model(xm, t, y)
    out_o = oracle(xo, t, y)
    assert out_m.shape == (3, 8, size, size)
    assert_rel_close(out_m, out_o, 1e-10, "forward")
    g = torch.randn_like(out_o)
    out_o.backward(g)
    out_m.backward(g)
    assert_rel_close(xm.grad, xo.grad, 1e-10, "dx")
    grads_o = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert_rel_close(p.grad, grads_o[name].grad, 1e-10, f"d{name}")


def test_state_dict_keys_shapes_and_order_match_official_layout():
    oracle, model = make_pair()
    ko, km = oracle.state_dict(), model.state_dict()
    assert list(ko.keys()) == list(km.keys())
    assert all(ko[k].shape == km[k].shape for k in ko)
    expected_block_keys = ["dwconv.weight", "dwconv.bias", "pwconv1.weight", "pwconv1.bias", "grn.gamma", "grn.beta",
                           "pwconv2.weight", "pwconv2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    assert [k[len("latent.0."):] for k in km if k.startswith("latent.0.")] == expected_block_keys
    for key in ("y_embedder_1.embedding_table.weight", "t_embedder_3.mlp.2.weight", "down1_2.conv.0.weight",
                "up3_2.conv.0.weight", "reduce_chans_1.weight", "final_layer.adaLN_modulation.1.weight",
                "final_layer.conv.weight", "output_layer.bias", "x_embedder.weight"):
        assert key in km, key
    assert km["y_embedder_1.embedding_table.weight"].shape == (SMALL["num_classes"] + 1, 12)


def test_strict_load_rejects_missing_and_unexpected_keys():
    oracle, model = make_pair()
    sd = oracle.state_dict()
    sd.pop("latent.0.grn.gamma")
    with pytest.raises(RuntimeError, match="grn.gamma"):
        model.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("name,millions", [("FCDM-S", 32.7), ("FCDM-B", 127.7), ("FCDM-L", 504.5), ("FCDM-XL", 698.8)])
def test_parameter_counts_match_paper(name, millions):
    with torch.device("meta"):
        model = FCDM_models[name]()
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == millions


@pytest.mark.parametrize("name,gmacs", [("FCDM-S", 3.1), ("FCDM-B", 12.1), ("FCDM-L", 48.2), ("FCDM-XL", 64.5)])
def test_gmacs_match_paper(name, gmacs):
    C, depth = FCDM_CONFIGS[name]
    assert round(count_macs(C, depth, 32) / 1e9, 1) == gmacs


def test_mac_count_equals_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    oracle, model = make_pair(dtype=torch.float32)
    x, t, y = inputs(batch=1, size=16, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        oracle(x, t, y)
    assert counter.get_total_flops() == 2 * model_macs(model, 16)


def test_official_initialisation():
    torch.manual_seed(1)
    model = FCDM(**SMALL)
    for block in model.all_blocks():
        assert block.adaLN_modulation[1].weight.abs().sum() == 0 and block.adaLN_modulation[1].bias.abs().sum() == 0
        assert block.pwconv1.bias.abs().sum() == 0 and block.dwconv.weight.abs().sum() > 0
    assert model.final_layer.conv.weight.abs().sum() == 0
    assert 0.015 < model.y_embedder_2.embedding_table.weight.std().item() < 0.025
    assert 0.015 < model.t_embedder_1.mlp[0].weight.std().item() < 0.025
    x, t, y = inputs(dtype=torch.float32)
    assert model(x, t, y).abs().max() == 0  # adaLN-Zero: the untrained network predicts exactly zero


def test_forward_with_cfg_guides_first_three_channels_by_default():
    _, model = make_pair()
    model.eval()
    x, t, _ = inputs(batch=4)
    y = torch.tensor([1, 2, 7, 7])  # second half: the null label
    scale = 2.5
    out = model.forward_with_cfg(x, t, y, scale)
    raw = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = raw[:2], raw[2:]
    guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    assert_rel_close(out[:2, :3], guided, 1e-12, "guided eps")
    assert_rel_close(out[2:, :3], guided, 1e-12, "guided eps, second half")
    assert torch.equal(out[:, 3:], raw[:, 3:])  # channel 3 and the variance channels are untouched
    full = model.forward_with_cfg(x, t, y, scale, guide_all_channels=True)
    assert_rel_close(full[:2, :4], uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4]), 1e-12, "all channels")


def test_gradient_checkpointing_switch_gives_identical_gradients():
    _, model = make_pair()
    assert FCDM(**SMALL).grad_checkpointing is False
    x, t, y = inputs()
    model.eval()
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_label_dropout_uses_null_class_in_training_only():
    model = FCDM(**SMALL, class_dropout_prob=1.0)
    y = torch.tensor([0, 3, 5])
    table = model.y_embedder_1.embedding_table.weight
    model.train()
    assert torch.equal(model.y_embedder_1(y, train=True), table[[7, 7, 7]])
    model.eval()
    assert torch.equal(model.y_embedder_1(y, train=False), table[y])
    with pytest.raises(ValueError, match="label_dropout"):
        FCDM(**SMALL, label_dropout="sometimes")
    no_null = FCDM(**SMALL, class_dropout_prob=0.0)
    assert no_null.y_embedder_1.embedding_table.num_embeddings == SMALL["num_classes"]  # as the official code


def test_bad_inputs_give_clear_errors():
    model = FCDM(**SMALL)
    t, y = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(2, 4, 10, 10), t, y)
    with pytest.raises(ValueError, match=r"x must be \(N, 4, H, W\)"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="t and y"):
        model(torch.randn(2, 4, 8, 8), torch.zeros(3), y)
    with pytest.raises(ValueError, match="depth"):
        FCDM(hidden_size=8, depth=(1, 1, 1))


def test_bf16_autocast_forward_close_to_fp32():
    oracle, model = make_pair(dtype=torch.float32)
    model.eval()
    x, t, y = inputs(dtype=torch.float32)
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert torch.isfinite(out).all()
    assert_rel_close(out.float(), ref, 5e-2, "bf16 autocast forward")  # whole network in bf16: ~1e-2 expected


def test_zoo_command_prints_paper_numbers():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "fcdm.models"], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("FCDM-")}
    assert rows["FCDM-XL"][-2:] == ["698.8M", "64.5"] and rows["FCDM-S"][-2:] == ["32.7M", "3.1"]
    assert rows["FCDM-B"][-2:] == ["127.7M", "12.1"] and rows["FCDM-L"][-2:] == ["504.5M", "48.2"]


def test_model_traces_as_one_graph_under_torch_compile():
    """Backend dispatch must not break the graph: fullgraph=True raises on any graph break."""
    _, model = make_pair(dtype=torch.float32)
    model.eval()  # no random label dropout, so the two runs see the same labels
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t, y = inputs(dtype=torch.float32)
    with fcdm.use_backend("torch"):
        out = compiled(x, t, y)
        out.square().sum().backward()
    assert_rel_close(out, model(x, t, y), 1e-6, "compiled forward")


def test_external_label_dropout_leaves_labels_to_the_caller():
    model = FCDM(**SMALL, class_dropout_prob=0.9, label_dropout="external").train()
    y = torch.arange(7)
    table = model.y_embedder_3.embedding_table.weight
    captured = []
    model.y_embedder_3.embedding_table.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    model.condition(torch.zeros(7), y)
    assert torch.equal(captured[0], y) and table.shape[0] == SMALL["num_classes"] + 1


@pytest.mark.parametrize("mode", ["shared", "per_level"])
def test_label_dropout_is_shared_across_levels_unless_official_mode(mode):
    model = FCDM(**SMALL, class_dropout_prob=0.5, label_dropout=mode).train()
    y = torch.arange(7).repeat(40)  # 280 labels, none of them null
    captured = []
    for lv in (1, 2, 3):
        table = getattr(model, f"y_embedder_{lv}").embedding_table
        table.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    model.condition(torch.zeros(len(y)), y)
    null = [labels == SMALL["num_classes"] for labels in captured]
    assert 0.3 < null[0].float().mean() < 0.7
    if mode == "shared":
        assert torch.equal(null[0], null[1]) and torch.equal(null[0], null[2])
    else:  # independent draws per level, as the official code does
        assert not torch.equal(null[0], null[1])


def test_unknown_constructor_arguments_warn_but_input_size_is_accepted():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FCDM(**SMALL, input_size=32)  # DiT-style call sites pass it
    with pytest.warns(UserWarning, match="hidden_szie"):
        FCDM(**SMALL, hidden_szie=4)
