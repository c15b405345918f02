"""fcdm_kernels/triton/block.py, the whole FCDM block on the Triton backend, and whole models on it.

* As one op (`convnext_block`, which saves for its backward only x, pre and per-sample vectors): forward and all
  twelve gradients against the fp64 reference, what it saves (and what frozen weights spare), opcheck, and the
  composition an explicitly requested cuda backend gets instead.
* As the two public ops composed: against the fp64 reference, and under torch.compile without graph breaks.
* Whole models: a tiny FCDM against fp64 and against the torch backend (output, every gradient, a few training
  steps), and compiled fullgraph with aot_eager and inductor.

GPU-marked tests repeat the block at the FCDM-XL level shapes and the model checks at FCDM-S scale. Compiling the
kernels for sm_90 without a GPU is tested in test_compile_check.py."""
import warnings

import pytest
import torch

import fcdm_kernels
from fcdm.models.fcdm import FCDM
from fcdm_kernels import dispatch
from fcdm_kernels.reference import convnext_block_reference
from tests.numerics import (BLOCK_ARG_NAMES, REL_TOL, assert_block_matches_fp64, assert_rel_close, block_args, runs_on,
                            saved_tensors)

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import block, launch  # noqa: E402  (needs Triton)
from fcdm_kernels.triton.dwconv_ln_modulate import dwconv_ln_modulate  # noqa: E402
from fcdm_kernels.triton.grn_mlp import grn_mlp  # noqa: E402


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


# ------------------------------------------------------------------------------------------------- the block as one op
def check_against_fp64(args, dtype):
    with runs_on("triton", "convnext_block"):  # the whole-block op, not the two ops composed
        assert_block_matches_fp64(fcdm_kernels.convnext_block, args, dtype)


@pytest.mark.parametrize("B,H,W,C,dtype", [
    (3, 7, 4, 40, torch.float32),   # three samples (the dW2/dgate kernel splits them in two), 7x4 narrower than 7x7
    (1, 4, 7, 8, torch.float32),    # one sample, C = 8
    (1, 4, 7, 40, torch.bfloat16),  # bf16 end to end; C = 40 tiles padded to 64 channels
    (3, 7, 7, 40, torch.bfloat16),
])
# bf16 at C = 8 is left out: a LayerNorm over 8 channels loses more than the 5e-3 budget in dscale/dshift, with the
# two ops composed as well (about 1e-2 at some seeds), so it would test bf16 rather than this op.
def test_block_op_matches_fp64_reference(B, H, W, C, dtype, device):
    check_against_fp64(block_args(B, H, W, C, dtype, device), dtype)


def saved_bytes(fn, args):
    """(total bytes, shapes) of the tensors autograd saves for one call of fn(*args)."""
    saved = saved_tensors(fn, args)
    # The same storage saved twice costs once.
    unique = {t.untyped_storage().data_ptr(): t for t in saved}
    return sum(t.untyped_storage().nbytes() for t in unique.values()), [tuple(t.shape) for t in saved]


def test_saves_only_x_pre_and_small_vectors(device):
    B, H, W, C = 2, 8, 8, 8          # B*H*W*C = 1024 values, more than any weight (49 C = 392)
    J, M = 3 * C, B * H * W
    args = block_args(B, H, W, C, torch.float32, device)
    with runs_on("triton", "convnext_block"):
        fused, shapes = saved_bytes(fcdm_kernels.convnext_block, args)

        def composed(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
            h = dwconv_ln_modulate(x, dw_weight, dw_bias, shift, scale)
            return grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2)
        two_ops, _ = saved_bytes(composed, args)
    weights = sum(a.numel() for a in args[4:]) * 4
    per_sample = (3 * B * C + 2 * B * J) * 4      # shift, scale, gate; ss and s (fp32)
    assert fused <= (M * C + M * J) * 4 + per_sample + weights, shapes
    # No activation-sized tensor besides x (B, H, W, C) and pre (M, J): h and z are gone.
    big = sorted(s for s in shapes if torch.Size(s).numel() >= M * C)
    assert big == [(B, H, W, C), (M, J)], shapes
    # The two ops composed also save h and z (2 C more values per pixel); this op adds only shift and b2, which
    # recomputing h and the bias part of dgate need.
    assert two_ops - fused == 2 * M * C * 4 - (B * C + C) * 4


def test_frozen_w1_skips_recomputing_h(device, monkeypatch):
    """h is recomputed in the backward for dW1 alone: with w1 frozen it is not (one dwconv forward instead of two),
    and the other eleven gradients still match the fp64 reference."""
    recomputed = []
    forward = block.dwconv_ln_modulate_forward
    monkeypatch.setattr(block, "dwconv_ln_modulate_forward", lambda *a: recomputed.append(1) or forward(*a))
    args = block_args(2, 4, 7, 8, torch.float32, device)
    args[6].requires_grad_(False)  # w1
    check_against_fp64(args, torch.float32)
    assert len(recomputed) == 1  # the forward's own
    args[6].requires_grad_(True)
    recomputed.clear()
    check_against_fp64(args, torch.float32)
    assert len(recomputed) == 2


def test_forward_without_grad_matches_and_saves_nothing(device):
    args = block_args(1, 4, 4, 8, torch.float32, device, requires_grad=False)
    out, pre, ss, s = block.convnext_block_op(*args, False)
    assert pre.numel() == 0
    assert_rel_close(out, convnext_block_reference(*[a.double() for a in args]), REL_TOL[torch.float32], "out")


def test_opcheck(device):
    args = block_args(1, 4, 4, 8, torch.float32, device)
    torch.library.opcheck(block.convnext_block_op, (*args, True))
    # The backward op too: its fake kernel must promise the real outputs' strides (inductor checks them).
    x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2 = [a.detach() for a in args]
    out, pre, ss, s = block.convnext_block_op(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2,
                                              True)
    torch.library.opcheck(block.convnext_block_backward_op, (torch.randn_like(out), x, shift, scale, gate, dw_weight,
                                                             dw_bias, w1, gamma, beta, w2, b2, pre, ss, s))


def test_explicit_cuda_backend_runs_its_dwconv_and_falls_back_for_grn_mlp(monkeypatch, device):
    """`use_backend("cuda")`: the CUDA dwconv_ln_modulate runs (stood in for here), grn_mlp falls back to Triton with
    a warning, and the block is composed from the two, not replaced by Triton's whole-block op."""
    calls = []

    def cuda_dwconv(x, weight, bias, shift, scale, eps):
        calls.append(tuple(x.shape))
        return fcdm_kernels.dwconv_ln_modulate_reference(x, weight, bias, shift, scale, eps)

    real_reason = dispatch.unavailable_reason
    monkeypatch.setitem(dispatch._IMPLS["dwconv_ln_modulate"], "cuda", cuda_dwconv)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda op, backend, dev: None if
                        (op, backend) == ("dwconv_ln_modulate", "cuda") else real_reason(op, backend, dev))
    monkeypatch.setattr(dispatch, "_warned", set())
    args = block_args(2, 5, 6, 8, torch.float32, device)
    with fcdm_kernels.use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fcdm_kernels.convnext_block(*args)
    assert calls == [(2, 5, 6, 8)]
    assert [str(w.message) for w in caught if "grn_mlp" in str(w.message)], [str(w.message) for w in caught]
    assert_rel_close(out, convnext_block_reference(*[a.double() for a in args]), REL_TOL[torch.float32], "out")


# ------------------------------------------------------------------------------------------- the block as two ops
def triton_block(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
    """The block as the model runs it: the two public ops."""
    h = fcdm_kernels.dwconv_ln_modulate(x, dw_weight, dw_bias, shift, scale)
    return fcdm_kernels.grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2)


@pytest.mark.parametrize("B,H,W,C,dtype", [
    (3, 7, 8, 24, torch.float32),   # 7x8 image; x's gradient sums the residual, the conv path and the MLP path
    (1, 8, 8, 40, torch.bfloat16),  # bf16 end to end through both ops
    (3, 7, 4, 24, torch.float16),   # fp16 (2e-3 budget); a 7x4 image narrower than the kernel
])
def test_block_matches_fp64_reference(B, H, W, C, dtype, device):
    with runs_on("triton", "dwconv_ln_modulate", "grn_mlp"):
        assert_block_matches_fp64(triton_block, block_args(B, H, W, C, dtype, device), dtype)


def test_torch_compile_fullgraph_matches_eager(device):
    args = block_args(1, 4, 4, 8, torch.float32, device)
    dispatch._load("triton")  # the backend import must happen outside the compiled region
    compiled = torch.compile(triton_block, fullgraph=True, backend="aot_eager")
    with runs_on("triton", "dwconv_ln_modulate", "grn_mlp"):
        out = compiled(*args)
        grads = torch.autograd.grad(out.square().sum(), args)
        eager = triton_block(*args)
        eager_grads = torch.autograd.grad(eager.square().sum(), args)
    assert_rel_close(out, eager, 1e-6, "out")
    for name, g, eg in zip(BLOCK_ARG_NAMES, grads, eager_grads):
        assert_rel_close(g, eg, 1e-6, "d" + name)


# ------------------------------------------------------------------------------------------------------ whole models
TINY = dict(hidden_size=8, depth=(1, 1, 1, 1, 1), in_channels=4, num_classes=10, class_dropout_prob=0.0)


def random_model(dtype, device, perturb=False, **config):
    """An FCDM whose zero-initialised layers (adaLN-Zero, GRN, final conv) are made random, so every block does work
    and every parameter gets a nonzero gradient; `perturb` also moves the other weights a little off their init."""
    torch.manual_seed(0)
    model = FCDM(**config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
            elif perturb:
                p.add_(torch.randn_like(p) * 0.01)
    return model.to(device=device, dtype=dtype)


def model_inputs(B, size, dtype, device, in_channels=4, num_classes=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, in_channels, size, size, generator=g).to(device=device, dtype=dtype)
    t = (torch.rand(B, generator=g) * 1000).to(device=device, dtype=dtype)
    y = torch.randint(0, num_classes, (B,), generator=g).to(device)
    return x, t, y


def outputs_and_grads(model, inputs, backend, forward=None):
    model.zero_grad(set_to_none=True)
    with fcdm_kernels.use_backend(backend):
        out = (model if forward is None else forward)(*inputs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def train_losses(model, inputs, backend, steps, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    x, t, y = inputs
    target = torch.randn(x.shape[0], model.out_channels, *x.shape[2:], generator=torch.Generator().manual_seed(2))
    target = target.to(x)
    losses = []
    for _ in range(steps):
        with fcdm_kernels.use_backend(backend):
            loss = (model(x, t, y) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def assert_fcdm_matches_fp64(config: dict, B: int, size: int, device) -> None:
    """An fp32 FCDM on the Triton backend against the same model in fp64 on the torch backend: the output and every
    parameter's gradient (each of which must be nonzero in the reference)."""
    inputs = model_inputs(B, size, torch.float32, device, config["in_channels"], config["num_classes"])
    ref_inputs = tuple(i.double() if i.is_floating_point() else i for i in inputs)
    ref, ref_grads = outputs_and_grads(random_model(torch.float64, device, **config), ref_inputs, "torch")
    with runs_on("triton", "convnext_block"):
        out, grads = outputs_and_grads(random_model(torch.float32, device, **config), inputs, "triton")
    assert_rel_close(out, ref, REL_TOL[torch.float32], "model output")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert ref_grads[name].abs().sum() > 0, f"{name} gets no gradient; the test would not exercise it"
        assert_rel_close(g, ref_grads[name], 2 * REL_TOL[torch.float32], name)


def test_tiny_fcdm_outputs_and_all_parameter_grads_match_fp64(device):
    # fp32 Triton vs the fp64 torch backend: C = 8, 16, 32 at 8x8, 4x4, 2x2 (the 7x7 halo covers a whole 2x2 image).
    assert_fcdm_matches_fp64(TINY, 3, 8, device)


def test_tiny_fcdm_training_matches_torch_backend(device):
    inputs = model_inputs(2, 8, torch.float32, device)
    fused = random_model(torch.float32, device, **TINY)
    plain = random_model(torch.float32, device, **TINY)
    with runs_on("triton", "convnext_block"):
        fused_losses = train_losses(fused, inputs, "triton", steps=3)
    plain_losses = train_losses(plain, inputs, "torch", steps=3)
    assert fused_losses[-1] < fused_losses[0]
    assert_rel_close(fused_losses, plain_losses, 1e-4, "loss curve")
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert_rel_close(p, q, 1e-4, name)


@pytest.fixture
def block_calls(monkeypatch):
    """Counts of this op's forward and backward launches, to prove the model runs it (not the two ops composed)."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        impl = getattr(block, f"convnext_block_{name}")

        def counted(*args, _impl=impl, _name=name):
            calls[_name] += 1
            return _impl(*args)
        monkeypatch.setattr(block, f"convnext_block_{name}", counted)
    return calls


def test_tiny_fcdm_triton_matches_torch_backend(device, block_calls):
    inputs = model_inputs(2, 8, torch.float32, device)
    model = random_model(torch.float32, device, perturb=True, **TINY)
    out, grads = outputs_and_grads(model, inputs, "triton")
    assert block_calls == {"forward": 5, "backward": 5}    # one block per level
    ref_inputs = tuple(i.double() if i.is_floating_point() else i for i in inputs)
    ref, ref_grads = outputs_and_grads(random_model(torch.float64, device, perturb=True, **TINY), ref_inputs, "torch")
    assert_rel_close(out, ref, REL_TOL[torch.float32], "model output")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert ref_grads[name].abs().sum() > 0, f"{name} gets no gradient; the test would not exercise it"
        assert_rel_close(g, ref_grads[name], 2 * REL_TOL[torch.float32], name)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])  # inductor also checks the ops' output strides
def test_tiny_fcdm_compiles_fullgraph(device, block_calls, compiler):
    inputs = model_inputs(1, 8, torch.float32, device)
    model = random_model(torch.float32, device, perturb=True, **TINY)
    dispatch._load("triton")  # the backend import must happen outside the compiled region
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out, grads = outputs_and_grads(model, inputs, "triton", forward=compiled)
    assert block_calls["forward"] >= 5 and block_calls["backward"] == 5   # the op inside the compiled graph
    eager, eager_grads = outputs_and_grads(model, inputs, "triton")
    # inductor fuses and reorders the torch parts' fp32 reductions; aot_eager runs the same kernels as eager
    tol = 1e-6 if compiler == "aot_eager" else 2 * REL_TOL[torch.float32]
    assert_rel_close(out, eager, tol, "model output")
    for name, g in grads.items():
        assert_rel_close(g, eager_grads[name], tol, name)


# ------------------------------------------------------------------------------------------------ GPU-scale checks
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,W,C", [  # every level; 512px is `slow`: gpu_check's time box skips it
    (64, 32, 32, 512), (64, 16, 16, 1024), (64, 8, 8, 2048), pytest.param(16, 64, 64, 512, marks=pytest.mark.slow)])
def test_fcdm_xl_level_shapes_bf16_match_fp64(B, H, W, C):
    torch.manual_seed(0)
    check_against_fp64(block_args(B, H, W, C, torch.bfloat16, torch.device("cuda")), torch.bfloat16)


@pytest.mark.gpu
def test_fcdm_s_outputs_grads_and_20_training_steps_match_reference():
    from fcdm.models import FCDM_models
    cuda = torch.device("cuda")
    make = FCDM_models["FCDM-S"]
    torch.manual_seed(0)
    fused, plain = make(class_dropout_prob=0.0).to(cuda), make(class_dropout_prob=0.0).to(cuda)
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for p, q in zip(fused.parameters(), plain.parameters()):
            if not p.any():
                p.normal_(0, 0.02)
                q.copy_(p)
    inputs = model_inputs(8, 32, torch.float32, cuda, fused.in_channels, fused.num_classes)
    with runs_on("triton", "convnext_block"):
        out, grads = outputs_and_grads(fused, inputs, "triton")
    ref, ref_grads = outputs_and_grads(plain, inputs, "torch")
    assert_rel_close(out, ref, 1e-4, "model output")
    for name, g in grads.items():
        assert_rel_close(g, ref_grads[name], 1e-3, name)
    with runs_on("triton", "convnext_block"):
        fused_losses = train_losses(fused, inputs, "triton", steps=20, lr=1e-4)
    plain_losses = train_losses(plain, inputs, "torch", steps=20, lr=1e-4)
    assert fused_losses[-1] < fused_losses[0]
    assert_rel_close(fused_losses, plain_losses, 1e-3, "loss curve")
