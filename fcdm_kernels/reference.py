"""Plain-PyTorch references for the fused ops of the FCDM block, in channels-last (NHWC) layout.

These are the truth every Triton and CUDA kernel is tested against, and the `torch` backend (the CPU default). They
follow the official block's order of operations exactly (star-kwon/FCDM `ConvNeXtBlock`), so a model built on them
reproduces official checkpoints. With `upcast=True` the maths runs in fp32 (or stays fp64) and the result is cast back,
which is how tests build a high-precision oracle from low-precision inputs.

The block (docs/kernels.md):
    h   = LayerNorm_C(dwconv7x7(x) + bdw) * (1 + scale) + shift          -> dwconv_ln_modulate
    u   = GELU(h W1^T + b1);  y = gamma * (u * N(u)) + beta + u           -> grn_mlp (GRN, ConvNeXt-V2 eq. 1-3)
    out = x + gate * (y W2^T + b2)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LN_EPS = 1e-6   # LayerNorm eps of the official block (LayerNorm2d(eps=1e-6))
GRN_EPS = 1e-6  # added to the channel mean of the GRN norms


def _compute_dtype(t: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def dwconv_ln_modulate_reference(x, weight, bias, shift, scale, eps: float = LN_EPS, upcast: bool = False):
    """Depthwise 7x7 conv (+bias, zero padding 3) -> LayerNorm over C (no affine) -> * (1 + scale) + shift.

    x: (B, H, W, C); weight: (C, 7, 7); bias: (C,); shift, scale: (B, C). Returns h: (B, H, W, C).
    """
    out_dtype = x.dtype
    dt = _compute_dtype(x, upcast)
    x, weight, bias, shift, scale = (t.to(dt) for t in (x, weight, bias, shift, scale))
    C = x.shape[-1]
    h = F.conv2d(x.permute(0, 3, 1, 2), weight.unsqueeze(1), bias, padding=3, groups=C)  # (B, C, H, W)
    h = F.layer_norm(h.permute(0, 2, 3, 1), (C,), eps=eps)                                # (B, H, W, C)
    h = torch.addcmul(shift[:, None, None, :], h, scale[:, None, None, :] + 1)
    return h.to(out_dtype)


def grn(u, gamma, beta, eps: float = GRN_EPS):
    """Global Response Normalization on NHWC u: gamma * (u * N) + beta + u with N = G / (mean_c G + eps)."""
    g = torch.linalg.vector_norm(u, ord=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, J)
    n = g / (g.mean(dim=-1, keepdim=True) + eps)
    return gamma * (u * n) + beta + u


def grn_mlp_reference(h, x, gate, w1, b1, gamma, beta, w2, b2, upcast: bool = False):
    """Pointwise MLP with GRN, gated residual: x + gate * (GRN(GELU(h W1^T + b1)) W2^T + b2).

    h, x: (B, H, W, C); gate: (B, C); w1: (J, C); b1, gamma, beta: (J,); w2: (C, J); b2: (C,).
    Returns out: (B, H, W, C).
    """
    out_dtype = x.dtype
    dt = _compute_dtype(x, upcast)
    h, x, gate, w1, b1, gamma, beta, w2, b2 = (t.to(dt) for t in (h, x, gate, w1, b1, gamma, beta, w2, b2))
    u = F.gelu(F.linear(h, w1, b1))          # (B, H, W, J), exact erf GELU
    y = grn(u, gamma, beta)
    z = F.linear(y, w2, b2)                  # (B, H, W, C)
    return (x + z * gate[:, None, None, :]).to(out_dtype)


def convnext_block_reference(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2,
                             upcast: bool = False):
    """The whole FCDM block on NHWC x, given its modulation vectors; the composition of the two ops above."""
    h = dwconv_ln_modulate_reference(x, dw_weight, dw_bias, shift, scale, upcast=upcast)
    return grn_mlp_reference(h, x, gate, w1, b1, gamma, beta, w2, b2, upcast=upcast)
