"""The whole FCDM block as one Triton op, saving for its backward only x, pre (the GELU input) and small vectors.

The two ops composed (dwconv_ln_modulate, then grn_mlp) save x, h, pre and z: 12 C bytes per pixel in bf16. This op
saves x and pre (2 C + 6 C) plus per-sample vectors, and in its backward
* recomputes h from x with the dwconv_ln_modulate forward kernel (memory-bound: reads x, writes h), and
* never needs z: dgate[b, c] = sum_p g z = sum_k M_b[c, k] W2[c, k] + fbias[c] sum_p g[b, p, c], with
  M_b = g_b^T (u s)_b, the per-sample slice of the dW2 product. One Triton GEMM accumulates M_b tile by tile, adds
  gate[b] * M_b into dW2 and reduces M_b * W2 into dgate (one partial per J tile) at the end of each sample, so dgate
  costs no extra tensor-core FLOPs, and neither z nor the (B, C, J) stack of M_b is ever stored. (dW2 = sum_b gate[b] M_b + db2 beta^T: the
  folded bias W2 beta + b2 depends on W2 as well.)

Everything else reuses the kernels of dwconv_ln_modulate.py and grn_mlp.py (maths in fcdm_kernels/reference.py).
Reference: fcdm_kernels.reference.convnext_block_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..determinism import deterministic
from ..reference import LN_EPS
from . import grn_mlp as mlp
from . import launch
from .dwconv_ln_modulate import dwconv_ln_modulate_backward, dwconv_ln_modulate_forward


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dw2_dgate_kernel(
    G,       # (B * P, C) gradient of out
    US,      # (B * P, J) u * s, GEMM2's A operand
    GATE,    # (B, C)
    W2,      # (C, J) pwconv2 weight
    PART_W,  # (n_splits, C, J) fp32 out: sum over this split's samples of gate[b] * M_b
    DGATE,   # sum over j of M_b * W2 (the z-part of dgate): (B, C) fp32 zeros when ATOMIC, else (J tiles, B, C)
             # partial sums, one per J tile
    C, J, P, samples_per_split, B,
    DOT_FP32: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # M_b[c, j] = sum_p g[b, p, c] us[b, p, j] lives only in this tile's accumulator, one sample at a time.
    pid_cj = tl.program_id(0)
    split = tl.program_id(1)
    num_j = tl.cdiv(J, BLOCK_J)
    pid_j = pid_cj % num_j
    cs = (pid_cj // num_j) * BLOCK_C + tl.arange(0, BLOCK_C)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    c_mask = cs < C
    j_mask = js < J
    cj_mask = c_mask[:, None] & j_mask[None, :]
    # Kept in the storage dtype: an fp32 copy would cost the registers of a third accumulator.
    w2 = tl.load(W2 + cs[:, None] * J + js[None, :], mask=cj_mask, other=0.0)
    acc_w = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
    b_first = split * samples_per_split
    b_last = tl.minimum(b_first + samples_per_split, B)
    for i in range(0, b_last - b_first):
        b = b_first + i                                 # a tensor, also under the interpreter
        base = b.to(tl.int64) * P
        m = tl.zeros((BLOCK_C, BLOCK_J), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            p_mask = ps < P
            # g read transposed: a (BLOCK_C, BLOCK_P) tile of the row-major (pixels, C) gradient.
            gt = tl.load(G + (base + ps[None, :]) * C + cs[:, None], mask=c_mask[:, None] & p_mask[None, :],
                         other=0.0)
            us = tl.load(US + (base + ps[:, None]) * J + js[None, :], mask=p_mask[:, None] & j_mask[None, :],
                         other=0.0)
            if DOT_FP32:
                m = tl.dot(gt.to(tl.float32), us.to(tl.float32), m, input_precision="ieee")
            else:
                m = tl.dot(gt, us, m)
        gate = tl.load(GATE + b * C + cs, mask=c_mask, other=0.0).to(tl.float32)
        acc_w += gate[:, None] * m
        dgate = tl.sum(m * w2.to(tl.float32), axis=1)
        if ATOMIC:
            tl.atomic_add(DGATE + b * C + cs, dgate, mask=c_mask, sem="relaxed")
        else:
            tl.store(DGATE + (pid_j * B + b).to(tl.int64) * C + cs, dgate, mask=c_mask)
    tl.store(PART_W + (split.to(tl.int64) * C + cs[:, None]) * J + js[None, :], acc_w, mask=cj_mask)


# ---------------------------------------------------------------------------------------------------------- launchers
def dw2_dgate(g2, us, gate, w2, P):
    """(dW2 without its db2 beta^T term, fp32 (C, J); the z-part of dgate, fp32 (B, C)) from g and u * s."""
    M, C = g2.shape
    B, J = gate.shape[0], us.shape[1]
    dev = g2.device
    meta = launch.dw2_dgate_config(C, J, P, g2.dtype, dev)
    tiles = triton.cdiv(C, meta["BLOCK_C"]) * triton.cdiv(J, meta["BLOCK_J"])
    # Split the samples so that small (C, J) grids still fill the GPU; the interpreter splits in two so tests cover it.
    splits = min(B, 2) if launch.interpreting(dev) else min(B, max(1, triton.cdiv(2 * launch.H100_SMS, tiles)))
    per_split = triton.cdiv(B, splits)
    splits = triton.cdiv(B, per_split)
    part_w = launch.empty((splits, C, J), torch.float32, dev)
    atomic = not deterministic()
    # Each J tile adds its share of dgate[b, c]: as a column sum over the J tiles of (B * C) values.
    dgate = mlp.ProgramSums(B * C, triton.cdiv(J, meta["BLOCK_J"]), 1, dev, atomic)
    _dw2_dgate_kernel[launch.checked_grid(tiles, splits)](g2, us, gate, w2, part_w, dgate.buffer, C, J, P, per_split,
                                                          B, DOT_FP32=launch.dot_in_fp32(g2.dtype, dev),
                                                          ATOMIC=atomic, **meta)
    return part_w.sum(0) if splits > 1 else part_w[0], dgate.result().view(B, C)


def convnext_block_forward(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, save: bool):
    """out (B, H, W, C); with `save`, pre (B*H*W, J) for the backward (else empty); ss and s (B, J) fp32."""
    h = dwconv_ln_modulate_forward(x, dw_weight, dw_bias, shift, scale, LN_EPS)
    out, pre, _, ss, s = mlp.grn_mlp_forward(h, x, gate, w1, b1, gamma, beta, w2, b2, save, save_z=False)
    return out, pre, ss, s


def convnext_block_backward(g, x, shift, scale, gate, dw_weight, dw_bias, w1, gamma, beta, w2, b2, pre, ss, s):
    """All twelve input gradients from g, x, pre, the GRN vectors and the parameters (see the module docstring).

    h is recomputed for dw1 alone; an empty shift says dw1 is not wanted, and then h is not recomputed and dw1 comes
    back zero."""
    B, H, W, C = x.shape
    P, M = H * W, B * H * W
    dt = x.dtype
    g2 = g.reshape(M, C)
    h2 = dwconv_ln_modulate_forward(x, dw_weight, dw_bias, shift, scale, LN_EPS).view(M, C) if shift.numel() \
        else None

    dz, db2, gsum = mlp.gate_backward(g2, None, gate, P)    # gsum = sum_p g: z is never saved

    us, a_sum = mlp.dy_grn_stats(dz, w2, pre, s, P)
    dw2, dgate = dw2_dgate(g2, us, gate, w2, P)
    del us
    beta32 = beta.float()
    # z = (u s) W2^T + fbias, so sum_p g z has a bias part fbias * sum_p g; fbias = W2 beta + b2 makes dW2 pick up
    # db2 beta^T as well.
    dgate = dgate + gsum * torch.addmv(b2.float(), w2.float(), beta32)[None, :]
    dw2 = dw2 + torch.outer(db2, beta32)
    dh, dw1, db1, dgamma = mlp.hidden_backward(dz, w1, w2, pre, ss, s, a_sum, gamma, h2)
    del h2, dz
    # dx = g (the residual's gradient) + the conv path's, added in the dwconv backward's own pass.
    dx, ddw, ddb, dshift, dscale = dwconv_ln_modulate_backward(dh.view(B, H, W, C), x, dw_weight, dw_bias, scale,
                                                               LN_EPS, residual=g)
    dbeta = torch.mv(w2.float().t(), db2)                  # every pixel's dy sums to db2 W2
    return (dx, dshift, dscale, dgate.to(dt), ddw, ddb, dw1, db1, dgamma, dbeta.to(dt), dw2.to(dt), db2.to(dt))


# ------------------------------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("fcdm::convnext_block_triton", mutates_args=())
def convnext_block_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                      dw_weight: torch.Tensor, dw_bias: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                      gamma: torch.Tensor, beta: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, save: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pre, ss, s): the block's result and what its backward needs (pre empty unless `save`)."""
    with launch.on_device(x):
        return convnext_block_forward(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, save)


@convnext_block_op.register_fake
def _(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, save):
    B, H, W, C = x.shape
    M, J = B * H * W, w1.shape[0]
    return (torch.empty_like(x), x.new_empty((M, J) if save else (0,)), x.new_empty((B, J), dtype=torch.float32),
            x.new_empty((B, J), dtype=torch.float32))


@torch.library.custom_op("fcdm::convnext_block_triton_backward", mutates_args=())
def convnext_block_backward_op(
        g: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
        dw_weight: torch.Tensor, dw_bias: torch.Tensor, w1: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
        w2: torch.Tensor, b2: torch.Tensor, pre: torch.Tensor, ss: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2) from that of out."""
    with launch.on_device(x):
        return convnext_block_backward(g, x, shift, scale, gate, dw_weight, dw_bias, w1, gamma, beta, w2, b2, pre,
                                       ss, s)


@convnext_block_backward_op.register_fake
def _(g, x, shift, scale, gate, dw_weight, dw_bias, w1, gamma, beta, w2, b2, pre, ss, s):
    return (torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale), torch.empty_like(gate),
            torch.empty_like(dw_weight), torch.empty_like(dw_bias), torch.empty_like(w1),
            w1.new_empty(w1.shape[:1]), torch.empty_like(gamma), torch.empty_like(beta), torch.empty_like(w2),
            torch.empty_like(b2))


def _setup_context(ctx, inputs, output):
    x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2, save = inputs
    _, pre, ss, s = output
    # No (B, H, W, C) tensor besides x: h is recomputed from x and z is never needed (module docstring). shift serves
    # only that recomputation, which serves only dw1: without dw1 wanted, neither happens.
    needs_dw1 = ctx.needs_input_grad[6]
    ctx.save_for_backward(x, shift if needs_dw1 else shift.new_empty(0), scale, gate, dw_weight, dw_bias, w1, gamma,
                          beta, w2, b2, pre, ss, s)
    ctx.saved_activations = save


def _backward(ctx, g, *unused_grads):
    if not ctx.saved_activations:
        raise RuntimeError("fcdm::convnext_block_triton was called with save=False, so it cannot be differentiated")
    grads = convnext_block_backward_op(g.contiguous(), *ctx.saved_tensors)
    return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:12])) + (None,)


convnext_block_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------- wrapper
def convnext_block(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
    """The whole block on NHWC x; arguments checked by fcdm_kernels.ops.convnext_block."""
    args = (x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2)
    # pre is written only when a gradient can flow.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    return convnext_block_op(*args, save)[0]
