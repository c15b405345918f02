"""Every bf16 GEMM config the lazy tuner may pick, run once on a GPU against fp64 at an FCDM-XL shape.

On CUDA, fcdm_kernels/triton/launch.py times a small candidate set per GEMM the first time it sees a shape and keeps
the fastest, so production can run any candidate, while the rest of the suite runs the first one only (gpu_check
turns tuning off to save compile time). Here candidate i of every GEMM (the last one where an op has fewer) runs the
whole block, as one op and as the two ops, forward and every gradient, against the fp64 reference. gpu_check.sh runs
these in a stage of their own (`-m gemm_candidates`); without a GPU they skip.
"""
import pytest
import torch

import fcdm_kernels
from tests.numerics import assert_block_matches_fp64, block_args, runs_on

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import launch  # noqa: E402  (needs Triton)

pytestmark = [pytest.mark.gpu, pytest.mark.gemm_candidates]

GEMMS = ("gemm1", "gemm2", "dy_stats", "dy_gelu")
# FCDM-XL's first level at 256px (C = 512, J = 1536, 32x32 latents), 8 samples: the widths set the candidates.
XL_SHAPE = (8, 32, 32, 512)


def candidates(op: str, n: int) -> list:
    return launch.gemm_candidates(op, n, torch.bfloat16)


def widest_candidate_set(C: int) -> int:
    """How many candidates the op with the most has, at width C (GEMM1 and the dy GEMMs produce J = 3C columns)."""
    return max(len(candidates(op, C if op == "gemm2" else 3 * C)) for op in GEMMS)


def use_gemm_candidate(monkeypatch, candidate: int) -> list:
    """Make every GEMM take tuning candidate `candidate` (the last one where an op has fewer), untimed; returns the
    list of (op, config) chosen, to prove each GEMM ran."""
    chosen = []

    def gemm_config(op, m, n, k, pixels, dtype, device, run):
        cands = launch.gemm_candidates(op, n, dtype)
        chosen.append((op, cands[min(candidate, len(cands) - 1)]))
        return chosen[-1][1]
    monkeypatch.setattr(launch, "gemm_config", gemm_config)
    return chosen


def two_ops(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
    h = fcdm_kernels.dwconv_ln_modulate(x, dw_weight, dw_bias, shift, scale)
    return fcdm_kernels.grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2)


@pytest.mark.parametrize("block", [fcdm_kernels.convnext_block, two_ops], ids=["block_op", "two_ops"])
@pytest.mark.parametrize("candidate", range(widest_candidate_set(XL_SHAPE[-1])))
def test_every_bf16_gemm_candidate_matches_fp64_at_an_xl_shape(candidate, block, monkeypatch):
    torch.manual_seed(0)
    B, H, W, C = XL_SHAPE
    chosen = use_gemm_candidate(monkeypatch, candidate)
    ops = ("convnext_block",) if block is fcdm_kernels.convnext_block else ("dwconv_ln_modulate", "grn_mlp")
    with runs_on("triton", *ops):
        assert_block_matches_fp64(block, block_args(B, H, W, C, torch.bfloat16, torch.device("cuda")),
                                  torch.bfloat16, f"GEMM tuning candidate {candidate}")
    assert {op for op, _ in chosen} == set(GEMMS), chosen
    for op, cfg in chosen:
        cands = candidates(op, C if op == "gemm2" else 3 * C)
        assert cfg == cands[min(candidate, len(cands) - 1)], (op, cfg)
