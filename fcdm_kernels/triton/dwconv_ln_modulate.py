"""Triton dwconv7x7 + bias -> LayerNorm over C (no affine) -> * (1 + scale[b]) + shift[b], forward and backward.

Design: a program owns a tile of pixels of one sample across *all* C channels, so the conv output never leaves
registers before the LayerNorm statistics are taken; the 3-pixel halo is read through masked shifted loads (zero
padding). The backward saves nothing but x: it recomputes h0 and the normalised value in the same one-pass shape, then
runs a channel-blocked stencil pass for dx (the flipped conv) and dW. Each backward program sums its parameter
gradients over several tiles, so the fp32 partial sums (which torch reduces in a fixed order) stay a small fraction of
x at every shape. Batches beyond CUDA's 65,535 programs on a grid's second axis are launched in slices.

Reference: fcdm_kernels.reference.dwconv_ln_modulate_reference (its autograd gives the backward the kernels implement).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .cast import round_to

KSIZE = 7
TAPS = KSIZE * KSIZE


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dwconv_tile(X, WT, BIAS, offs, oy, ox, mask_p, offs_c, mask_c, H, W, C,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """fp32 conv7x7 + bias for a (BLOCK_P, BLOCK_C) tile. X points at the sample's first pixel and offs are the tile's
    int32 offsets from it; WT is (49, C)."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # ky is a runtime loop and kx unrolled: 7 taps in flight is enough to hide latency, and 49 would exhaust the
    # registers. Each tap is the tile's own offsets shifted by a scalar, under a mask that zero-pads the border.
    for ky in range(7):
        iy = oy + (ky - 3)
        row_ok = mask_p & (iy >= 0) & (iy < H)
        row_shift = (ky - 3) * W * C
        for kx in tl.static_range(7):
            ix = ox + (kx - 3)
            ok = row_ok & (ix >= 0) & (ix < W)
            if EVEN_C:
                xv = tl.load(X + offs + (row_shift + (kx - 3) * C), mask=ok[:, None], other=0.0)
                wv = tl.load(WT + (ky * 7 + kx) * C + offs_c)
            else:
                xv = tl.load(X + offs + (row_shift + (kx - 3) * C), mask=ok[:, None] & mask_c[None, :], other=0.0)
                wv = tl.load(WT + (ky * 7 + kx) * C + offs_c, mask=mask_c, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    bias = tl.load(BIAS + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _layernorm_tile(h0, mask_c, C, eps):
    """(normalised value, rstd) of a tile whose rows are pixels; padded channels come out as 0."""
    mean = tl.sum(h0, axis=1) / C
    diff = tl.where(mask_c[None, :], h0 - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    return diff * rstd[:, None], rstd


@triton.jit
def _conv_ln_tile(X, WT, BIAS, b, ptile, H, W, C, eps,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """Conv + LayerNorm of pixel tile `ptile` (BLOCK_P pixels) of sample b (int64), across all C channels:
    (x_base, offs, mask_p, offs_c, mask_c, n, rstd), where x_base is the sample's 64-bit base and offs the tile's
    32-bit offsets from it (H*W*C < 2^31 for any FCDM level)."""
    offs_p = ptile * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < H * W
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = b * (H * W) * C
    offs = offs_p[:, None] * C + offs_c[None, :]
    h0 = _dwconv_tile(X + x_base, WT, BIAS, offs, offs_p // W, offs_p % W, mask_p, offs_c, mask_c, H, W, C,
                      BLOCK_P, BLOCK_C, EVEN_C)
    n, rstd = _layernorm_tile(h0, mask_c, C, eps)
    return x_base, offs, mask_p, offs_c, mask_c, n, rstd


@triton.jit
def _dwconv_ln_modulate_fwd_kernel(
    X,       # (B, H, W, C) input
    WT,      # (49, C) conv taps, tap-major
    BIAS,    # (C,)
    SHIFT,   # (B, C)
    SCALE,   # (B, C)
    OUT,     # (B, H, W, C) h
    H, W, C, first_sample, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    # Axis 1 is the sample within this launch; the launcher slices batches beyond CUDA's 65,535 on that axis.
    b = first_sample + tl.program_id(1).to(tl.int64)
    x_base, offs, mask_p, offs_c, mask_c, n, rstd = _conv_ln_tile(X, WT, BIAS, b, tl.program_id(0), H, W, C, eps,
                                                                  BLOCK_P, BLOCK_C, EVEN_C)
    shift = tl.load(SHIFT + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    h = n * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + x_base + offs, round_to(h, OUT.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _dwconv_ln_modulate_bwd_norm_kernel(
    X,            # (B, H, W, C) input (h0 and n are recomputed from it)
    WT,           # (49, C)
    BIAS,         # (C,)
    SCALE,        # (B, C)
    DH,           # (B, H, W, C) gradient of h
    DH0,          # (B, H, W, C) out: gradient of the conv output
    PART,         # (samples of this launch, programs per sample, 3, C) fp32 out: sums over the program's tiles of
                  # dh, dh * n and dh0
    H, W, C, n_ptiles, tiles_per_program, first_sample, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    # A program owns tiles_per_program consecutive pixel tiles of sample first_sample + program_id(1) and sums over
    # them in registers, so the partial sums take 3 C floats per program rather than per tile.
    b = first_sample + tl.program_id(1).to(tl.int64)
    t_first = tl.program_id(0) * tiles_per_program
    t_last = tl.minimum(t_first + tiles_per_program, n_ptiles)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    scale = tl.load(SCALE + b * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    sum_dh = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dhn = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dh0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for ptile in range(t_first, t_last):
        x_base, offs, mask_p, offs_c, mask_c, n, rstd = _conv_ln_tile(X, WT, BIAS, b, ptile, H, W, C, eps, BLOCK_P,
                                                                      BLOCK_C, EVEN_C)
        mask = mask_p[:, None] & mask_c[None, :]
        dh = tl.load(DH + x_base + offs, mask=mask, other=0.0).to(tl.float32)
        dn = dh * (1.0 + scale[None, :])
        # LayerNorm backward: dh0 = rstd * (dn - mean_c(dn) - n * mean_c(dn * n)), per pixel.
        mean_dn = tl.sum(dn, axis=1) / C
        mean_dnn = tl.sum(dn * n, axis=1) / C
        dh0 = rstd[:, None] * (dn - mean_dn[:, None] - n * mean_dnn[:, None])
        dh0 = tl.where(mask, dh0, 0.0)
        tl.store(DH0 + x_base + offs, round_to(dh0, DH0.dtype.element_ty), mask=mask)
        sum_dh += tl.sum(dh, axis=0)
        sum_dhn += tl.sum(dh * n, axis=0)
        sum_dh0 += tl.sum(dh0, axis=0)
    part = (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * 3 * C + offs_c
    tl.store(PART + part, sum_dh, mask=mask_c)
    tl.store(PART + part + C, sum_dhn, mask=mask_c)
    tl.store(PART + part + 2 * C, sum_dh0, mask=mask_c)


@triton.jit
def _dwconv_bwd_input_weight_kernel(
    X,        # (B, H, W, C) input
    DH0,      # (B, H, W, C) gradient of the conv output
    WT,       # (49, C)
    RES,      # (B, H, W, C) gradient added to dx when HAS_RESIDUAL (the block's residual path), else unused
    DX,       # (B, H, W, C) out: dx = conv of dh0 with the flipped kernel (+ RES)
    PART_W,   # (programs along axis 0, 49, C) fp32 out: sum over the program's tiles of dh0 * shifted x
    H, W, C, n_ptiles, total_tiles, tiles_per_program,
    HAS_RESIDUAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Axis 0 walks tiles_per_program consecutive pixel tiles of the batch flattened as sample * n_ptiles + tile (the
    # batch folded into axis 0). Its 49 dW sums cannot stay in registers across tiles, so they accumulate in the
    # program's own PART_W row (L2-resident), behind a barrier per tile: a replicated element may be stored by one
    # thread and read back by another.
    first = tl.program_id(0) * tiles_per_program
    last = tl.minimum(first + tiles_per_program, total_tiles)
    pid_c = tl.program_id(1)
    P = H * W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    part_ptrs = PART_W + tl.program_id(0).to(tl.int64) * 49 * C + offs_c
    for tile in range(first, last):
        b = (tile // n_ptiles).to(tl.int64)
        offs_p = (tile % n_ptiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        oy = offs_p // W
        ox = offs_p % W
        base = b * P * C
        own = offs_p[:, None] * C + offs_c[None, :]
        mask = mask_p[:, None] & mask_c[None, :]
        dh0 = tl.load(DH0 + base + own, mask=mask, other=0.0).to(tl.float32)
        dx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        # The row holds earlier tiles' sums from the second tile on (compared as a vector: the interpreter's scalar
        # comparison does not combine with a vector mask).
        again = mask_c & (tl.full((BLOCK_C,), tile, tl.int32) > first)
        for ky in range(7):
            # dW[c, ky, kx] gathers x at p + (ky-3, kx-3); dx[p] gathers dh0 at p - (ky-3, kx-3).
            iy = oy + (ky - 3)
            jy = oy - (ky - 3)
            x_row_ok = mask_p & (iy >= 0) & (iy < H)
            d_row_ok = mask_p & (jy >= 0) & (jy < H)
            row_shift = (ky - 3) * W * C
            for kx in tl.static_range(7):
                shift = row_shift + (kx - 3) * C
                ix = ox + (kx - 3)
                ok = x_row_ok & (ix >= 0) & (ix < W)
                xs = tl.load(X + base + own + shift, mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                earlier = tl.load(part_ptrs + (ky * 7 + kx) * C, mask=again, other=0.0)
                tl.store(part_ptrs + (ky * 7 + kx) * C, earlier + tl.sum(dh0 * xs, axis=0), mask=mask_c)
                jx = ox - (kx - 3)
                ok = d_row_ok & (jx >= 0) & (jx < W)
                ds = tl.load(DH0 + base + own - shift, mask=ok[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                wv = tl.load(WT + (ky * 7 + kx) * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                dx += ds * wv[None, :]
        if HAS_RESIDUAL:
            dx += tl.load(RES + base + own, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + base + own, round_to(dx, DX.dtype.element_ty), mask=mask)
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------------------- launchers
def _taps_major(weight: torch.Tensor) -> torch.Tensor:
    """(C, 7, 7) -> contiguous (49, C), so a tap's weights for a channel block are one coalesced load."""
    return weight.reshape(weight.shape[0], TAPS).t().contiguous()


def dwconv_ln_modulate_forward(x, weight, bias, shift, scale, eps: float) -> torch.Tensor:
    """Launch the forward kernel; x: (B, H, W, C) -> h: (B, H, W, C)."""
    B, H, W, C = x.shape
    cfg = launch.dwconv_config(C, H * W, x.dtype, x.device)
    out = launch.empty(x.shape, x.dtype, x.device)
    wt = _taps_major(weight)
    n_ptiles = triton.cdiv(H * W, cfg.block_p)
    for b0, nb in launch.sample_slices(B):
        _dwconv_ln_modulate_fwd_kernel[launch.checked_grid(n_ptiles, nb)](
            x, wt, bias, shift, scale, out, H, W, C, b0, eps, BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c,
            EVEN_C=cfg.block_c == C, num_warps=cfg.num_warps)
    return out


def dwconv_ln_modulate_backward(dh, x, weight, bias, scale, eps: float, residual=None):
    """Launch the two backward passes; returns (dx, dweight (C, 7, 7), dbias, dshift, dscale). A `residual`
    gradient (B, H, W, C) is added to dx in the same pass, saving the caller an activation-sized add.

    Besides dx it allocates dh0 (x's shape and dtype) and fp32 partial sums that launch.py keeps within 1/8 of x's
    bytes, or two programs' rows per SM when that is more (docs/kernels.md); every partial is reduced in a fixed
    order, so the gradients are bitwise repeatable."""
    B, H, W, C = x.shape
    P = H * W
    dev = x.device
    wt = _taps_major(weight)
    x_bytes = x.numel() * x.element_size()
    # Pass 1: LayerNorm + modulation backward; a program owns several pixel tiles of one sample across all channels.
    cfg = launch.dwconv_norm_config(C, P, x.dtype, dev)
    n_ptiles = triton.cdiv(P, cfg.block_p)
    split = launch.dwconv_norm_split(B, n_ptiles, C, x_bytes, dev)
    dh0 = launch.empty(x.shape, x.dtype, dev)
    sums = launch.empty((B, 3, C), torch.float32, dev)  # per sample: dshift, dscale, dbias
    part = launch.empty((split.samples_per_launch * split.programs_per_sample, 3, C), torch.float32, dev)
    for b0, nb in launch.sample_slices(B, split.samples_per_launch):
        _dwconv_ln_modulate_bwd_norm_kernel[launch.checked_grid(split.programs_per_sample, nb)](
            x, wt, bias, scale, dh, dh0, part, H, W, C, n_ptiles, split.tiles_per_program, b0, eps,
            BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c, EVEN_C=cfg.block_c == C, num_warps=cfg.num_warps)
        torch.sum(part[:nb * split.programs_per_sample].view(nb, split.programs_per_sample, 3, C), dim=1,
                  out=sums[b0:b0 + nb])
    del part  # the two passes' partial sums are never held at once
    # Pass 2: the depthwise conv's input and weight gradients, channel-blocked.
    gcfg = launch.dwconv_grad_config(C, P, x.dtype, dev)
    g_ptiles = triton.cdiv(P, gcfg.block_p)
    c_blocks = triton.cdiv(C, gcfg.block_c)
    tiles_per_program = launch.dwconv_grad_tiles_per_program(B * g_ptiles, c_blocks, gcfg.block_c, x_bytes, dev)
    programs = triton.cdiv(B * g_ptiles, tiles_per_program)
    dx = launch.empty(x.shape, x.dtype, dev)
    part_w = launch.empty((programs, TAPS, C), torch.float32, dev)
    _dwconv_bwd_input_weight_kernel[launch.checked_grid(programs, c_blocks)](
        x, dh0, wt, x if residual is None else residual, dx, part_w, H, W, C, g_ptiles, B * g_ptiles,
        tiles_per_program, HAS_RESIDUAL=residual is not None, BLOCK_P=gcfg.block_p, BLOCK_C=gcfg.block_c,
        num_warps=gcfg.num_warps)
    # (49, C) -> contiguous (C, 7, 7): the strides the fake kernel promises (inductor checks them)
    dweight = part_w.sum(0).t().contiguous().view(C, KSIZE, KSIZE)
    # Copies, not views of `sums`: a custom op's outputs must not alias each other.
    dshift, dscale = (sums[:, k].to(x.dtype, copy=True) for k in (0, 1))
    return dx, dweight.to(x.dtype), sums[:, 2].sum(0).to(x.dtype), dshift, dscale


# ------------------------------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("fcdm::dwconv_ln_modulate_triton", mutates_args=())
def dwconv_ln_modulate_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor,
                          scale: torch.Tensor, eps: float) -> torch.Tensor:
    """h from x, in one pass; the contract of fcdm_kernels.ops.dwconv_ln_modulate."""
    with launch.on_device(x):
        return dwconv_ln_modulate_forward(x, weight, bias, shift, scale, eps)


@dwconv_ln_modulate_op.register_fake
def _(x, weight, bias, shift, scale, eps):
    return torch.empty_like(x)


@torch.library.custom_op("fcdm::dwconv_ln_modulate_triton_backward", mutates_args=())
def dwconv_ln_modulate_backward_op(
        dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dshift, dscale) from the gradient of h; only x and the parameters are saved."""
    with launch.on_device(x):
        return dwconv_ln_modulate_backward(dh, x, weight, bias, scale, eps)


@dwconv_ln_modulate_backward_op.register_fake
def _(dh, x, weight, bias, scale, eps):
    return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(scale),
            torch.empty_like(scale))


def _setup_context(ctx, inputs, output):
    x, weight, bias, shift, scale, eps = inputs
    # Every gradient but dshift (dh summed over the pixels) recomputes the LayerNorm from x, weight, bias and scale;
    # when dshift alone is wanted nothing is kept.
    ctx.only_shift = not any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
    if not ctx.only_shift:
        ctx.save_for_backward(x, weight, bias, scale)
    ctx.eps = eps


def _backward(ctx, dh):
    if ctx.only_shift:
        return None, None, None, dh.float().sum(dim=(1, 2)).to(dh.dtype), None, None
    x, weight, bias, scale = ctx.saved_tensors
    grads = dwconv_ln_modulate_backward_op(dh.contiguous(), x, weight, bias, scale, ctx.eps)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])) + (None,)


dwconv_ln_modulate_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------- wrapper
def dwconv_ln_modulate(x, weight, bias, shift, scale, eps: float = 1e-6):
    """h = LayerNorm_C(dwconv7x7(x) + bias) * (1 + scale) + shift on NHWC x; arguments checked by fcdm_kernels.ops."""
    return dwconv_ln_modulate_op(x, weight, bias, shift, scale, float(eps))
