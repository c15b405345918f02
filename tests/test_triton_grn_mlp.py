"""Triton GEMM1+GELU -> GRN (folded) -> GEMM2+gate+residual against the fp64 reference: forward, every gradient,
registration, the no-grad path and input errors.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest), so shapes are tiny and chosen to cover, between them:
C in {8, 24, 40}, H, W in {4, 7, 8}, B in {1, 3}, bf16 and fp32, and GEMM tiles that straddle samples.
"""
import pytest
import torch

import fcdm_kernels
from fcdm_kernels import dispatch
from fcdm_kernels.reference import grn_mlp_reference
from tests.numerics import REL_TOL, assert_matches_fp64, assert_rel_close, runs_on, saved_tensors

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import launch  # noqa: E402  (needs Triton)
from fcdm_kernels.triton.grn_mlp import grn_mlp_backward_op, grn_mlp_op  # noqa: E402

GRAD_NAMES = ("dh", "dx", "dgate", "dw1", "db1", "dgamma", "dbeta", "dw2", "db2")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel must fill starts as NaN."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """16x16x16 GEMM tiles and 16x16 elementwise tiles: with 49 or 28 pixels per sample, row tiles straddle two
    samples, so the per-sample sums (GRN statistic, dgate, the GRN backward) must split a tile by sample; C and J
    are not multiples of 16, so the last K step and the last column tile are partial."""
    monkeypatch.setattr(launch, "gemm_config", lambda *args: launch.GemmConfig(16, 16, 16, group_m=2,
                                                                               num_warps=1, num_stages=1))
    monkeypatch.setattr(launch, "rows_config", lambda cols, device: launch.TileConfig(16, 16, 1))
    monkeypatch.setattr(launch, "vector_block", lambda n, device: 16)


def make_args(B, H, W, C, dtype, device, zero_channel=False):
    """Random inputs with O(1) activations, all requiring grad. zero_channel makes hidden channel 0 exactly zero in
    every sample (u = GELU(0) = 0), the GRN norm's non-differentiable point."""
    J = 3 * C
    args = [torch.randn(B, H, W, C), torch.randn(B, H, W, C), torch.randn(B, C), torch.randn(J, C) / C ** 0.5,
            torch.randn(J) * 0.1, torch.randn(J), torch.randn(J) * 0.3, torch.randn(C, J) / J ** 0.5,
            torch.randn(C) * 0.1]
    if zero_channel:
        args[3][0] = 0
        args[4][0] = 0
    return [a.to(device=device, dtype=dtype).requires_grad_() for a in args]


def check_against_fp64(args):
    """Forward and the gradients of all nine inputs vs the reference run in fp64 on the same (rounded) inputs."""
    tol = REL_TOL[args[0].dtype]
    with runs_on("triton", "grn_mlp"):
        out = fcdm_kernels.grn_mlp(*args)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, grad_out)
    exact = [a.detach().double().requires_grad_() for a in args]
    ref = grn_mlp_reference(*exact)
    ref_grads = torch.autograd.grad(ref, exact, grad_out.double())
    assert out.dtype == args[0].dtype and out.is_contiguous()
    assert_rel_close(out, ref, tol, "out")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads):
        assert g.dtype == args[0].dtype, name
        assert_rel_close(g, rg, tol, name)


@pytest.mark.parametrize("B,H,W,C,dtype", [
    (3, 7, 7, 24, torch.float32),   # several samples of 49 pixels, C and J = 72 not powers of two
    (3, 8, 4, 40, torch.bfloat16),  # non-square image, C = 40 / J = 120
    (1, 4, 8, 8, torch.bfloat16),   # one sample, smallest width (J = 24)
])
def test_matches_fp64_reference(B, H, W, C, dtype, device):
    check_against_fp64(make_args(B, H, W, C, dtype, device))


@pytest.mark.parametrize("B,H,W,C,dtype", [
    (3, 7, 7, 40, torch.float32),   # 16-row tiles straddle the 49-pixel samples; 40 = 2.5 K steps of 16
    (3, 4, 7, 24, torch.bfloat16),  # 28-pixel samples: one tile holds the end of one sample and the start of the next
])
def test_matches_fp64_reference_with_small_tiles(small_tiles, B, H, W, C, dtype, device):
    check_against_fp64(make_args(B, H, W, C, dtype, device))


def test_zero_hidden_channel_has_finite_gradients(device):
    # G = 0 for channel 0: the reference (torch's vector_norm) gives it a zero subgradient, and so must the kernel.
    check_against_fp64(make_args(3, 4, 4, 8, torch.float32, device, zero_channel=True))


def test_no_grad_forward_skips_saved_activations(device):
    args = [a.detach() for a in make_args(1, 4, 4, 8, torch.float32, device)]
    out, pre, z, ss, s = grn_mlp_op(*args, False)
    assert pre.numel() == 0 and z.numel() == 0
    assert_rel_close(out, grn_mlp_reference(*[a.double() for a in args]), REL_TOL[torch.float32], "out")
    with torch.no_grad(), fcdm_kernels.use_backend("triton"):
        assert torch.equal(fcdm_kernels.grn_mlp(*args), out)


def test_frozen_w1_and_gate_keep_neither_h_nor_z(device):
    """h feeds only dW1 and z only dgate: with both frozen, the backward keeps neither (two (B, H, W, C) tensors
    less), and every other gradient still matches the fp64 reference."""
    B, H, W, C = 2, 4, 8, 8
    args = make_args(B, H, W, C, torch.float32, device)
    with runs_on("triton", "grn_mlp"):
        trained = saved_tensors(fcdm_kernels.grn_mlp, args)
        args[2].requires_grad_(False)  # gate
        args[3].requires_grad_(False)  # w1
        frozen = saved_tensors(fcdm_kernels.grn_mlp, args)
        assert_matches_fp64(fcdm_kernels.grn_mlp, grn_mlp_reference, args, GRAD_NAMES, REL_TOL[torch.float32])
    activation = (B, H, W, C)
    assert [tuple(t.shape) for t in trained].count(activation) == 1  # h (x is not needed: its gradient is g)
    assert (B * H * W, C) in [tuple(t.shape) for t in trained]          # z
    assert sum(t.numel() for t in trained) - sum(t.numel() for t in frozen) == 2 * B * H * W * C


def test_opcheck(device):
    args = make_args(1, 4, 4, 8, torch.float32, device)
    torch.library.opcheck(grn_mlp_op, (*args, True))
    h, x, gate, w1, b1, gamma, beta, w2, b2 = [a.detach() for a in args]
    out, pre, z, ss, s = grn_mlp_op(h, x, gate, w1, b1, gamma, beta, w2, b2, True)
    torch.library.opcheck(grn_mlp_backward_op, (torch.randn_like(out), h, gate, w1, gamma, beta, w2, pre, z, ss, s))


def test_dispatch_picks_triton(device):
    x = make_args(1, 4, 4, 8, torch.float32, device)[1]
    with fcdm_kernels.use_backend("triton"):
        assert dispatch.resolve("grn_mlp", x) == "triton"
    dispatch._load("triton")
    assert dispatch.auto_preference("grn_mlp")(x)[0] == "triton"


@pytest.mark.parametrize("arg,bad,message", [
    (1, lambda a: a.permute(0, 3, 1, 2).contiguous(), "h"),            # x given as NCHW: h no longer matches it
    (0, lambda a: a.transpose(1, 2), "h"),                               # right shape, not contiguous
    (2, lambda a: a.double(), "gate"),                                   # dtype mismatch
    (7, lambda a: a[:, :-1], "w2"),                                      # wrong shape
])
def test_bad_inputs_raise_value_error_naming_the_argument(arg, bad, message, device):
    args = [a.detach() for a in make_args(1, 4, 4, 8, torch.float32, device)]
    args[arg] = bad(args[arg])
    with fcdm_kernels.use_backend("triton"), pytest.raises(ValueError, match=rf"^{message}\b"):
        fcdm_kernels.grn_mlp(*args)


# ------------------------------------------------------------------------------------------------ GPU-scale checks
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,W,C", [  # beyond level 1, `slow`: the block-op test covers level 3 in gpu_check
    (64, 32, 32, 512), pytest.param(64, 16, 16, 1024, marks=pytest.mark.slow),
    pytest.param(64, 8, 8, 2048, marks=pytest.mark.slow), pytest.param(16, 64, 64, 512, marks=pytest.mark.slow)])
def test_fcdm_xl_shapes_bf16(B, H, W, C):
    check_against_fp64(make_args(B, H, W, C, torch.bfloat16, torch.device("cuda")))
