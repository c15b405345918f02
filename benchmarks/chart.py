"""A PNG of the op benchmark: time per provider for each case, with the roofline floor drawn in.

    python -m benchmarks.chart --results-dir benchmarks/results [--run-id ID] [--dtype bf16] [--out chart.png]

Without --dtype it writes one PNG per dtype found in the run, <results-dir>/ops_<dtype>.png.

One panel per (op, mode) found in the run; bars are the median time of each provider (log scale, 20/80 quantiles as
error bars), and a black line over each case marks the floor computed from the run's measured copy bandwidth and GEMM
rate. Providers that were n/a in a case have no bar.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common
from .providers import MODES, OPS, PROVIDERS

COLORS = {"nchw": "#9e9e9e", "channels_last": "#616161", "compile": "#1f77b4", "triton": "#d62728", "cuda": "#2ca02c",
          "triton_composed": "#ff7f0e", "triton_atomic": "#e377c2"}
OTHER_COLOR = "#8c564b"  # a provider added later must not break the chart


def draw(rows: list[dict], out: Path, dtype: str = "bf16") -> Path:
    """Render the rows of one run to `out`; raises ValueError when no row has a time."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("dtype") == dtype]
    timed = [r for r in rows if r.get("median_ms")]
    if not timed:
        raise ValueError(f"no timed {dtype} rows to chart")
    panels = [(op, mode) for op in OPS for mode in MODES if any(r["op"] == op and r["mode"] == mode for r in timed)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.8 * len(panels)), squeeze=False)
    head = timed[0]
    for ax, (op, mode) in zip(axes[:, 0], panels):
        in_panel = [r for r in rows if r["op"] == op and r["mode"] == mode]
        cases = list(dict.fromkeys(r["case"] for r in in_panel))
        providers = [p for p in PROVIDERS if any(r["provider"] == p and r.get("median_ms") for r in in_panel)]
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            for j, case in enumerate(cases):
                r = next((r for r in in_panel if r["case"] == case and r["provider"] == provider
                          and r.get("median_ms")), None)
                if r is None:
                    continue
                x = j - 0.4 + width * (i + 0.5)
                err = [[max(r["median_ms"] - r["p20_ms"], 0)], [max(r["p80_ms"] - r["median_ms"], 0)]]
                ax.bar(x, r["median_ms"], width, color=COLORS.get(provider, OTHER_COLOR), yerr=err, capsize=2,
                       label=provider if j == 0 or provider not in ax.get_legend_handles_labels()[1] else None)
        for j, case in enumerate(cases):
            floor = next((r.get("floor_ms") for r in in_panel if r["case"] == case and r.get("floor_ms")), None)
            if floor:
                ax.hlines(floor, j - 0.45, j + 0.45, colors="black", linewidths=2,
                          label="roofline floor" if j == 0 else None)
        shapes = {r["case"]: r.get("shape", "") for r in in_panel}
        ax.set_xticks(range(len(cases)), [f"{c}\n{shapes[c]}" for c in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op} {mode}, {dtype}", fontsize=10)
        ax.legend(fontsize=7, ncol=6, loc="upper left")
    fig.suptitle(f"{head.get('device')} | torch {head.get('torch')} | triton {head.get('triton')} | "
                 f"commit {head.get('commit')} | timer {head.get('timer')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))  # leave room for the suptitle
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chart", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--run-id", default=None, help="default: the latest run in ops.jsonl")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: every dtype in the run")
    p.add_argument("--out", type=Path, default=None, help="default: <results-dir>/ops_<dtype>.png (needs --dtype)")
    args = p.parse_args(argv)
    rows = common.read_jsonl(args.results_dir / "ops.jsonl")
    if not rows:
        p.error(f"no rows in {args.results_dir / 'ops.jsonl'}; run python -m benchmarks.ops first")
    if args.out is not None and args.dtype is None:
        p.error("--out needs --dtype (one PNG per dtype otherwise)")
    run = args.run_id or common.latest_run(rows)
    rows = [r for r in rows if r.get("run_id") == run]
    dtypes = [args.dtype] if args.dtype else sorted({r["dtype"] for r in rows if r.get("median_ms")})
    if not dtypes:
        p.error(f"run {run} has no timed rows to chart")
    for dtype in dtypes:
        try:
            out = draw(rows, args.out or args.results_dir / f"ops_{dtype}.png", dtype)
        except ValueError as e:
            p.error(str(e))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
