"""The Triton kernels with the tile configs they get on an H100, run by the CPU interpreter.

The other Triton tests run the interpreter's own configs (few, large programs) or deliberately tiny tiles. The
configs `launch.py` picks on CUDA (128-row GEMM tiles whose rows straddle two samples, 128-pixel dx/dW tiles, the
split dW2 reduction) would otherwise first run on a GPU. Here config selection is told it is on CUDA, every tuning
candidate of the GEMMs is taken in turn, and the block, as one op and as the two ops, is checked against the fp64
reference, forward and every gradient, with poisoned outputs.
"""
import os

import pytest
import torch

import fcdm_kernels
from tests.numerics import assert_block_matches_fp64, block_args, runs_on

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import launch  # noqa: E402  (needs Triton)

# On a GPU machine the interpreter is off and these configs run for real in the gpu-marked tests.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the H100 configs in the Triton CPU interpreter (TRITON_INTERPRET=1)")

# (B, H, W, C, dtype): P = 144 >= 128 takes the GEMM epilogues' two-samples-per-tile path with tiles that straddle a
# sample boundary; P = 64 < 128 the general per-row gather. C and J = 3C are not powers of two.
SHAPES = [(2, 12, 12, 48, torch.float32), (3, 8, 8, 40, torch.bfloat16)]


def as_on_h100(monkeypatch, candidate: int) -> None:
    """Choose launch configs as on a CUDA device, with GEMM tuning candidate `candidate` (the last one where an op
    has fewer), while the kernels still run in the interpreter."""
    from tests.test_triton_gemm_candidates import use_gemm_candidate
    monkeypatch.setattr(launch, "interpreting", lambda device: False)
    # The interpreter multiplies bf16 tl.dot operands wrongly (launch.py), so the dots stay widened to fp32.
    monkeypatch.setattr(launch, "dot_in_fp32", lambda dtype, device: True)
    use_gemm_candidate(monkeypatch, candidate)
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def two_ops(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
    h = fcdm_kernels.dwconv_ln_modulate(x, dw_weight, dw_bias, shift, scale)
    return fcdm_kernels.grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2)


@pytest.mark.parametrize("candidate", [0, 1, 2])
@pytest.mark.parametrize("block", [fcdm_kernels.convnext_block, two_ops], ids=["block_op", "two_ops"])
@pytest.mark.parametrize("B,H,W,C,dtype", SHAPES)
def test_h100_configs_match_fp64_reference(B, H, W, C, dtype, block, candidate, monkeypatch):
    args = block_args(B, H, W, C, dtype, torch.device("cpu"))
    as_on_h100(monkeypatch, candidate)
    chosen = launch.gemm_candidates("dy_gelu", 3 * C, dtype)
    assert chosen[0].block_m == (64 if dtype == torch.float32 else 128)  # the H100 tiles, not the interpreter's
    ops = ("convnext_block",) if block is fcdm_kernels.convnext_block else ("dwconv_ln_modulate", "grn_mlp")
    with runs_on("triton", *ops):
        assert_block_matches_fp64(block, args, dtype)


def test_tiny_fcdm_with_h100_configs_matches_fp64(monkeypatch):
    """The whole model (levels of 16, 32 and 64 channels at 16x16, 8x8 and 4x4: GEMM2 outputs narrower than any wide
    tile, and images smaller than a tile), forward and every parameter's gradient, against the fp64 torch backend."""
    from tests.test_triton_block import assert_fcdm_matches_fp64
    as_on_h100(monkeypatch, 0)
    config = dict(hidden_size=16, depth=(1, 1, 1, 1, 1), in_channels=4, num_classes=10, class_dropout_prob=0.0)
    assert_fcdm_matches_fp64(config, 2, 16, torch.device("cpu"))
