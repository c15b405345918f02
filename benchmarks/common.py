"""What every benchmark shares: the timer, the peak-memory probe, the environment record, and the results files.

Timing is `triton.testing.do_bench` (median and 20/80 quantiles, L2 flushed between reps) on CUDA. Without CUDA a
small `time.perf_counter` loop stands in so the code paths run on CPU CI; its rows say `timer=perf_counter-cpu`
and are smoke values, not speeds.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CPU_TIMER = "perf_counter-cpu"
CUDA_TIMER = "triton.do_bench"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, warmup_ms: float = 25, rep_ms: float = 100,
            grad_to_none: Iterable[torch.Tensor] | None = None, min_reps: int = 3) -> tuple[float, float, float, str]:
    """(median, 20% quantile, 80% quantile) in ms, and the timer's name."""
    device = torch.device(device)
    leaves = list(grad_to_none or ())
    if device.type == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves or None,
                                 quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80), CUDA_TIMER
    times: list[float] = []
    deadline = time.perf_counter() + (warmup_ms + rep_ms) * 1e-3
    fn()  # warm-up, like do_bench's first call
    while len(times) < min_reps or time.perf_counter() < deadline:
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= 1000:
            break
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7], CPU_TIMER


def peak_memory_mib(fn: Callable[[], object], device) -> float | None:
    """Peak memory allocated by one call of fn above what was allocated before it, in MiB; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


@contextlib.contextmanager
def tf32_matmuls():
    """TF32 for fp32 matmuls while benchmarking, as in the anchor measurements of the goals (README, Performance); the caller's setting is restored, so
    running a benchmark in-process (tests) never changes the precision of what runs after it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def allow_recompiles(limit: int = 64) -> None:
    """Let dynamo keep one graph per shape and grad mode; past its default limit it would silently run eager and a
    `compile` row would time the eager code."""
    import torch._dynamo
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), limit))


def git_commit() -> str:
    """HEAD of the repository (with -dirty when the tree has changes), FCDM_GIT_COMMIT, or 'unknown'."""
    if os.environ.get("FCDM_GIT_COMMIT"):
        return os.environ["FCDM_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_id() -> str:
    """One id per benchmark session; gpu_check.sh exports FCDM_BENCH_RUN_ID so all its stages share it."""
    return os.environ.get("FCDM_BENCH_RUN_ID") or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def environment(device) -> dict:
    """The facts every result row carries: device, versions, commit, run id."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "run_id": run_id(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "tf32": torch.get_float32_matmul_precision() != "highest",
    }


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def append_csv(path: Path, rows: Iterable[dict], fields: list[str]) -> None:
    """Append rows with a fixed column order; the header is written when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row)


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def latest_run(rows: list[dict]) -> str | None:
    """The run id of the most recent row (rows are appended in time order)."""
    return rows[-1]["run_id"] if rows else None


def fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    """format(value, spec), with `missing` for None and 'nan' for NaN, both padded to the spec's width."""
    width = int(re.match(r"[<>^]?(\d*)", spec).group(1) or 0)
    if value is None:
        return missing.rjust(width)
    if isinstance(value, float) and value != value:
        return "nan".rjust(width)
    return format(value, spec)
