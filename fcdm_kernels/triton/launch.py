"""Launch heuristics for every Triton kernel of the FCDM block, in one place.

Block sizes and warps are chosen here and nowhere else. Nothing runs at import: configs are built on first use, and
on CUDA the GEMM configs are tuned once per (op, N, K, H*W, dtype, GPU kind) by timing a small candidate set on
scratch outputs (so kernels that accumulate with atomics are never run twice into a real buffer) and cached for the
process.

Kernels run in the Triton interpreter when TRITON_INTERPRET=1 was set at import (then even CUDA tensors are
interpreted: the interpreter copies them to the host), where the cost is per program, so the interpreter configs use
few, large programs. The interpreter has multiplied bf16 tl.dot operands wrongly (benchmarks/NOTES.md), so there the
GEMM operands are widened to fp32 first, which is exactly what tensor cores compute (bf16 products are exact in fp32).

Where a default below avoids register spills, the ptxas counts behind it are in benchmarks/NOTES.md ("Compiler
facts"), with the Triton release and date they were read under; `compile_check --fail-on-spill` rechecks every
default on the Triton installed.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.testing  # the tuner's timer, looked up at call time (tests replace it)
from triton.compiler.errors import CompilationError
from triton.runtime import errors

from fcdm_kernels import dispatch

from .cast import INTERPRETED

# Set by tests (monkeypatch) to make every output buffer start as NaN, so an unwritten element cannot pass.
POISON_OUTPUTS = False

H100_SMS = 132  # programs to fill when splitting work that would otherwise leave SMs idle
# CUDA's grid limits: 2^31 - 1 programs on axis 0, 65,535 on axes 1 and 2.
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (as the CUDA extension's DeviceGuard does)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output the kernels overwrite completely (NaN-filled when POISON_OUTPUTS is set)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def checked_grid(*dims: int) -> tuple:
    """A launch grid, refused with a ValueError naming the limit when an axis exceeds what CUDA can launch (the
    launchers fold the batch into axis 0 or slice it, so no realistic shape gets here)."""
    for axis, (n, limit) in enumerate(zip(dims, MAX_GRID)):
        if n > limit:
            raise ValueError(f"fcdm: a Triton launch needs {n:,} programs on grid axis {axis}, above CUDA's limit of "
                             f"{limit:,} for that axis (grid {tuple(dims)}); use a smaller batch or image")
    return tuple(dims)


def sample_slices(batch: int, most: int = MAX_GRID[1]):
    """(first sample, samples) of each launch of a kernel whose grid axis 1 is the sample: at most `most` (and CUDA's
    65,535) per launch, so any batch runs."""
    step = max(1, min(most, MAX_GRID[1]))
    return [(b0, min(step, batch - b0)) for b0 in range(0, batch, step)]


def interpreting(device: torch.device) -> bool:
    """True when kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import, any device) rather than
    compiled for a GPU."""
    return INTERPRETED or device.type != "cuda"


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
    # 4k fp32 accumulators per program (C = 512: 8 pixels, C = 2048: 2 pixels) fit in registers on 4 warps; fp32
    # inputs and C = 1024 need 8 warps to stay free of spills.
    block_p = max(1, min(_pow2(pixels), 4096 // block_c))
    return TileConfig(block_p, block_c, 8 if dtype == torch.float32 or block_c == 1024 else 4)


def dwconv_norm_config(channels: int, pixels: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Norm-backward of dwconv_ln_modulate: dwconv_config's tile, halved for fp32, whose three per-program gradient
    sums (kept in registers across tiles) otherwise spill at C = 512 and 1024. A program covers several tiles, so the
    smaller tile costs no partial-sum memory."""
    cfg = dwconv_config(channels, pixels, dtype, device)
    if interpreting(device):
        return cfg
    if dtype == torch.float32:
        block_p = max(1, cfg.block_p // 2)
        # A one-pixel tile (C = 2048) on 8 warps gets too few registers per thread and spills; on 4 warps it does not.
        return TileConfig(block_p, cfg.block_c, 4 if block_p == 1 else cfg.num_warps)
    # From 512 channels on, 8 warps spread the per-channel sums thinly enough that no compiler release we check
    # spills them (benchmarks/NOTES.md); the narrow FCDM-T level keeps the forward's warps.
    return TileConfig(cfg.block_p, cfg.block_c, 8 if cfg.block_c >= 512 else cfg.num_warps)


def dwconv_grad_config(channels: int, pixels: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Input/weight backward of the depthwise conv: channel-blocked tiles of many pixels (a program walks several of
    them, see dwconv_grad_tiles_per_program)."""
    if interpreting(device):
        block_c = _pow2(channels)
        return TileConfig(min(_pow2(pixels), max(1, 16384 // block_c)), block_c, 4)
    block_c = min(_pow2(channels), 64)
    # fp32 tiles take twice the registers of bf16 ones: 128 x 64 spills, 64 x 64 does not.
    elements = 4096 if dtype == torch.float32 else 8192
    return TileConfig(min(_pow2(pixels), elements // block_c), block_c, 8)


# Per-program fp32 partial sums (reduced afterwards in a fixed order) may take 1/PARTIAL_FRACTION of the activation.
PARTIAL_FRACTION = 8


def partial_programs_allowed(row_bytes: int, activation_bytes: int) -> int:
    """How many programs may each hold a row of `row_bytes` fp32 partial sums at once: 1/PARTIAL_FRACTION of the
    activation's bytes, but never fewer than two programs per SM of an H100, since fewer would idle SMs (so at small
    activations the rows may take more than that fraction: at most 264 rows, 6.2 MiB at C = 2048)."""
    return max(2 * H100_SMS, activation_bytes // (PARTIAL_FRACTION * row_bytes))


@dataclass(frozen=True)
class NormSplit:
    """How the norm-backward kernel of dwconv_ln_modulate spreads a sample's pixel tiles over programs and launches."""
    tiles_per_program: int
    programs_per_sample: int
    samples_per_launch: int


def dwconv_norm_split(batch: int, tiles: int, channels: int, activation_bytes: int, device: torch.device) -> NormSplit:
    """Each program sums dshift, dscale and dbias over tiles_per_program pixel tiles in registers and writes one row
    of 3 C floats. Enough programs to fill the GPU a few times over (8 per SM; 2 under the interpreter, so the tests
    cover several per sample), and as many whole samples per launch as partial_programs_allowed permits (all of them
    unless images are tiny and the batch is large)."""
    allowed = partial_programs_allowed(3 * channels * 4, activation_bytes)
    wanted = 2 if interpreting(device) else 8 * H100_SMS
    per_sample = max(1, min(tiles, triton.cdiv(wanted, batch), allowed // batch))
    tiles_per_program = triton.cdiv(tiles, per_sample)
    per_sample = triton.cdiv(tiles, tiles_per_program)
    return NormSplit(tiles_per_program, per_sample, max(1, min(batch, allowed // per_sample)))


def dwconv_grad_tiles_per_program(total_tiles: int, channel_blocks: int, block_c: int, activation_bytes: int,
                                  device: torch.device) -> int:
    """Pixel tiles (of the whole batch) per program of the dx/dW kernel, whose programs each keep a row of 49 x
    BLOCK_C dW sums: enough programs for 4 waves on an H100 (1 program per SM fits; 2 under the interpreter), within
    partial_programs_allowed."""
    allowed = partial_programs_allowed(49 * block_c * 4, activation_bytes)
    wanted = 2 if interpreting(device) else 4 * H100_SMS
    groups = max(1, min(total_tiles, triton.cdiv(wanted, channel_blocks), allowed // channel_blocks))
    return triton.cdiv(total_tiles, groups)


def rows_config(cols: int, device: torch.device) -> TileConfig:
    """Row-tiled elementwise + per-sample reduction kernels over (B*H*W, cols)."""
    if interpreting(device):
        block_c = min(_pow2(cols), 256)
        return TileConfig(max(16, 16384 // block_c), block_c, 4)
    block_c = min(_pow2(cols), 256)
    return TileConfig(max(8, 8192 // block_c), block_c, 8)


def sum_block(n: int, device: torch.device) -> int:
    """Columns per program of the fixed-order reduction of per-tile partial sums."""
    return min(_pow2(n), 4096 if interpreting(device) else 256)


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
    default is 128 x 64, which keeps them in registers where 128 x 128 spills. 128 x 128 stays a candidate for the
    tuner to time."""
    if dtype == torch.float32:
        return [GemmConfig(64, 64, 32, num_warps=4, num_stages=3), GemmConfig(128, 64, 32, num_warps=8, num_stages=3)]
    if op.startswith("dy"):
        cands = [GemmConfig(128, 64, 64, num_warps=8, num_stages=3), GemmConfig(64, 64, 64, num_warps=4, num_stages=4),
                 GemmConfig(128, 128, 64, num_warps=8, num_stages=3)]
        if dtype == torch.float16:  # fp16's epilogue converts differently: 128 x 64 spills there, 64 x 64 does not
            cands.insert(0, GemmConfig(64, 64, 64, num_warps=8, num_stages=3))
    else:
        cands = [GemmConfig(128, 128, 64, num_warps=8, num_stages=3),
                 GemmConfig(128, 256, 64, num_warps=8, num_stages=3),
                 GemmConfig(64, 128, 64, num_warps=4, num_stages=4)]
    fitting = [c for c in cands if c.block_n <= max(_pow2(n), 64)]
    # Narrow outputs (N <= 64, e.g. GEMM2 of a C = 32 model) fit none of the wide tiles: one 64-column tile covers them.
    return fitting or [GemmConfig(128, 64, 64, num_warps=4, num_stages=3), GemmConfig(64, 64, 64, num_warps=4,
                                                                                    num_stages=4)]


@functools.lru_cache(maxsize=None)
def _default_gemm_config(op: str, n: int, dtype: torch.dtype) -> GemmConfig:
    return gemm_candidates(op, n, dtype)[0]


def _gemm_interpreter_config(m: int, n: int, k: int) -> GemmConfig:
    return GemmConfig(min(_pow2(m), 128), min(max(_pow2(n), 16), 128), min(max(_pow2(k), 16), 64), 8, 1, 1)


def _config_does_not_fit() -> tuple[type, ...]:
    """Triton's errors for "this config cannot run on this GPU": too much shared memory or too many threads
    (OutOfResources), and compile or ptxas failures. Anything else (out of memory, a CUDA error, a broken capture) is
    not the config's fault and must reach the caller."""
    return tuple(e for e in (errors.OutOfResources, CompilationError, getattr(errors, "PTXASError", None)) if e)


CONFIG_DOES_NOT_FIT = _config_does_not_fit()
_TUNED: dict[tuple, GemmConfig] = {}
_DEVICE_KINDS: dict[int, str] = {}


def device_kind(device: torch.device) -> str:
    """The GPU model and compute capability, e.g. 'NVIDIA H100 80GB HBM3 sm_90': a tuned config is only valid on the
    kind of GPU that timed it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_KINDS:
        props = torch.cuda.get_device_properties(index)
        _DEVICE_KINDS[index] = f"{props.name} sm_{props.major}{props.minor}"
    return _DEVICE_KINDS[index]


capturing = dispatch.capturing  # a module attribute, so tests can stand in for a capture


def tuning_enabled() -> bool:
    """FCDM_TRITON_TUNE=0 turns the GEMM timing off, and so does torch's deterministic mode: like cudnn.benchmark, a
    config picked by timing may differ between processes, and with it the rounding."""
    return os.environ.get("FCDM_TRITON_TUNE", "1") != "0" and not torch.are_deterministic_algorithms_enabled()


def gemm_config(op: str, m: int, n: int, k: int, pixels: int, dtype: torch.dtype, device: torch.device,
                run) -> GemmConfig:
    """The GEMM config for `op` at this shape. `run(config)` launches once on scratch outputs; on CUDA it is timed
    for each candidate the first time a (op, N, K, H*W, dtype, GPU kind) key is seen, and the fastest is cached.

    The first candidate is taken untimed whenever tuning is off (tuning_enabled), and, without caching it, while a
    CUDA graph is being captured. A candidate that does not fit the GPU is skipped; any other error propagates.

    Under DDP each rank times for itself and may pick another config. That is left alone: the candidates differ only in
    rounding (each is tested against fp64), DDP and FSDP average the gradients so every rank still steps identically,
    and a rank's pick is the fastest on its own GPU, so no rank is slowed. A collective here could hang: a shape seen
    on one rank only (an evaluation on rank 0) would wait forever for the others. For configs that are equal on every
    rank and in every run, set FCDM_TRITON_TUNE=0 or use torch.use_deterministic_algorithms(True)."""
    if interpreting(device):
        return _gemm_interpreter_config(m, n, k)
    if not tuning_enabled():
        return _default_gemm_config(op, n, dtype)
    key = (op, n, k, pixels, dtype, device_kind(device))
    if key in _TUNED:
        return _TUNED[key]
    cands = gemm_candidates(op, n, dtype)
    if len(cands) == 1:
        _TUNED[key] = cands[0]
        return cands[0]
    if capturing(device):
        return cands[0]  # a later call outside the capture still tunes this key
    times, skipped = [], []
    for cfg in cands:
        try:
            times.append((triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20), cfg))
        except CONFIG_DOES_NOT_FIT as e:
            skipped.append(f"{cfg}: {type(e).__name__}: {e}")
    if not times:
        raise RuntimeError(f"no Triton GEMM config fits {op} at N={n}, K={k} on {key[-1]}:\n" + "\n".join(skipped))
    _TUNED[key] = min(times, key=lambda tc: tc[0])[1]
    return _TUNED[key]


def dw2_dgate_config(C: int, J: int, P: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile of the block's dW2 + dgate GEMM: (C, J) output tile, the pixel step of its per-sample reduction, and
    launch options."""
    if interpreting(device):
        return dict(BLOCK_C=min(max(_pow2(C), 16), 64), BLOCK_J=min(max(_pow2(J), 16), 128),
                    BLOCK_P=min(max(_pow2(P), 16), 64), num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_C=64, BLOCK_J=64, BLOCK_P=32, num_warps=4, num_stages=3)
    return dict(BLOCK_C=128, BLOCK_J=128, BLOCK_P=64, num_warps=8, num_stages=3)
