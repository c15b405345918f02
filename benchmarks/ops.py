"""Op microbenchmarks: each fused op and the whole block, per provider, against the roofline floor of this run.

    python -m benchmarks.ops                        # every op, mode, FCDM-XL case, dtype and provider (long)
    python -m benchmarks.ops --quick                # the reduced plan gpu_check.sh runs (sized for ~1 min on an H100)
    python -m benchmarks.ops --ops block --cases 256px-L1 --dtypes bf16 --modes forward,full

Prints a table and appends one row per (op, mode, case, dtype, provider) to <results-dir>/ops.jsonl and ops.csv:
median and 20/80 quantiles, achieved TB/s and TFLOP/s (ideal bytes and FLOPs over the time), the ratio to the
roofline floor, peak memory, the relative error against the channels_last reference, and the speedup against the
official NCHW layout and torch.compile measured earlier in the same run.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import common, roofline
from .providers import (DTYPES, MODES, OPS, PROVIDERS, TINY_CASES, Runnable, Unavailable, build, clear_grads,
                        find_cases, mode_callable, setup, xl_cases)

CSV_FIELDS = ["run_id", "time_utc", "device", "torch", "triton", "cuda", "commit", "tf32", "op", "mode", "case",
              "shape", "dtype", "provider", "status", "reason", "timer", "median_ms", "p20_ms", "p80_ms", "floor_ms",
              "ratio_to_floor", "tbps", "tflops", "peak_mib", "rel_err_vs_channels_last", "speedup_vs_nchw",
              "speedup_vs_compile", "copy_gbps", "gemm_tflops"]
# Relative error above which a provider's output is flagged as a mismatch (TF32 and bf16 rounding stay far below).
MISMATCH_TOL = {torch.bfloat16: 3e-2, torch.float32: 5e-3}


@dataclass(frozen=True)
class Job:
    """A slice of the benchmark grid: every combination of these ops, cases, dtypes and providers."""

    ops: tuple
    cases: tuple
    dtypes: tuple
    providers: tuple


def quick_plan(device: torch.device) -> list[Job]:
    """What gpu_check.sh runs: every op at 256px and the block at every level, eager providers first; torch.compile
    (about 20 s per shape) last and only at the anchor case of the goals, so a time-boxed run loses the fewest rows."""
    eager = ("nchw", "channels_last", "triton", "cuda")
    if device.type != "cuda":
        return [Job(OPS, tuple(c.name for c in TINY_CASES), ("fp32",), eager)]
    l256 = tuple(c.name for c in xl_cases((256,)))
    l512 = tuple(c.name for c in xl_cases((512,)))
    return [Job(("block",), ("256px-L1",), ("bf16",), eager + ("triton_composed", "triton_atomic")),
            Job(("dwconv_ln_modulate", "grn_mlp"), l256, ("bf16",), eager),
            Job(("block",), l256[1:] + l512, ("bf16",), eager),
            Job(("block",), ("256px-L1",), ("fp32",), eager),
            Job(("block",), ("256px-L1",), ("bf16",), ("compile",))]


def _split(text: str, allowed, what: str) -> tuple:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} must be a comma list from {list(allowed)}, got {text!r}")
    return items


def _case_names(text: str) -> tuple:
    """Case names, or the shortcuts xl (all FCDM-XL levels), 256px, 512px, tiny."""
    shortcuts = {"xl": xl_cases(), "256px": xl_cases((256,)), "512px": xl_cases((512,)), "tiny": list(TINY_CASES)}
    names: list[str] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        names += [c.name for c in shortcuts[item]] if item in shortcuts else [item]
    try:
        find_cases(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError("cases must not be empty")
    return tuple(names)


def measure_group(op: str, case_name: str, dtype_name: str, providers, modes, device, ceilings: roofline.Ceilings,
                  warmup_ms: float, rep_ms: float, env: dict) -> list[dict]:
    """All providers and modes of one (op, case, dtype), sharing inputs; speedups filled in within the group."""
    case, dtype = find_cases([case_name])[0], DTYPES[dtype_name]
    inputs = setup(op, case, dtype, device)
    reference = build(inputs, "channels_last").output_nhwc().float()
    gemm_rate = ceilings.gemm_tflops[str(dtype).replace("torch.", "")]
    rows = []
    for provider in providers:
        runnable = build(inputs, provider)
        error = None
        if isinstance(runnable, Runnable):
            try:
                error = relative_error(runnable.output_nhwc().float(), reference)
            except Exception as e:  # a provider that crashes is reported, not fatal to the table
                runnable = Unavailable(provider, f"failed: {type(e).__name__}: {e}")
        for mode in modes:
            nbytes, flops = roofline.budget(op, mode, case, dtype)
            floor_ms = 1e3 * roofline.floor_seconds(op, mode, case, dtype, ceilings.copy_gbps, gemm_rate)
            row = dict(env, op=op, mode=mode, case=case.name, shape=case.shape(), dtype=dtype_name, provider=provider,
                       floor_ms=floor_ms, copy_gbps=ceilings.copy_gbps, gemm_tflops=gemm_rate, ideal_bytes=nbytes,
                       flops=flops, rel_err_vs_channels_last=error)
            rows.append(row)
            if isinstance(runnable, Unavailable):
                row.update(status="n/a", reason=runnable.reason)
                continue
            try:
                fn = mode_callable(runnable, mode)
                fn()  # compiles (torch.compile, Triton autotune) outside the timed and the memory runs
                clear_grads(runnable.leaves)
                peak = common.peak_memory_mib(fn, device)
                clear_grads(runnable.leaves)
                med, p20, p80, timer = common.time_ms(fn, device, warmup_ms, rep_ms, grad_to_none=runnable.leaves)
                clear_grads(runnable.leaves)
            except Exception as e:
                row.update(status="n/a", reason=f"failed: {type(e).__name__}: {e}")
                continue
            mismatch = error is None or error != error or error > MISMATCH_TOL[dtype]
            row.update(status="mismatch" if mismatch else "ok",
                       reason=f"rel err {error:.2e} vs channels_last" if mismatch else "",
                       timer=timer, median_ms=med, p20_ms=p20, p80_ms=p80, ratio_to_floor=med / floor_ms,
                       tbps=nbytes / (med * 1e-3) / 1e12, tflops=flops / (med * 1e-3) / 1e12, peak_mib=peak)
        del runnable
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each row's speedup over the nchw and compile rows of the same op, mode, case and dtype in this run."""
    key = lambda r: (r["op"], r["mode"], r["case"], r["dtype"])  # noqa: E731
    timed = {(key(r), r["provider"]): r for r in rows if r.get("median_ms")}
    for r in rows:
        for base in ("nchw", "compile"):
            b = timed.get((key(r), base))
            r[f"speedup_vs_{base}"] = b["median_ms"] / r["median_ms"] if r.get("median_ms") and b else None


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; inf when out has NaN or Inf, so a broken kernel is never reported as matching."""
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


HEADER = (f"{'op':<18} {'mode':<8} {'case':<9} {'dtype':<5} {'provider':<13} {'median ms':>9} {'[p20':>7} "
          f"{'p80]':>7} {'TB/s':>6} {'TFLOP/s':>7} {'x floor':>7} {'vs nchw':>7} {'vs comp':>7} {'peak MiB':>8}  note")


def format_row(r: dict) -> str:
    if r["status"] == "n/a":
        mode = r["mode"] if r["reason"].startswith("failed") else "*"
        return f"{r['op']:<18} {mode:<8} {r['case']:<9} {r['dtype']:<5} {r['provider']:<13} n/a: {r['reason']}"
    f = common.fmt
    note = r["status"] if r["status"] != "ok" else ""
    return (f"{r['op']:<18} {r['mode']:<8} {r['case']:<9} {r['dtype']:<5} {r['provider']:<13} "
            f"{f(r['median_ms'], '9.3f')} {f(r['p20_ms'], '7.3f')} {f(r['p80_ms'], '7.3f')} {f(r['tbps'], '6.2f')} "
            f"{f(r['tflops'], '7.1f')} {f(r['ratio_to_floor'], '7.2f')} {f(r['speedup_vs_nchw'], '7.2f')} "
            f"{f(r['speedup_vs_compile'], '7.2f')} {f(r['peak_mib'], '8.0f')}  {note}").rstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced plan of gpu_check.sh, short repetitions")
    p.add_argument("--ops", type=lambda s: _split(s, OPS, "--ops"), default=OPS)
    p.add_argument("--modes", type=lambda s: _split(s, MODES, "--modes"), default=MODES)
    p.add_argument("--cases", type=_case_names, default=None,
                   help="case names or xl, 256px, 512px, tiny (default: xl on CUDA, tiny on CPU)")
    p.add_argument("--dtypes", type=lambda s: _split(s, tuple(DTYPES), "--dtypes"), default=tuple(DTYPES))
    p.add_argument("--providers", type=lambda s: _split(s, PROVIDERS, "--providers"), default=PROVIDERS)
    p.add_argument("--warmup-ms", type=float, default=None, help="do_bench warmup (default 25, quick 5)")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench repetition time (default 100, quick 40)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--no-write", action="store_true", help="print only; do not append to the results files")
    return p


def main(argv=None) -> int:
    with common.tf32_matmuls():
        return _main(argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device) if args.device else common.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        build_parser().error("--device cuda requested but CUDA is not available")
    for name in ("warmup_ms", "rep_ms"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            build_parser().error(f"--{name.replace('_', '-')} must be positive, got {value}")
    warmup_ms = args.warmup_ms or (5 if args.quick else 25)
    rep_ms = args.rep_ms or (40 if args.quick else 100)

    if args.quick and args.cases is None:
        plan = quick_plan(device)
    else:
        cases = args.cases or tuple(c.name for c in (xl_cases() if device.type == "cuda" else TINY_CASES))
        plan = [Job(args.ops, cases, args.dtypes, args.providers)]

    env = common.environment(device)
    ceilings = roofline.measure_ceilings(device, tuple(DTYPES[d] for d in DTYPES), quick=args.quick)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']} | "
          f"run {env['run_id']}")
    print(f"# ceilings this run: copy {ceilings.copy_gbps:.0f} GB/s; GEMM "
          + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in ceilings.gemm_tflops.items()) + f" ({ceilings.method})")
    if device.type != "cuda":
        print("# no CUDA: perf_counter fallback timer on CPU; these numbers are smoke values, not speeds")
    results_dir = Path(args.results_dir)
    if not args.no_write:
        common.append_jsonl(results_dir / "ceilings.jsonl", [dict(env, **ceilings.as_dict())])
    print(HEADER, flush=True)
    all_rows: list[dict] = []
    for job in plan:
        for case_name in job.cases:
            for dtype_name in job.dtypes:
                for op in job.ops:
                    rows = measure_group(op, case_name, dtype_name, job.providers, args.modes, device, ceilings,
                                         warmup_ms, rep_ms, env)
                    all_rows += rows
                    add_speedups(all_rows)  # against every baseline measured so far in this run
                    shown = set()
                    for r in rows:  # an unavailable provider is said once, not once per mode
                        key = (r["provider"], r.get("reason")) if r["status"] == "n/a" else id(r)
                        if key not in shown:
                            shown.add(key)
                            print(format_row(r), flush=True)
                    if not args.no_write:  # written per group, so a time-boxed run keeps what it measured
                        common.append_jsonl(results_dir / "ops.jsonl", rows)
                        common.append_csv(results_dir / "ops.csv", rows, CSV_FIELDS)
    if not args.no_write:
        print(f"# {len(all_rows)} rows appended to {results_dir / 'ops.jsonl'} and ops.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
