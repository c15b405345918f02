"""Triton pointwise MLP with GRN folded in: out = x + gate * (GRN(GELU(h W1^T + b1)) W2^T + b2), forward and backward.

Design: GRN is a per-(sample, channel) scale plus a bias, GRN(u) = u * s[b] + beta (docs/kernels.md), so no GRN
output is ever stored. GEMM1's epilogue applies bias + exact GELU, stores u and sums u^2 per (tile, sample, column); a
tile may straddle samples (B*H*W is tiled flat), so its rows are split by sample. Every sum across programs (ss here,
dgate, db2, the GRN backward's A, db1) is either written as per-tile partial sums that a second pass reduces in a fixed
order (deterministic, the default; fcdm_kernels.determinism) or added with relaxed fp32 atomics. A tiny kernel turns
ss into s[b, j]. GEMM2 scales its A tile by s[b, k] as it loads it and adds the folded bias
W2 beta + b2, multiplies by gate[b] and adds the residual in its epilogue.

The backward saves pre (the GELU input, J per pixel), z (the block branch before the gate, C per pixel), h (an input)
and the fp32 per-sample vectors ss and s. dy = dz W2 is never stored: two Triton GEMMs recompute it, one with an
epilogue that reduces sum_p dy * u per sample (the GRN backward needs it before du can be formed), one with an epilogue
that forms du and dpre. dW2, dh and dW1 are torch.matmul (cuBLAS); dz, dgate and the per-sample GRN algebra are two
small Triton kernels.

Reference: fcdm_kernels.reference.grn_mlp_reference (its autograd gives the backward the kernels implement).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..determinism import deterministic
from ..reference import GRN_EPS
from . import launch
from .cast import round_to

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gelu(pre):
    """Exact (erf) GELU in fp32."""
    return 0.5 * pre * (1.0 + tl.math.erf(pre * SQRT1_2))


@triton.jit
def _add_per_sample(ACC, vals, tile, rows, row_start, row_end, cols, col_mask, P, N, ATOMIC: tl.constexpr):
    """For every sample b that row tile `tile` touches, the sum of vals over the tile's rows of b: added into ACC[b, col]
    with relaxed atomics (ATOMIC), or stored into row tile + b of ACC, a (tiles + B - 1, N) table of partial sums that
    _per_sample_sum_kernel reduces. tile + b grows strictly along the rows, so no two (tile, sample) pairs share a row."""
    b_lo = row_start // P
    b_hi = (row_end - 1) // P
    for b in range(b_lo, b_hi + 1):
        part = tl.sum(tl.where((rows // P == b)[:, None], vals, 0.0), axis=0)
        if ATOMIC:
            tl.atomic_add(ACC + b * N + cols, part, mask=col_mask, sem="relaxed")
        else:
            tl.store(ACC + (tile + b).to(tl.int64) * N + cols, part, mask=col_mask)


@triton.jit
def _add_columns(ACC, part, tile, cols, col_mask, N, ATOMIC: tl.constexpr):
    """A row tile's column sums `part`: added into ACC (N,) with relaxed atomics (ATOMIC), or stored as row `tile` of
    ACC (tiles, N), which torch sums over its rows."""
    if ATOMIC:
        tl.atomic_add(ACC + cols, part, mask=col_mask, sem="relaxed")
    else:
        tl.store(ACC + tile.to(tl.int64) * N + cols, part, mask=col_mask)


@triton.jit
def _per_sample_sum_kernel(
    PART,    # (tiles + B - 1, N) fp32: row tile + b holds row tile `tile`'s sum over its rows of sample b
    OUT,     # (B, N) fp32 out: the sum over sample b's rows
    P, TILE_ROWS, N,
    BLOCK_N: tl.constexpr,
):
    # Sample b's rows b*P .. (b+1)*P - 1 lie in row tiles first .. last, added in that order whatever ran first.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    first = (b * P) // TILE_ROWS
    last = ((b + 1) * P - 1) // TILE_ROWS
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(first, last + 1):
        acc += tl.load(PART + (tile + b) * N + cols, mask=mask, other=0.0)
    tl.store(OUT + b * N + cols, acc, mask=mask)


@triton.jit
def _per_sample_tile(TABLE, rows, row_start, row_end, cols, col_mask, P, N, AT_MOST_TWO_SAMPLES: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) view of a (B, N) per-sample table, where row r reads sample r // P. A tile holds at most
    two samples when BLOCK_M <= H*W; then the table is read as two vectors rather than gathered as a 2-D tile."""
    sample = rows // P
    if AT_MOST_TWO_SAMPLES:
        b_lo = row_start // P
        b_hi = (row_end - 1) // P
        lo = tl.load(TABLE + b_lo * N + cols, mask=col_mask, other=0.0).to(tl.float32)
        hi = tl.load(TABLE + b_hi * N + cols, mask=col_mask, other=0.0).to(tl.float32)
        tile = tl.where((sample == b_lo)[:, None], lo[None, :], hi[None, :])
    else:
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        tile = tl.load(TABLE + sample[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return tile


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row tiles share each column sweep so B-operand tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile: (row_start, row_end, row0, rows, cols, row_mask, col_mask). row0 is row_start as
    a 64-bit tile base; offsets inside the tile stay 32-bit, as int64 index tensors would cost registers the
    epilogues need."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row_start = pid_m * BLOCK_M
    row_end = tl.minimum(row_start + BLOCK_M, M)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return row_start, row_end, row_start.to(tl.int64), rows, cols, rows < M, cols < N


@triton.jit
def _matmul_tile(A, Bw, local, row_mask, cols, col_mask, K, stride_bk, stride_bn, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A times Bw. A points at the tile's first row of a row-major (M, K) matrix and
    local = arange(BLOCK_M); Bw's (k, n) element is at k * stride_bk + n * stride_bn."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(A + local[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(Bw + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _gemm1_gelu_kernel(
    A,       # (M, K) h, rows are pixels of all samples
    W1,      # (N, K) pwconv1 weight
    B1,      # (N,) pwconv1 bias
    U,       # (M, N) out: GELU(pre)
    PRE,     # (M, N) out: pre, written when SAVE_PRE
    SS,      # sum over pixels of u^2: (B, N) fp32 zeros when ATOMIC, else per-tile partials (_add_per_sample)
    M, N, K, P,
    SAVE_PRE: tl.constexpr, DOT_FP32: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    row_start, row_end, row0, rows, cols, row_mask, col_mask = _gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    local = tl.arange(0, BLOCK_M)
    acc = _matmul_tile(A + row0 * K, W1, local, row_mask, cols, col_mask, K, 1, K, DOT_FP32, BLOCK_M, BLOCK_N,
                       BLOCK_K)
    bias = tl.load(B1 + cols, mask=col_mask, other=0.0).to(tl.float32)
    pre = acc + bias[None, :]
    # GRN statistic of the u that GEMM2 reads, i.e. after rounding to the storage dtype.
    u = round_to(_gelu(pre), U.dtype.element_ty)
    mask = row_mask[:, None] & col_mask[None, :]
    out = local[:, None] * N + cols[None, :]
    tl.store(U + row0 * N + out, u, mask=mask)
    if SAVE_PRE:
        tl.store(PRE + row0 * N + out, round_to(pre, PRE.dtype.element_ty), mask=mask)
    u = u.to(tl.float32)
    u2 = tl.where(mask, u * u, 0.0)
    _add_per_sample(SS, u2, row_start // BLOCK_M, rows, row_start, row_end, cols, col_mask, P, N, ATOMIC)


@triton.jit
def _grn_scale_kernel(
    SS,      # (B, J) fp32: sum over pixels of u^2
    GAMMA,   # (J,)
    S,       # (B, J) fp32 out: s = 1 + gamma * N,  N = G / (mean_j G + eps),  G = sqrt(ss)
    J, eps,
    BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    total = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        total += tl.sqrt(tl.load(SS + b * J + js, mask=js < J, other=0.0))
    inv_m = 1.0 / (tl.sum(total, axis=0) / J + eps)
    for j0 in range(0, J, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        jm = js < J
        g = tl.sqrt(tl.load(SS + b * J + js, mask=jm, other=0.0))
        gamma = tl.load(GAMMA + js, mask=jm, other=0.0).to(tl.float32)
        tl.store(S + b * J + js, 1.0 + gamma * g * inv_m, mask=jm)


@triton.jit
def _gemm2_grn_gate_kernel(
    U,       # (M, K) u = GELU(pre), K = J hidden channels
    S,       # (B, K) fp32 GRN scale, applied to A as it is loaded
    W2,      # (N, K) pwconv2 weight
    FBIAS,   # (N,) fp32 folded bias W2 beta + b2
    GATE,    # (B, N)
    X,       # (M, N) residual
    OUT,     # (M, N) out: x + gate * z
    Z,       # (M, N) out: z, written when SAVE_Z
    M, N, K, P,
    SAVE_Z: tl.constexpr, DOT_FP32: tl.constexpr, AT_MOST_TWO_SAMPLES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    row_start, row_end, row0, rows, cols, row_mask, col_mask = _gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    local = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a_mask = row_mask[:, None] & k_mask[None, :]
        u = tl.load(U + row0 * K + local[:, None] * K + ks[None, :], mask=a_mask, other=0.0)
        s = _per_sample_tile(S, rows, row_start, row_end, ks, k_mask, P, K, AT_MOST_TWO_SAMPLES)
        a = round_to(u.to(tl.float32) * s, U.dtype.element_ty)
        w = tl.load(W2 + cols[None, :] * K + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    mask = row_mask[:, None] & col_mask[None, :]
    z = acc + tl.load(FBIAS + cols, mask=col_mask, other=0.0)[None, :]
    gate = _per_sample_tile(GATE, rows, row_start, row_end, cols, col_mask, P, N, AT_MOST_TWO_SAMPLES)
    out = local[:, None] * N + cols[None, :]
    x = tl.load(X + row0 * N + out, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row0 * N + out, round_to(x + gate * z, OUT.dtype.element_ty), mask=mask)
    if SAVE_Z:
        tl.store(Z + row0 * N + out, round_to(z, Z.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(
    G,       # (M, N) gradient of out
    Z,       # (M, N) saved z, read when WITH_Z (else unused)
    GATE,    # (B, N)
    DZ,      # (M, N) out: g * gate
    SUM_B,   # sum over pixels of g * z when WITH_Z, else of g: (B, N) fp32 zeros when ATOMIC, else partials
    DB2,     # sum over all rows of dz: (N,) fp32 zeros when ATOMIC, else (row tiles, N) partials
    M, N, P,
    WITH_Z: tl.constexpr, AT_MOST_TWO_SAMPLES: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Without z (the whole-block op) dgate's bias part needs sum_p g; its z part comes from the dW2 GEMM.
    row_start = tl.program_id(0) * BLOCK_M
    row_end = tl.minimum(row_start + BLOCK_M, M)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    row0 = row_start.to(tl.int64)
    idx = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
    g = tl.load(G + row0 * N + idx, mask=mask, other=0.0).to(tl.float32)
    gate = _per_sample_tile(GATE, rows, row_start, row_end, cols, col_mask, P, N, AT_MOST_TWO_SAMPLES)
    dz = g * gate
    tl.store(DZ + row0 * N + idx, round_to(dz, DZ.dtype.element_ty), mask=mask)
    tile = tl.program_id(0)
    _add_columns(DB2, tl.sum(dz, axis=0), tile, cols, col_mask, N, ATOMIC)
    if WITH_Z:
        z = tl.load(Z + row0 * N + idx, mask=mask, other=0.0).to(tl.float32)
        _add_per_sample(SUM_B, g * z, tile, rows, row_start, row_end, cols, col_mask, P, N, ATOMIC)
    else:
        _add_per_sample(SUM_B, g, tile, rows, row_start, row_end, cols, col_mask, P, N, ATOMIC)


@triton.jit
def _dy_grn_stats_kernel(
    DZ,      # (M, K) gradient of z, K = C
    W2,      # (K, N) pwconv2 weight (C, J): dy = dz W2
    PRE,     # (M, N) saved GELU input, N = J
    S,       # (B, N) fp32 GRN scale
    US,      # (M, N) out: u * s (GEMM2's A operand, for dW2)
    A_SUM,   # sum over pixels of dy * u: (B, N) fp32 zeros when ATOMIC, else per-tile partials
    M, N, K, P,
    DOT_FP32: tl.constexpr, AT_MOST_TWO_SAMPLES: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dy stays in fp32 registers: it is recomputed by _dy_gelu_bwd_kernel rather than stored and read twice. The two
    # dy kernels write their common start out: a shared helper that loads pre moves the GELU after the load of s here,
    # which raises register spills at the 128x128 tuning tile (benchmarks/NOTES.md, "Compiler facts").
    row_start, row_end, row0, rows, cols, row_mask, col_mask = _gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    local = tl.arange(0, BLOCK_M)
    dy = _matmul_tile(DZ + row0 * K, W2, local, row_mask, cols, col_mask, K, N, 1, DOT_FP32, BLOCK_M, BLOCK_N,
                      BLOCK_K)
    mask = row_mask[:, None] & col_mask[None, :]
    idx = local[:, None] * N + cols[None, :]
    u = _gelu(tl.load(PRE + row0 * N + idx, mask=mask, other=0.0).to(tl.float32))
    s = _per_sample_tile(S, rows, row_start, row_end, cols, col_mask, P, N, AT_MOST_TWO_SAMPLES)
    tl.store(US + row0 * N + idx, round_to(u * s, US.dtype.element_ty), mask=mask)
    _add_per_sample(A_SUM, tl.where(mask, dy * u, 0.0), row_start // BLOCK_M, rows, row_start, row_end, cols, col_mask,
                    P, N, ATOMIC)


@triton.jit
def _grn_bwd_coeff_kernel(
    SS,          # (B, J) fp32 sum over pixels of u^2 (G = sqrt(ss))
    A_SUM,       # (B, J) fp32 sum over pixels of dy * u
    GAMMA,       # (J,)
    COEF,        # (B, J) fp32 out: dG / G, the u-proportional part of du
    DGAMMA,      # (B, J) fp32 out: A * N, summed over b by the launcher
    J, eps,
    BLOCK_J: tl.constexpr,
):
    # GRN backward through N = G / m, m = mean_j G + eps:  dG = dN / m - (sum_j dN G) / (J m^2),  dN = A gamma.
    b = tl.program_id(0).to(tl.int64)
    total_g = tl.zeros((BLOCK_J,), dtype=tl.float32)
    total_dng = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        jm = js < J
        g = tl.sqrt(tl.load(SS + b * J + js, mask=jm, other=0.0))
        dn = tl.load(A_SUM + b * J + js, mask=jm, other=0.0) * tl.load(GAMMA + js, mask=jm, other=0.0).to(tl.float32)
        total_g += g
        total_dng += dn * g
    m = tl.sum(total_g, axis=0) / J + eps
    cross = tl.sum(total_dng, axis=0) / (J * m * m)
    for j0 in range(0, J, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        jm = js < J
        g = tl.sqrt(tl.load(SS + b * J + js, mask=jm, other=0.0))
        a = tl.load(A_SUM + b * J + js, mask=jm, other=0.0)
        gamma = tl.load(GAMMA + js, mask=jm, other=0.0).to(tl.float32)
        dg = a * gamma / m - cross
        # An all-zero channel has G = 0: its norm has subgradient 0 (as in torch), and u = 0 there anyway.
        coef = tl.where(g > 0, dg / tl.where(g > 0, g, 1.0), 0.0)
        tl.store(COEF + b * J + js, coef, mask=jm)
        tl.store(DGAMMA + b * J + js, a * g / m, mask=jm)


@triton.jit
def _dy_gelu_bwd_kernel(
    DZ,      # (M, K) gradient of z, K = C
    W2,      # (K, N) pwconv2 weight (C, J): dy = dz W2
    PRE,     # (M, N) saved GELU input, N = J
    S,       # (B, N) fp32 GRN scale
    COEF,    # (B, N) fp32 dG / G
    DPRE,    # (M, N) out: gradient of pre
    DB1,     # sum over all rows of dpre: (N,) fp32 zeros when ATOMIC, else (row tiles, N) partials
    M, N, K, P,
    DOT_FP32: tl.constexpr, AT_MOST_TWO_SAMPLES: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    row_start, row_end, row0, rows, cols, row_mask, col_mask = _gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    local = tl.arange(0, BLOCK_M)
    dy = _matmul_tile(DZ + row0 * K, W2, local, row_mask, cols, col_mask, K, N, 1, DOT_FP32, BLOCK_M, BLOCK_N,
                      BLOCK_K)
    mask = row_mask[:, None] & col_mask[None, :]
    idx = local[:, None] * N + cols[None, :]
    pre = tl.load(PRE + row0 * N + idx, mask=mask, other=0.0).to(tl.float32)
    s = _per_sample_tile(S, rows, row_start, row_end, cols, col_mask, P, N, AT_MOST_TWO_SAMPLES)
    coef = _per_sample_tile(COEF, rows, row_start, row_end, cols, col_mask, P, N, AT_MOST_TWO_SAMPLES)
    # du = dy s + u dG/G (GRN), then GELU'(x) = Phi(x) + x phi(x).
    du = dy * s + _gelu(pre) * coef
    dgelu = 0.5 * (1.0 + tl.math.erf(pre * SQRT1_2)) + pre * INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
    dpre = tl.where(mask, du * dgelu, 0.0)
    tl.store(DPRE + row0 * N + idx, round_to(dpre, DPRE.dtype.element_ty), mask=mask)
    _add_columns(DB1, tl.sum(dpre, axis=0), row_start // BLOCK_M, cols, col_mask, N, ATOMIC)


# ---------------------------------------------------------------------------------------------------------- launchers
class ProgramSums:
    """A sum that many programs of one launch add to, per sample ((B, N), `samples`=B) or over every row ((N,)).

    Deterministic mode (the default): each of `tiles` row tiles of `tile_rows` rows writes its partial sums (per sample
    split by _add_per_sample), and result() reduces them in a fixed order: _per_sample_sum_kernel, or torch's sum over
    the tiles. Otherwise (`atomic`) the kernel adds into zeros with relaxed atomics and result() is that buffer."""

    def __init__(self, n: int, tiles: int, tile_rows: int, device, atomic: bool, samples: int | None = None,
                 pixels: int = 0):
        self.n, self.tile_rows, self.atomic, self.samples, self.pixels = n, tile_rows, atomic, samples, pixels
        if atomic:
            self.buffer = torch.zeros((n,) if samples is None else (samples, n), dtype=torch.float32, device=device)
        else:
            rows = tiles if samples is None else tiles + samples - 1
            self.buffer = launch.empty((rows, n), torch.float32, device)

    def result(self) -> torch.Tensor:
        if self.atomic:
            return self.buffer
        if self.samples is None:
            return self.buffer.sum(0)
        out = launch.empty((self.samples, self.n), torch.float32, self.buffer.device)
        block = launch.sum_block(self.n, self.buffer.device)
        _per_sample_sum_kernel[launch.checked_grid(self.samples, triton.cdiv(self.n, block))](
            self.buffer, out, self.pixels, self.tile_rows, self.n, BLOCK_N=block)
        return out


def _gemm_grid(M, N, cfg) -> tuple:
    return launch.checked_grid(triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n))


def _launch_gemm1(h2, w1, b1, u, pre, B, P, save_pre, cfg, atomic) -> torch.Tensor:
    """GEMM1 + GELU into u (and pre); returns ss (B, N) fp32."""
    M, K = h2.shape
    N = w1.shape[0]
    ss = ProgramSums(N, triton.cdiv(M, cfg.block_m), cfg.block_m, h2.device, atomic, samples=B, pixels=P)
    _gemm1_gelu_kernel[_gemm_grid(M, N, cfg)](h2, w1, b1, u, pre, ss.buffer, M, N, K, P, SAVE_PRE=save_pre,
                                              DOT_FP32=launch.dot_in_fp32(h2.dtype, h2.device), ATOMIC=atomic,
                                              **cfg.meta())
    return ss.result()


def _launch_gemm2(u, s, w2, fbias, gate, x2, out, z, P, save_z, cfg):
    M, K = u.shape
    N = w2.shape[0]
    _gemm2_grn_gate_kernel[_gemm_grid(M, N, cfg)](u, s, w2, fbias, gate, x2, out, z, M, N, K, P, SAVE_Z=save_z,
                                                  DOT_FP32=launch.dot_in_fp32(u.dtype, u.device),
                                                  AT_MOST_TWO_SAMPLES=cfg.block_m <= P, **cfg.meta())


def gate_backward(g2, z, gate, P):
    """From g (M, C): dz = g * gate (M, C), db2 (C,) fp32 and a per-sample (B, C) fp32 sum: of g * z, or of g alone
    when z is None (the block op, which gets dgate's z part from the dW2 GEMM instead)."""
    M, C = g2.shape
    dev = g2.device
    atomic = not deterministic()
    rc = launch.rows_config(C, dev)
    tiles = triton.cdiv(M, rc.block_p)
    dz = launch.empty((M, C), g2.dtype, dev)
    sum_b = ProgramSums(C, tiles, rc.block_p, dev, atomic, samples=gate.shape[0], pixels=P)
    db2 = ProgramSums(C, tiles, rc.block_p, dev, atomic)
    _gate_bwd_kernel[launch.checked_grid(tiles, triton.cdiv(C, rc.block_c))](
        g2, g2 if z is None else z, gate, dz, sum_b.buffer, db2.buffer, M, C, P, WITH_Z=z is not None,
        AT_MOST_TWO_SAMPLES=rc.block_p <= P, ATOMIC=atomic, BLOCK_M=rc.block_p, BLOCK_N=rc.block_c,
        num_warps=rc.num_warps)
    return dz, db2.result(), sum_b.result()


def grn_mlp_forward(h, x, gate, w1, b1, gamma, beta, w2, b2, save: bool, save_z: bool | None = None):
    """Launch GEMM1+GELU+GRN-stat, the GRN scale and GEMM2+gate+residual.

    Returns out (B, H, W, C), and for the backward pre (B*H*W, J) when `save` and z (B*H*W, C) when `save_z`
    (default: `save`; else empty), ss and s (B, J) fp32.
    """
    save_z = save if save_z is None else save_z
    B, H, W, C = x.shape
    P, M, J = H * W, B * H * W, w1.shape[0]
    dev, dt = x.device, x.dtype
    atomic = not deterministic()
    h2, x2 = h.reshape(M, C), x.reshape(M, C)
    u = launch.empty((M, J), dt, dev)
    pre = launch.empty((M, J) if save else (0,), dt, dev)

    # Tuning runs (CUDA, first call per shape) sum into their own ss; u and pre are simply overwritten.
    def run_gemm1(cfg):
        return _launch_gemm1(h2, w1, b1, u, pre, B, P, save, cfg, atomic)
    ss = run_gemm1(launch.gemm_config("gemm1", M, J, C, P, dt, dev, run_gemm1))

    s = launch.empty((B, J), torch.float32, dev)
    _grn_scale_kernel[launch.checked_grid(B)](ss, gamma, s, J, GRN_EPS, BLOCK_J=launch.vector_block(J, dev))

    # GRN's beta passes through pwconv2 as a constant per output channel.
    fbias = torch.addmv(b2.float(), w2.float(), beta.float())
    out = launch.empty((M, C), dt, dev)
    z = launch.empty((M, C) if save_z else (0,), dt, dev)

    def run(cfg):
        _launch_gemm2(u, s, w2, fbias, gate, x2, out, z, P, save_z, cfg)
    run(launch.gemm_config("gemm2", M, C, J, P, dt, dev, run))
    return out.view(B, H, W, C), pre, z, ss, s


def grn_mlp_backward(g, h, gate, w1, gamma, beta, w2, pre, z, ss, s):
    """Gradients (dh, dgate, dw1, db1, dgamma, dbeta, dw2, db2) from the saved pre, z, ss, s (docs/kernels.md).

    h feeds only dw1 and z only dgate: either may be empty when that gradient is not wanted, and comes back zero."""
    B, H, W, C = g.shape
    P, M = H * W, B * H * W
    dt = g.dtype
    g2 = g.reshape(M, C)
    h2 = h.reshape(M, C) if h.numel() else None

    dz, db2, gate_sum = gate_backward(g2, z if z.numel() else None, gate, P)
    dgate = gate_sum if z.numel() else torch.zeros_like(gate)
    us, a_sum = dy_grn_stats(dz, w2, pre, s, P)
    dw2 = torch.matmul(dz.t(), us)                                   # (C, M) x (M, J) -> (C, J)
    del us
    # The folded bias W2 beta depends on W2 too.
    dw2 = (dw2.float() + torch.outer(db2, beta.float())).to(dt)
    dh, dw1, db1, dgamma = hidden_backward(dz, w1, w2, pre, ss, s, a_sum, gamma, h2)
    # Every pixel's dy sums to db2 W2, so beta's gradient needs no pass over the activations.
    dbeta = torch.mv(w2.float().t(), db2)
    return (dh.view(B, H, W, C), dgate.to(dt), dw1, db1, dgamma, dbeta.to(dt), dw2, db2.to(dt))


def dy_grn_stats(dz, w2, pre, s, P):
    """From dz (M, C): us = u * s (M, J), GEMM2's A operand, and a_sum (B, J) fp32 = sum over pixels of dy * u."""
    M, C = dz.shape
    J = w2.shape[1]
    dev, dt = dz.device, dz.dtype
    atomic = not deterministic()
    us = launch.empty((M, J), dt, dev)

    def run_stats(cfg):
        a_sum = ProgramSums(J, triton.cdiv(M, cfg.block_m), cfg.block_m, dev, atomic, samples=s.shape[0], pixels=P)
        _dy_grn_stats_kernel[_gemm_grid(M, J, cfg)](dz, w2, pre, s, us, a_sum.buffer, M, J, C, P,
                                                    DOT_FP32=launch.dot_in_fp32(dt, dev),
                                                    AT_MOST_TWO_SAMPLES=cfg.block_m <= P, ATOMIC=atomic, **cfg.meta())
        return a_sum.result()
    return us, run_stats(launch.gemm_config("dy_stats", M, J, C, P, dt, dev, run_stats))


def hidden_backward(dz, w1, w2, pre, ss, s, a_sum, gamma, h2):
    """From dz (M, C) and the GRN statistics: (dh (M, C), dw1, db1, dgamma) through GRN, GELU and pwconv1; h2 may
    be None when dw1 is not wanted (then it comes back zero)."""
    M, C = dz.shape
    B, J = s.shape
    P = M // B
    dev, dt = dz.device, dz.dtype
    atomic = not deterministic()
    coef = launch.empty((B, J), torch.float32, dev)
    dgamma_b = launch.empty((B, J), torch.float32, dev)
    _grn_bwd_coeff_kernel[launch.checked_grid(B)](ss, a_sum, gamma, coef, dgamma_b, J, GRN_EPS,
                                                  BLOCK_J=launch.vector_block(J, dev))

    dpre = launch.empty((M, J), dt, dev)

    def run_gelu(cfg):
        db1 = ProgramSums(J, triton.cdiv(M, cfg.block_m), cfg.block_m, dev, atomic)
        _dy_gelu_bwd_kernel[_gemm_grid(M, J, cfg)](dz, w2, pre, s, coef, dpre, db1.buffer, M, J, C, P,
                                                   DOT_FP32=launch.dot_in_fp32(dt, dev),
                                                   AT_MOST_TWO_SAMPLES=cfg.block_m <= P, ATOMIC=atomic, **cfg.meta())
        return db1.result()
    db1 = run_gelu(launch.gemm_config("dy_gelu", M, J, C, P, dt, dev, run_gelu))
    dh = torch.matmul(dpre, w1)                                      # (M, J) x (J, C) -> (M, C)
    dw1 = torch.matmul(dpre.t(), h2) if h2 is not None else torch.zeros_like(w1)  # (J, M) x (M, C) -> (J, C)
    return dh, dw1, db1.to(dt), dgamma_b.sum(0).to(dt)


# ------------------------------------------------------------------------------------------ torch.library op + autograd
@torch.library.custom_op("fcdm::grn_mlp_triton", mutates_args=())
def grn_mlp_op(h: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
               gamma: torch.Tensor, beta: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, save: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, pre, z, ss, s): the op's result and what its backward needs (pre and z empty unless `save`)."""
    with launch.on_device(x):
        return grn_mlp_forward(h, x, gate, w1, b1, gamma, beta, w2, b2, save)


@grn_mlp_op.register_fake
def _(h, x, gate, w1, b1, gamma, beta, w2, b2, save):
    B, H, W, C = x.shape
    M, J = B * H * W, w1.shape[0]
    return (torch.empty_like(x), x.new_empty((M, J) if save else (0,)), x.new_empty((M, C) if save else (0,)),
            x.new_empty((B, J), dtype=torch.float32), x.new_empty((B, J), dtype=torch.float32))


@torch.library.custom_op("fcdm::grn_mlp_triton_backward", mutates_args=())
def grn_mlp_backward_op(
        g: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, w1: torch.Tensor, gamma: torch.Tensor,
        beta: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, z: torch.Tensor, ss: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(dh, dgate, dw1, db1, dgamma, dbeta, dw2, db2) from the gradient of out; dx is g itself (the residual)."""
    with launch.on_device(h):
        return grn_mlp_backward(g, h, gate, w1, gamma, beta, w2, pre, z, ss, s)


@grn_mlp_backward_op.register_fake
def _(g, h, gate, w1, gamma, beta, w2, pre, z, ss, s):
    return (torch.empty_like(g), torch.empty_like(gate), torch.empty_like(w1), w1.new_empty(w1.shape[:1]),
            torch.empty_like(gamma), torch.empty_like(gamma), torch.empty_like(w2), w2.new_empty(w2.shape[:1]))


def _setup_context(ctx, inputs, output):
    h, x, gate, w1, b1, gamma, beta, w2, b2, save = inputs
    _, pre, z, ss, s = output
    # Only what the wanted gradients read: h feeds dw1 alone and z dgate alone (frozen weights keep neither).
    needs = dict(zip(("h", "x", "gate", "w1"), ctx.needs_input_grad))
    ctx.save_for_backward(h if needs["w1"] else h.new_empty(0), gate, w1, gamma, beta, w2, pre,
                          z if needs["gate"] else z.new_empty(0), ss, s)
    ctx.saved_activations = save


def _backward(ctx, g, *unused_grads):
    if not ctx.saved_activations:
        raise RuntimeError("fcdm::grn_mlp_triton was called with save=False, so it cannot be differentiated")
    h, gate, w1, gamma, beta, w2, pre, z, ss, s = ctx.saved_tensors
    dh, dgate, dw1, db1, dgamma, dbeta, dw2, db2 = grn_mlp_backward_op(g.contiguous(), h, gate, w1, gamma, beta, w2,
                                                                         pre, z, ss, s)
    grads = (dh, g, dgate, dw1, db1, dgamma, dbeta, dw2, db2)
    return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:9])) + (None,)


grn_mlp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------- wrapper
def grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2):
    """out = x + gate * (GRN(GELU(h W1^T + b1)) W2^T + b2) on NHWC tensors; arguments checked by fcdm_kernels.ops."""
    args = (h, x, gate, w1, b1, gamma, beta, w2, b2)
    # The activations needed by the backward are written only when a gradient can flow.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    return grn_mlp_op(*args, save)[0]
