"""Where the time goes: a torch.profiler table of the kernels of one op call, per provider.

    python -m benchmarks.kernel_profile                                   # block, full, 256px-L1, bf16
    python -m benchmarks.kernel_profile --op grn_mlp --mode backward --providers triton,compile

For each provider it runs a few calls of the op under the profiler and writes the top kernels by device time to
<results-dir>/profile_<op>_<mode>_<case>_<dtype>_<provider>.txt (and prints them). This is what says which kernel of
the block still sits far above its floor (for example cuDNN's depthwise weight gradient).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from . import common
from .providers import DTYPES, MODES, OPS, PROVIDERS, Unavailable, build, clear_grads, find_cases, mode_callable, setup


def profile_table(fn, leaves, device: torch.device, calls: int = 3, rows: int = 15) -> str:
    """Top `rows` kernels (or CPU ops without CUDA) of `calls` calls of fn, by total time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # compile and autotune before profiling
    common.sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            clear_grads(leaves)
            fn()
        common.sync(device)
    # torch renamed the CUDA columns to "device"; try the current name first.
    keys = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ("cpu_time_total",)
    for key in keys:
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except (KeyError, AttributeError):
            continue
    return prof.key_averages().table(row_limit=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default="block", choices=OPS)
    p.add_argument("--mode", default="full", choices=MODES)
    p.add_argument("--case", default=None, help="default 256px-L1 on CUDA, tiny-L1 on CPU")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--providers", default="channels_last,triton,cuda",
                   help=f"comma list from {PROVIDERS} (compile costs ~20 s to build)")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--device", default=None)
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    args = p.parse_args(argv)
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    if not providers or any(s not in PROVIDERS for s in providers):
        p.error(f"--providers must be a comma list from {PROVIDERS}, got {args.providers!r}")
    if args.calls < 1 or args.rows < 1:
        p.error("--calls and --rows must be positive")
    device = torch.device(args.device) if args.device else common.default_device()
    case_name = args.case or ("256px-L1" if device.type == "cuda" else "tiny-L1")
    try:
        case = find_cases([case_name])[0]
    except ValueError as e:
        p.error(f"--case: {e}")
    with common.tf32_matmuls():
        inputs = setup(args.op, case, DTYPES[args.dtype], device)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        for provider in providers:
            title = f"{args.op} {args.mode} {case.name} ({case.shape()}) {args.dtype} {provider}"
            runnable = build(inputs, provider)
            if isinstance(runnable, Unavailable):
                print(f"== {title}: n/a: {runnable.reason}")
                continue
            try:
                table = profile_table(mode_callable(runnable, args.mode), runnable.leaves, device, args.calls,
                                      args.rows)
            except Exception as e:  # a failing provider must not hide the others' profiles
                print(f"== {title}: failed: {type(e).__name__}: {e}")
                continue
            out = args.results_dir / f"profile_{args.op}_{args.mode}_{case.name}_{args.dtype}_{provider}.txt"
            out.write_text(f"{title}, {args.calls} calls\n{table}\n")
            print(f"== {title} ({args.calls} calls) -> {out}\n{table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
