"""The reference ops against independent loop-level maths, and their input validation (dispatch: test_dispatch.py)."""
import pytest
import torch

import fcdm
from fcdm_kernels import dwconv_ln_modulate, grn_mlp
from fcdm_kernels.reference import dwconv_ln_modulate_reference, grn_mlp_reference
from tests.numerics import assert_rel_close, rel_error


def dwconv_args(B=2, H=5, W=7, C=6, dtype=torch.float64):
    return (torch.randn(B, H, W, C, dtype=dtype), torch.randn(C, 7, 7, dtype=dtype), torch.randn(C, dtype=dtype),
            torch.randn(B, C, dtype=dtype), torch.randn(B, C, dtype=dtype))


def mlp_args(B=2, H=3, W=5, C=4, J=12, dtype=torch.float64):
    return (torch.randn(B, H, W, C, dtype=dtype), torch.randn(B, H, W, C, dtype=dtype), torch.randn(B, C, dtype=dtype),
            torch.randn(J, C, dtype=dtype), torch.randn(J, dtype=dtype), torch.randn(J, dtype=dtype),
            torch.randn(J, dtype=dtype), torch.randn(C, J, dtype=dtype), torch.randn(C, dtype=dtype))


def test_dwconv_ln_modulate_reference_matches_explicit_loops():
    x, w, b, shift, scale = dwconv_args()
    B, H, W, C = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 3, 3, 3, 3))  # pad W and H by 3
    h0 = torch.zeros_like(x)
    for ky in range(7):
        for kx in range(7):
            h0 += padded[:, ky:ky + H, kx:kx + W, :] * w[:, ky, kx]
    h0 += b
    mu = h0.mean(-1, keepdim=True)
    var = ((h0 - mu) ** 2).mean(-1, keepdim=True)
    expected = (h0 - mu) / torch.sqrt(var + 1e-6) * (1 + scale[:, None, None]) + shift[:, None, None]
    assert_rel_close(dwconv_ln_modulate_reference(x, w, b, shift, scale), expected, 1e-12)


def test_grn_mlp_reference_matches_explicit_formula():
    h, x, gate, w1, b1, gamma, beta, w2, b2 = mlp_args()
    pre = h @ w1.T + b1
    u = 0.5 * pre * (1 + torch.erf(pre / 2 ** 0.5))
    G = u.pow(2).sum(dim=(1, 2)).sqrt()                     # (B, J)
    N = G / (G.mean(-1, keepdim=True) + 1e-6)
    s = 1 + gamma * N                                       # GRN as a per-sample scale (docs/kernels.md)
    z = (u * s[:, None, None]) @ w2.T + (w2 @ beta + b2)
    expected = x + gate[:, None, None] * z
    assert_rel_close(grn_mlp_reference(h, x, gate, w1, b1, gamma, beta, w2, b2), expected, 1e-12)


def test_upcast_reference_is_more_accurate_in_bf16():
    args64 = dwconv_args(C=32)
    exact = dwconv_ln_modulate_reference(*args64)
    args16 = [a.to(torch.bfloat16) for a in args64]
    up = dwconv_ln_modulate_reference(*args16, upcast=True)
    assert up.dtype == torch.bfloat16
    assert rel_error(up, exact) < 5e-3


@pytest.mark.parametrize("op,make", [(dwconv_ln_modulate, dwconv_args), (grn_mlp, mlp_args)])
def test_public_op_equals_reference_on_torch_backend(op, make):
    args = make(dtype=torch.float32)
    ref = (dwconv_ln_modulate_reference if op is dwconv_ln_modulate else grn_mlp_reference)(*args)
    with fcdm.use_backend("torch"):
        assert torch.equal(op(*args), ref)


def test_dwconv_validation_names_the_argument():
    x, w, b, shift, scale = dwconv_args(dtype=torch.float32)
    nchw = x.permute(0, 3, 1, 2).contiguous()
    with pytest.raises(ValueError, match=r"^x must have 6 channels .*NCHW"):
        dwconv_ln_modulate(nchw, w, b, shift, scale)
    with pytest.raises(ValueError, match=r"^x must be a contiguous NHWC"):
        dwconv_ln_modulate(x.transpose(1, 2), w, b, shift, scale)
    with pytest.raises(ValueError, match=r"^weight has dtype torch.float64"):
        dwconv_ln_modulate(x, w.double(), b, shift, scale)
    with pytest.raises(ValueError, match=r"^scale must have shape \(2, 6\)"):
        dwconv_ln_modulate(x, w, b, shift, scale[:1])
    with pytest.raises(ValueError, match=r"^bias must have shape \(6,\)"):
        dwconv_ln_modulate(x, w, b[:5], shift, scale)
    with pytest.raises(ValueError, match=r"^x must be a 4-D"):
        dwconv_ln_modulate(x[0], w, b, shift, scale)
    with pytest.raises(ValueError, match=r"^x must be a floating-point"):
        dwconv_ln_modulate(x.to(torch.int32), w, b, shift, scale)


def test_grn_mlp_validation_names_the_argument():
    h, x, gate, w1, b1, gamma, beta, w2, b2 = mlp_args(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^h must have shape"):
        grn_mlp(h[:, :2], x, gate, w1, b1, gamma, beta, w2, b2)
    with pytest.raises(ValueError, match=r"^w2 must have shape \(4, 12\)"):
        grn_mlp(h, x, gate, w1, b1, gamma, beta, w2.T.contiguous(), b2)
    with pytest.raises(ValueError, match=r"^gamma has dtype"):
        grn_mlp(h, x, gate, w1, b1, gamma.half(), beta, w2, b2)
    with pytest.raises(ValueError, match=r"^gate must be contiguous"):
        wide = torch.randn(2, 12)
        grn_mlp(h, x, wide[:, :4], w1, b1, gamma, beta, w2, b2)


def test_convnext_block_composes_the_two_ops_and_validates():
    from fcdm_kernels import convnext_block, convnext_block_reference
    x, w, b, shift, scale = dwconv_args(C=4, H=3, W=5)
    _, _, gate, w1, b1, gamma, beta, w2, b2 = mlp_args(C=4, H=3, W=5)
    args = (x, shift, scale, gate, w, b, w1, b1, gamma, beta, w2, b2)
    with fcdm.use_backend("torch"):
        out = convnext_block(*args)
    assert_rel_close(out, convnext_block_reference(*args), 1e-15, "block")
    with pytest.raises(ValueError, match=r"^gate must have shape"):
        convnext_block(x, shift, scale, gate[:, :3].contiguous(), w, b, w1, b1, gamma, beta, w2, b2)
