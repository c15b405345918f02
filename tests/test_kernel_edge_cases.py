"""Inputs where a plausible one-line kernel bug shows, forward and every gradient against fp64.

Ordinary random inputs hide some bugs: with O(1) activations a LayerNorm eps added outside the square root, or a GRN
without its eps, changes nothing measurable. Each case here is built so that such a bug fails by a wide margin:

* small variance: x * 1e-3 with a zero conv bias, so the LayerNorm variance (~1e-6) is comparable to eps (1e-6);
* a sample whose hidden activations are all zero (GRN's channel mean is then 0, and only eps keeps N finite), and for
  dwconv_ln_modulate a constant sample (LayerNorm variance exactly 0);
* large magnitudes in bf16 (the statistics must be accumulated in fp32, centred before squaring);
* a single pixel row (H = 1: every vertical tap of the 7x7 stencil falls in the zero padding) with C = 20, not a
  multiple of any channel tile (masked tails in every kernel).

The Triton ops (dwconv_ln_modulate, grn_mlp and the whole-block op) run under the interpreter on CPU; the CUDA
dwconv_ln_modulate runs in the CPU emulation of tests/test_cuda_build.py (marker cuda_build).
"""
import pytest
import torch

import fcdm_kernels
from fcdm_kernels.reference import dwconv_ln_modulate_reference, grn_mlp_reference
from tests.numerics import (BLOCK_ARG_NAMES, REL_TOL, assert_block_matches_fp64, assert_matches_fp64, assert_rel_close,
                            runs_on)
from tests.test_cuda_build import _reference_and_tolerances, emulated, emulated_forward_backward  # noqa: F401 (fixture)

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import launch  # noqa: E402  (needs Triton)

DWCONV_NAMES = ("x", "weight", "bias", "shift", "scale")
GRN_MLP_NAMES = ("h", "x", "gate", "w1", "b1", "gamma", "beta", "w2", "b2")
SHAPE = (2, 5, 4, 12)  # C = 12, J = 36: neither a power of two


def small_variance(t):
    t["x"] = t["x"] * 1e-3
    t["dw_bias"] = torch.zeros_like(t["dw_bias"])


def zero_hidden_sample(t):
    # Sample 1 reaches GEMM1 as exactly zero (h = 0 in grn_mlp; scale = -1, shift = 0 in the block), and b1 = 0, so
    # its hidden activations u = GELU(0) are all zero.
    t["h"][1] = 0
    t["scale"][1] = -1
    t["shift"][1] = 0
    t["b1"] = torch.zeros_like(t["b1"])


def constant_sample(t):
    t["x"][1] = 0
    t["dw_bias"] = torch.zeros_like(t["dw_bias"])


def large_magnitude(t):
    t["x"] = t["x"] * 100
    t["h"] = t["h"] * 8


CASES = {  # name: (modifier, dtype, shape, what a failure means)
    "small_variance": (small_variance, torch.float32, SHAPE,
                       "small-variance LayerNorm input (x*1e-3, zero bias: is eps inside the square root?)"),
    "zero_hidden_sample": (zero_hidden_sample, torch.float32, SHAPE,
                           "a sample whose hidden activations are all zero (GRN: is eps added to the channel mean?)"),
    "constant_sample": (constant_sample, torch.float32, SHAPE,
                        "a constant sample (LayerNorm variance 0: is eps added to the variance?)"),
    "large_bf16": (large_magnitude, torch.bfloat16, (2, 5, 4, 16),  # C = 16: the CUDA kernel's bf16 vector path
                   "large-magnitude bf16 inputs (are the statistics accumulated in fp32 and centred?)"),
    "one_row_c20": (lambda t: None, torch.float32, (2, 1, 9, 20),
                    "a single pixel row, C = 20 (vertical halo all padding; masked channel tails)"),
}
OP_CASES = {
    "dwconv_ln_modulate": ("small_variance", "constant_sample", "large_bf16", "one_row_c20"),
    "grn_mlp": ("zero_hidden_sample", "large_bf16", "one_row_c20"),
    "convnext_block": ("small_variance", "zero_hidden_sample", "large_bf16", "one_row_c20"),
}


def case_tensors(case: str) -> tuple[dict, torch.dtype, str]:
    """The named inputs of every op for `case` (block arguments plus grn_mlp's h), its dtype and its description."""
    modify, dtype, (B, H, W, C), what = CASES[case]
    J = 3 * C
    t = dict(x=torch.randn(B, H, W, C), shift=torch.randn(B, C) * 0.5, scale=torch.randn(B, C) * 0.5,
             gate=torch.randn(B, C), dw_weight=torch.randn(C, 7, 7) / 7, dw_bias=torch.randn(C) * 0.5,
             w1=torch.randn(J, C) / C ** 0.5, b1=torch.randn(J) * 0.1, gamma=torch.randn(J),
             beta=torch.randn(J) * 0.3, w2=torch.randn(C, J) / J ** 0.5, b2=torch.randn(C) * 0.1,
             h=torch.randn(B, H, W, C))
    modify(t)
    return t, dtype, what


def leaves(t: dict, names, dtype) -> list[torch.Tensor]:
    return [t[n].to(dtype).requires_grad_() for n in names]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("case", OP_CASES["dwconv_ln_modulate"])
def test_triton_dwconv_ln_modulate_edge_case(case, single_thread):
    t, dtype, what = case_tensors(case)
    args = leaves(dict(t, weight=t["dw_weight"], bias=t["dw_bias"]), DWCONV_NAMES, dtype)
    with runs_on("triton", "dwconv_ln_modulate"):
        assert_matches_fp64(fcdm_kernels.dwconv_ln_modulate, dwconv_ln_modulate_reference, args, DWCONV_NAMES,
                            REL_TOL[dtype], f"Triton dwconv_ln_modulate, {what}")


@pytest.mark.parametrize("case", OP_CASES["grn_mlp"])
def test_triton_grn_mlp_edge_case(case, single_thread):
    t, dtype, what = case_tensors(case)
    args = leaves(t, GRN_MLP_NAMES, dtype)
    with runs_on("triton", "grn_mlp"):
        assert_matches_fp64(fcdm_kernels.grn_mlp, grn_mlp_reference, args, GRN_MLP_NAMES, REL_TOL[dtype],
                            f"Triton grn_mlp, {what}")


@pytest.mark.parametrize("case", OP_CASES["convnext_block"])
def test_triton_block_op_edge_case(case, single_thread):
    t, dtype, what = case_tensors(case)
    with runs_on("triton", "convnext_block"):
        assert_block_matches_fp64(fcdm_kernels.convnext_block, leaves(t, BLOCK_ARG_NAMES, dtype), dtype,
                                  f"Triton block op, {what}")


def test_zero_hidden_sample_really_zeroes_the_grn_statistic():
    """The case is what it claims: in the reference, sample 1's hidden activations are exactly zero, so its GRN
    channel mean is 0 (eps alone keeps N = 0 / (0 + eps) finite)."""
    import torch.nn.functional as F
    t, _, _ = case_tensors("zero_hidden_sample")
    u = F.gelu(F.linear(t["h"].double(), t["w1"].double(), t["b1"].double()))
    assert torch.count_nonzero(u[1]) == 0 and torch.count_nonzero(u[0]) == u[0].numel()
    h = dwconv_ln_modulate_reference(*(t[n].double() for n in ("x", "dw_weight", "dw_bias", "shift", "scale")))
    assert torch.count_nonzero(h[1]) == 0


# ------------------------------------------------------------------------------ the CUDA kernel, emulated on the CPU
@pytest.mark.cuda_build
@pytest.mark.parametrize("case,vec", [("small_variance", True), ("constant_sample", True), ("large_bf16", True),
                                      ("large_bf16", False), ("one_row_c20", True)])
def test_emulated_cuda_dwconv_ln_modulate_edge_case(emulated, case, vec):
    t, dtype, what = case_tensors(case)
    inputs = tuple(t[n].to(dtype) for n in ("x", "dw_weight", "dw_bias", "shift", "scale"))
    # The 16-byte vector path, where bindings.cpp would take it: C a multiple of the vector width.
    assert not vec or inputs[0].shape[-1] % (16 // inputs[0].element_size()) == 0
    grad_h = torch.randn_like(inputs[0])
    h, grads = emulated_forward_backward(emulated, inputs, grad_h, vec)
    oracle, tols = _reference_and_tolerances(inputs, grad_h)
    for name, got, ref, tol in zip(("h", "dx", "dweight", "dbias", "dshift", "dscale"), (h,) + grads, oracle, tols):
        assert_rel_close(got, ref, tol, f"emulated CUDA dwconv_ln_modulate ({'vector' if vec else 'scalar'} path), "
                                        f"{what}: {name}")
