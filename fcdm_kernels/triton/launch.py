"""Launch heuristics for every Triton kernel of the FCDM block, in one place.

Block sizes and warps are chosen here and nowhere else. Nothing runs at import: configs are built on first use, and
on CUDA the GEMM configs are tuned once per (op, C, H*W, dtype) by timing a small candidate set on scratch outputs
(so kernels that accumulate with atomics are never run twice into a real buffer) and cached for the process.

On CPU tensors the kernels run under TRITON_INTERPRET=1, where the cost is per program, so the CPU configs use few,
large programs. The interpreter also multiplies bf16 tl.dot operands wrongly (Triton 3.9), so there the GEMM operands
are widened to fp32 first, which is exactly what tensor cores compute (bf16 products are exact in fp32).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

# Set by tests (monkeypatch) to make every output buffer start as NaN, so an unwritten element cannot pass.
POISON_OUTPUTS = False


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (as the CUDA extension's DeviceGuard does)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output the kernels overwrite completely (NaN-filled when POISON_OUTPUTS is set)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def interpreting(device: torch.device) -> bool:
    """True when kernels run under the Triton CPU interpreter rather than on a GPU."""
    return device.type != "cuda"


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Widen tl.dot operands to fp32: always for fp32 data (IEEE, no TF32), and under the interpreter."""
    return dtype == torch.float32 or interpreting(device)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@dataclass(frozen=True)
class TileConfig:
    """A tile shape for the elementwise/stencil kernels: pixels x channels, and warps."""
    block_p: int
    block_c: int
    num_warps: int


def dwconv_config(channels: int, pixels: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Forward and norm-backward of dwconv_ln_modulate: each program owns BLOCK_P pixels of one sample across all C
    channels, so the LayerNorm statistics never leave the program."""
    block_c = _pow2(channels)
    if interpreting(device):
        return TileConfig(min(_pow2(pixels), max(1, 16384 // block_c)), block_c, 4)
    # 4k fp32 accumulators per program keep every FCDM width (C = 512: 8 pixels, C = 2048: 2 pixels) free of spills
    # on sm_90 with Triton 3.6 and 3.9 on 4 warps, except fp32 inputs and C = 1024, which need 8 (with 4, ptxas
    # spills or keeps a stack frame of 16-40 B there). `compile_check --fail-on-spill` checks every width.
    block_p = max(1, min(_pow2(pixels), 4096 // block_c))
    return TileConfig(block_p, block_c, 8 if dtype == torch.float32 or block_c == 1024 else 4)


def dwconv_grad_config(channels: int, pixels: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Input/weight backward of the depthwise conv: channel-blocked, with many pixels per program so the per-tile
    partial sums of dW (49 x C floats per tile) stay small."""
    if interpreting(device):
        block_c = _pow2(channels)
        return TileConfig(min(_pow2(pixels), max(1, 16384 // block_c)), block_c, 4)
    block_c = min(_pow2(channels), 64)
    # fp32 tiles take twice the registers of bf16 ones: 128 x 64 spills 584 B on sm_90 (ptxas), 64 x 64 none.
    elements = 4096 if dtype == torch.float32 else 8192
    return TileConfig(min(_pow2(pixels), elements // block_c), block_c, 8)


def rows_config(cols: int, device: torch.device) -> TileConfig:
    """Row-tiled elementwise + per-sample reduction kernels over (B*H*W, cols)."""
    if interpreting(device):
        block_c = min(_pow2(cols), 256)
        return TileConfig(max(16, 16384 // block_c), block_c, 4)
    block_c = min(_pow2(cols), 256)
    return TileConfig(max(8, 8192 // block_c), block_c, 8)


def vector_block(n: int, device: torch.device) -> int:
    """Block length for the tiny per-sample kernels over J hidden channels."""
    return min(_pow2(n), 4096 if interpreting(device) else 1024)


@dataclass(frozen=True)
class GemmConfig:
    """A GEMM tile: BLOCK_M x BLOCK_N output, BLOCK_K reduction step, grouped launch order, warps and stages."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def gemm_candidates(op: str, n: int, dtype: torch.dtype) -> list[GemmConfig]:
    """A small H100 candidate set, the untuned default first; fp32 (IEEE FMA, no tensor cores) gets smaller tiles.

    The dy GEMMs carry a heavy epilogue (the saved pre-activation and two per-sample tables as fp32 tiles), so their
    default is 128 x 64: at 128 x 128 ptxas spills 456 B (dy_stats) and 1136 B (dy_gelu) in bf16 on sm_90, at
    128 x 64 none. 128 x 128 stays a candidate for the tuner to time. `compile_check --fail-on-spill` checks every
    default."""
    if dtype == torch.float32:
        return [GemmConfig(64, 64, 32, num_warps=4, num_stages=3), GemmConfig(128, 64, 32, num_warps=8, num_stages=3)]
    if op.startswith("dy"):
        cands = [GemmConfig(128, 64, 64, num_warps=8, num_stages=3), GemmConfig(64, 64, 64, num_warps=4, num_stages=4),
                 GemmConfig(128, 128, 64, num_warps=8, num_stages=3)]
        if dtype == torch.float16:  # fp16's epilogue converts differently: 128 x 64 spills 16 B there, this none
            cands.insert(0, GemmConfig(64, 64, 64, num_warps=8, num_stages=3))
    else:
        cands = [GemmConfig(128, 128, 64, num_warps=8, num_stages=3),
                 GemmConfig(128, 256, 64, num_warps=8, num_stages=3),
                 GemmConfig(64, 128, 64, num_warps=4, num_stages=4)]
    fitting = [c for c in cands if c.block_n <= max(_pow2(n), 64)]
    # Narrow outputs (N <= 64, e.g. GEMM2 of a C = 32 model) fit none of the wide tiles: one 64-column tile covers them.
    return fitting or [GemmConfig(128, 64, 64, num_warps=4, num_stages=3), GemmConfig(64, 64, 64, num_warps=4,
                                                                                    num_stages=4)]


def _gemm_interpreter_config(m: int, n: int, k: int) -> GemmConfig:
    return GemmConfig(min(_pow2(m), 128), min(max(_pow2(n), 16), 128), min(max(_pow2(k), 16), 64), 8, 1, 1)


_TUNED: dict[tuple, GemmConfig] = {}


def gemm_config(op: str, m: int, n: int, k: int, pixels: int, dtype: torch.dtype, device: torch.device,
                run) -> GemmConfig:
    """The GEMM config for `op` at this shape. `run(config)` launches once on scratch outputs; on CUDA it is timed
    for each candidate the first time a (op, N, K, H*W, dtype) key is seen, and the fastest is cached.
    FCDM_TRITON_TUNE=0 takes the first candidate untimed (saves the compile time of the others)."""
    if interpreting(device):
        return _gemm_interpreter_config(m, n, k)
    key = (op, n, k, pixels, dtype)
    if key not in _TUNED:
        cands = gemm_candidates(op, n, dtype)
        if len(cands) == 1 or os.environ.get("FCDM_TRITON_TUNE", "1") == "0":
            _TUNED[key] = cands[0]
        else:
            from triton.testing import do_bench
            times = []
            for cfg in cands:
                try:
                    times.append((do_bench(lambda: run(cfg), warmup=5, rep=20), cfg))
                except Exception:  # a config that does not fit this GPU's shared memory is simply skipped
                    continue
            if not times:
                raise RuntimeError(f"no Triton GEMM config could run {op} at N={n}, K={k}")
            _TUNED[key] = min(times, key=lambda tc: tc[0])[1]
    return _TUNED[key]


H100_SMS = 132  # programs to fill when choosing the dW2 split over samples


def dw2_dgate_config(C: int, J: int, P: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile of the block's dW2 + dgate GEMM: (C, J) output tile, the pixel step of its per-sample reduction, and
    launch options."""
    if interpreting(device):
        return dict(BLOCK_C=min(max(_pow2(C), 16), 64), BLOCK_J=min(max(_pow2(J), 16), 128),
                    BLOCK_P=min(max(_pow2(P), 16), 64), num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_C=64, BLOCK_J=64, BLOCK_P=32, num_warps=4, num_stages=3)
    return dict(BLOCK_C=128, BLOCK_J=128, BLOCK_P=64, num_warps=8, num_stages=3)
