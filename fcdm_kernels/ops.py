"""The public fused ops. Each validates its inputs once, then runs the backend that `dispatch` resolves.

Contract shared by every backend (reference, Triton, CUDA):
* activations are contiguous channels-last tensors (B, H, W, C);
* every tensor argument has the dtype and device of the activations (the model casts fp32 master weights under
  autocast), and statistics and accumulations are fp32 inside the kernels;
* outputs are new contiguous tensors of the activation dtype; gradients flow to every tensor argument.
"""
from __future__ import annotations

from . import dispatch
from .reference import LN_EPS, dwconv_ln_modulate_reference, grn_mlp_reference
from .validate import check_nhwc, check_tensor

dispatch.register("dwconv_ln_modulate", "torch")(dwconv_ln_modulate_reference)
dispatch.register("grn_mlp", "torch")(grn_mlp_reference)


def check_dwconv_ln_modulate_args(x, weight, bias, shift, scale) -> None:
    # The channel count comes from the weight, so an NCHW x is reported as such rather than as a bad weight.
    channels = weight.shape[0] if hasattr(weight, "dim") and weight.dim() == 3 else None
    check_nhwc("x", x, channels=channels)
    B, C = x.shape[0], x.shape[-1]
    check_tensor("weight", weight, shape=(C, 7, 7), like=x)
    check_tensor("bias", bias, shape=(C,), like=x)
    check_tensor("shift", shift, shape=(B, C), like=x)
    check_tensor("scale", scale, shape=(B, C), like=x)


def dwconv_ln_modulate(x, weight, bias, shift, scale, eps: float = LN_EPS):
    """h = LayerNorm_C(depthwise_conv7x7(x) + bias) * (1 + scale) + shift, all NHWC.

    x: (B, H, W, C); weight: (C, 7, 7); bias: (C,); shift, scale: (B, C) -> (B, H, W, C).
    """
    check_dwconv_ln_modulate_args(x, weight, bias, shift, scale)
    return dispatch.implementation("dwconv_ln_modulate", x)(x, weight, bias, shift, scale, eps)


def check_grn_mlp_args(h, x, gate, w1, b1, gamma, beta, w2, b2) -> None:
    check_nhwc("x", x)
    B, H, W, C = x.shape
    check_tensor("h", h, shape=(B, H, W, C), like=x)
    check_tensor("gate", gate, shape=(B, C), like=x)
    check_tensor("w1", w1, shape=(None, C), like=x)
    J = w1.shape[0]
    check_tensor("b1", b1, shape=(J,), like=x)
    check_tensor("gamma", gamma, shape=(J,), like=x)
    check_tensor("beta", beta, shape=(J,), like=x)
    check_tensor("w2", w2, shape=(C, J), like=x)
    check_tensor("b2", b2, shape=(C,), like=x)


def grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2):
    """out = x + gate * (GRN(GELU(h W1^T + b1)) W2^T + b2), all NHWC.

    h, x: (B, H, W, C); gate: (B, C); w1: (J, C); b1, gamma, beta: (J,); w2: (C, J); b2: (C,) -> (B, H, W, C).
    """
    check_grn_mlp_args(h, x, gate, w1, b1, gamma, beta, w2, b2)
    return dispatch.implementation("grn_mlp", x)(h, x, gate, w1, b1, gamma, beta, w2, b2)


def convnext_block(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
    """The whole block: grn_mlp(dwconv_ln_modulate(x, ...), x, ...), all NHWC.

    A backend may register a single `convnext_block` implementation (which can, for example, recompute h from x in
    the backward instead of saving it); otherwise the block runs as the two ops. dispatch.block_plan decides. x: (B, H, W, C); shift, scale, gate: (B, C); dw_weight: (C, 7, 7); dw_bias: (C,); w1: (J, C);
    b1, gamma, beta: (J,); w2: (C, J); b2: (C,) -> (B, H, W, C).
    """
    check_dwconv_ln_modulate_args(x, dw_weight, dw_bias, shift, scale)
    check_grn_mlp_args(x, x, gate, w1, b1, gamma, beta, w2, b2)
    plan = dispatch.block_plan(x)
    if plan.fused is not None:
        return plan.fused(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2)
    h = plan.dwconv_ln_modulate(x, dw_weight, dw_bias, shift, scale, LN_EPS)
    return plan.grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2)
