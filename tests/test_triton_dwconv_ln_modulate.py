"""Triton dwconv7x7 -> LayerNorm -> modulate against the fp64 reference: forward, every gradient, registration, errors.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest), so shapes are tiny and chosen to cover, between them:
C in {8, 24, 40} (40 and 24 are not powers of two), H, W in {4, 7, 8}, B in {1, 3}, bf16 and fp32.
"""
import pytest
import torch

import fcdm_kernels
from fcdm_kernels import dispatch
from fcdm_kernels.reference import dwconv_ln_modulate_reference
from tests.numerics import REL_TOL, assert_matches_fp64, assert_rel_close, runs_on, saved_tensors

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import launch  # noqa: E402  (needs Triton)
from fcdm_kernels.triton.dwconv_ln_modulate import dwconv_ln_modulate_backward_op, dwconv_ln_modulate_op  # noqa: E402


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel must fill starts as NaN."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force 8-pixel tiles (and 16-channel blocks in the dx/dW pass) so tiles cross image rows, a sample's last tile
    is partial, and the per-tile partial sums of dW/dbias/dshift/dscale are reduced over many tiles."""
    def tiles(channels, pixels, dtype, device):
        return launch.TileConfig(8, triton.next_power_of_2(channels), 4)

    def grad_tiles(channels, pixels, dtype, device):
        return launch.TileConfig(8, 16, 4)
    monkeypatch.setattr(launch, "dwconv_config", tiles)
    monkeypatch.setattr(launch, "dwconv_grad_config", grad_tiles)


def make_args(B, H, W, C, dtype, device):
    """Random inputs of realistic magnitudes (conv weights ~ 1/7 so h0 is O(1)), all requiring grad."""
    args = (torch.randn(B, H, W, C), torch.randn(C, 7, 7) / 7, torch.randn(C) * 0.5,
            torch.randn(B, C) * 0.5, torch.randn(B, C) * 0.5)
    return [a.to(device=device, dtype=dtype).requires_grad_() for a in args]


def check_against_fp64(args, device, backend="triton"):
    """Forward and the gradients of all five inputs vs the reference run in fp64 on the same (rounded) inputs."""
    tol = REL_TOL[args[0].dtype]
    with runs_on(backend, "dwconv_ln_modulate"):
        out = fcdm_kernels.dwconv_ln_modulate(*args)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, grad_out)
    exact = [a.detach().double().requires_grad_() for a in args]
    ref = dwconv_ln_modulate_reference(*exact)
    ref_grads = torch.autograd.grad(ref, exact, grad_out.double())
    assert out.dtype == args[0].dtype and out.is_contiguous()
    assert_rel_close(out, ref, tol, "h")
    for name, g, rg in zip(("dx", "dweight", "dbias", "dshift", "dscale"), grads, ref_grads):
        assert g.dtype == args[0].dtype, name
        assert_rel_close(g, rg, tol, name)


@pytest.mark.parametrize("B,H,W,C,dtype", [
    (3, 7, 7, 24, torch.float32),   # odd image narrower than the 7x7 reach, several samples, C not a power of two
    (3, 8, 4, 40, torch.bfloat16),  # non-square image, C = 40 padded to a 64-wide channel block
    (1, 4, 8, 8, torch.bfloat16),   # smallest width: LayerNorm statistics over 8 channels
])
def test_matches_fp64_reference(B, H, W, C, dtype, device):
    check_against_fp64(make_args(B, H, W, C, dtype, device), device)


@pytest.mark.parametrize("B,H,W,C,dtype", [
    (1, 7, 7, 40, torch.float32),   # 49 pixels = 6 full 8-pixel tiles + a 1-pixel tile; 3 channel blocks, last partial
    (3, 4, 7, 24, torch.bfloat16),  # tiles start mid-row of a 7-wide image; partial sums over 3 samples x 4 tiles
])
def test_matches_fp64_reference_with_small_tiles(small_tiles, B, H, W, C, dtype, device):
    check_against_fp64(make_args(B, H, W, C, dtype, device), device)


def test_dshift_alone_keeps_nothing_for_the_backward(device):
    # dshift is dh summed over the pixels: with x, weight, bias and scale frozen nothing needs saving.
    args = make_args(2, 4, 7, 8, torch.float32, device)
    for i in (0, 1, 2, 4):
        args[i].requires_grad_(False)
    with runs_on("triton", "dwconv_ln_modulate"):
        assert saved_tensors(fcdm_kernels.dwconv_ln_modulate, args) == []
        assert_matches_fp64(fcdm_kernels.dwconv_ln_modulate, dwconv_ln_modulate_reference, args,
                            ("x", "weight", "bias", "shift", "scale"), REL_TOL[torch.float32])


def test_opcheck(device):
    args = make_args(1, 4, 4, 8, torch.float32, device)
    torch.library.opcheck(dwconv_ln_modulate_op, (*args, 1e-6))
    # The backward op too: its fake kernel must promise the real outputs' strides (inductor checks them).
    x, weight, bias, _, scale = [a.detach() for a in args]
    torch.library.opcheck(dwconv_ln_modulate_backward_op, (torch.randn_like(x), x, weight, bias, scale, 1e-6))


def test_dispatch_picks_triton(device, tmp_path, monkeypatch):
    monkeypatch.setenv("FCDM_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))  # never the user's cache
    x = make_args(1, 4, 4, 8, torch.float32, device)[0]
    with fcdm_kernels.use_backend("triton"):
        assert dispatch.resolve("dwconv_ln_modulate", x) == "triton"
    dispatch._load("triton")
    order = dispatch.auto_preference("dwconv_ln_modulate")(x)
    if dispatch.unavailable_reason("dwconv_ln_modulate", "cuda", x.device) is None:
        assert set(order) == {"triton", "cuda"}  # with the CUDA extension, `auto` orders the two by measured speed
    else:
        assert order[0] == "triton"


@pytest.mark.parametrize("arg,bad,message", [
    (0, lambda a: a.permute(0, 3, 1, 2).contiguous(), "x"),           # NCHW instead of NHWC
    (0, lambda a: a.transpose(1, 2), "x"),                              # right shape, not contiguous
    (1, lambda a: a.double(), "weight"),                                # dtype mismatch
    (3, lambda a: a[:, :-1], "shift"),                                  # wrong shape
])
def test_bad_inputs_raise_value_error_naming_the_argument(arg, bad, message, device):
    args = [a.detach() for a in make_args(1, 4, 4, 8, torch.float32, device)]
    args[arg] = bad(args[arg])
    with fcdm_kernels.use_backend("triton"), pytest.raises(ValueError, match=rf"^{message}\b"):
        fcdm_kernels.dwconv_ln_modulate(*args)


# ------------------------------------------------------------------------------------------------ GPU-scale checks
@pytest.mark.gpu
@pytest.mark.parametrize("B,H,W,C", [  # beyond level 1, `slow`: the block-op test covers level 3 in gpu_check
    (64, 32, 32, 512), pytest.param(64, 16, 16, 1024, marks=pytest.mark.slow),
    pytest.param(64, 8, 8, 2048, marks=pytest.mark.slow), pytest.param(16, 64, 64, 512, marks=pytest.mark.slow)])
def test_fcdm_xl_shapes_bf16(B, H, W, C):
    check_against_fp64(make_args(B, H, W, C, torch.bfloat16, torch.device("cuda")), torch.device("cuda"))
