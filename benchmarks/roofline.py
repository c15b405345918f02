"""Roofline floors for the FCDM block: the device's copy bandwidth and GEMM rate, measured in the same run, and each
op's ideal bytes and FLOPs (the byte and FLOP budget of benchmarks/NOTES.md).

An op is a sequence of passes (the kernel plan of docs/kernels.md). A pass cannot finish before it has moved its bytes
at copy bandwidth, nor before its GEMM FLOPs at the measured GEMM rate, so

    floor(op) = sum over passes of max(bytes / bandwidth, gemm_flops / gemm_rate).

The depthwise conv's FLOPs are counted in the op's FLOP total but not against the GEMM rate: they run on CUDA cores
and their pass is bandwidth-bound. Bytes are the ideal traffic of the fused plan (each activation tensor read or
written once per pass; parameters, per-sample vectors and partial sums are negligible and left out).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .providers import Case

DWCONV_TAPS = 49


@dataclass(frozen=True)
class Pass:
    """One kernel of the fused plan: ideal bytes moved, GEMM FLOPs, and other (CUDA-core) FLOPs."""

    name: str
    bytes: float
    gemm_flops: float
    other_flops: float = 0.0


@dataclass(frozen=True)
class Ceilings:
    """What this device measured in this run: copy bandwidth (read + write) and GEMM rate per dtype."""

    device: str
    copy_gbps: float
    gemm_tflops: dict
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def _passes_forward(op: str, case: Case, es: int) -> list[Pass]:
    M, C, J = case.rows, case.channels, case.hidden
    k1 = Pass("K1 dwconv_ln_modulate: x in, h out", es * M * 2 * C, 0.0, 2 * DWCONV_TAPS * M * C)
    k2 = Pass("K2 GEMM1+GELU+G^2: h in, u out", es * M * (C + J), 2 * M * C * J)
    k4 = Pass("K4 GEMM2 (GRN prologue, gate+residual epilogue): u, x in, out", es * M * (J + 2 * C), 2 * M * C * J)
    return {"dwconv_ln_modulate": [k1], "grn_mlp": [k2, k4], "block": [k1, k2, k4]}[op]


def _passes_backward(op: str, case: Case, es: int) -> list[Pass]:
    M, C, J = case.rows, case.channels, case.hidden
    grn = [
        Pass("B1 dy = (g*gate) W2, A = sum_p dy*u epilogue: g, pre in, dy out", es * M * (C + 2 * J), 2 * M * C * J),
        Pass("B2 dW2 = dz^T (u*s): g, pre in", es * M * (C + J), 2 * M * C * J),
        Pass("B3 du, dpre elementwise: dy, pre in, dpre out", es * M * 3 * J, 0.0),
        Pass("B4 dh = dpre W1: dpre in, dh out", es * M * (J + C), 2 * M * C * J),
        Pass("B5 dW1 = dpre^T h: dpre, h in", es * M * (J + C), 2 * M * C * J),
    ]
    # dh0 recomputed from x, then dx (flipped-kernel dwconv) and dWdw partial sums in one pass.
    dw = Pass("K1b dwconv_ln_modulate backward: x, dh in, dx out", es * M * 3 * C, 0.0, 2 * 2 * DWCONV_TAPS * M * C)
    # In the block the residual gradient g is added in that same pass: one more read.
    dw_block = Pass("K1b block: x, dh, g in, dx out", es * M * 4 * C, 0.0, dw.other_flops)
    return {"dwconv_ln_modulate": [dw], "grn_mlp": grn, "block": grn + [dw_block]}[op]


def op_passes(op: str, mode: str, case: Case, dtype: torch.dtype) -> list[Pass]:
    """The passes one call of `op` in `mode` (forward | backward | full) must make at best."""
    es = torch.empty((), dtype=dtype).element_size()
    if mode == "forward":
        return _passes_forward(op, case, es)
    if mode == "backward":
        return _passes_backward(op, case, es)
    if mode == "full":
        return _passes_forward(op, case, es) + _passes_backward(op, case, es)
    raise ValueError(f"mode must be forward, backward or full, got {mode!r}")


def budget(op: str, mode: str, case: Case, dtype: torch.dtype) -> tuple[float, float]:
    """(ideal bytes, total FLOPs) of one call."""
    passes = op_passes(op, mode, case, dtype)
    return sum(p.bytes for p in passes), sum(p.gemm_flops + p.other_flops for p in passes)


def floor_seconds(op: str, mode: str, case: Case, dtype: torch.dtype, copy_gbps: float, gemm_tflops: float) -> float:
    """The roofline floor: sum over passes of max(bytes / bandwidth, GEMM FLOPs / GEMM rate)."""
    if copy_gbps <= 0 or gemm_tflops <= 0:
        raise ValueError(f"copy_gbps and gemm_tflops must be positive, got {copy_gbps} and {gemm_tflops}")
    return sum(max(p.bytes / (copy_gbps * 1e9), p.gemm_flops / (gemm_tflops * 1e12))
               for p in op_passes(op, mode, case, dtype))


# ------------------------------------------------------------------------------------------------- measuring ceilings
def _time_ms(fn, device: torch.device, reps: int) -> float:
    """Median ms of fn: triton's do_bench on CUDA, a perf_counter loop on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench
        median = do_bench(fn, warmup=10, rep=max(20, reps * 5), quantiles=[0.5])
        return float(median[0] if isinstance(median, (list, tuple)) else median)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_copy_gbps(device, nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_gemm_tflops(device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Square n x n x n matmul rate in TFLOP/s (fp32 uses TF32 where torch allows it)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = _time_ms(lambda: torch.mm(a, b), device, reps)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def measure_ceilings(device, dtypes=(torch.bfloat16, torch.float32), quick: bool = False) -> Ceilings:
    """Copy bandwidth and GEMM rate per dtype on `device`; small sizes on CPU (a smoke value, not a roofline)."""
    device = torch.device(device)
    if device.type == "cuda":
        nbytes, n, reps, method = (512 if quick else 2048) << 20, 8192, 10 if quick else 50, "triton do_bench median"
        name = torch.cuda.get_device_name(device)
    else:
        nbytes, n, reps, method = 32 << 20, 256, 3, "perf_counter median (CPU fallback, not a device roofline)"
        name = "cpu"
    gemm = {str(dt).replace("torch.", ""): measure_gemm_tflops(device, dt, n, reps) for dt in dtypes}
    return Ceilings(name, measure_copy_gbps(device, nbytes, reps), gemm, method)
