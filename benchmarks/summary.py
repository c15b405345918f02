"""The final table of a benchmark run: each case's measured value against its goal (the README's Performance table), with the baselines
measured in the same run and the roofline floor.

    python -m benchmarks.summary --results-dir benchmarks/results [--run-id ID] [--stages stages.tsv]

Reads ops.jsonl, model.jsonl and ceilings.jsonl (each file's latest run unless --run-id is given), prints about 25
lines, and writes summary.txt and summary.json next to them. A case with no row says `not measured`, with the reason
when its row was n/a; nothing is ever filled in from elsewhere.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import common

FCDM_OP_PROVIDERS = ("triton", "cuda")
FCDM_MODEL_VARIANTS = ("fused", "fused_compile")


@dataclass(frozen=True)
class Goal:
    """One performance goal: which rows measure it, which field, and the bound."""

    label: str
    bench: str          # "model" or "ops"
    select: dict        # field -> value that picks the rows
    field: str          # the measured quantity
    bound: float
    higher_is_better: bool
    unit: str


GOALS = (
    Goal("train 256px B=64", "model", {"mode": "train", "res": 256, "batch": 64}, "img_per_s", 650, True, "img/s"),
    Goal("  peak memory (AdamW+fp32 EMA)", "model", {"mode": "train", "res": 256, "batch": 64}, "peak_gib", 20, False,
         "GiB"),
    Goal("train 512px B=16", "model", {"mode": "train", "res": 512, "batch": 16}, "img_per_s", 165, True, "img/s"),
    Goal("infer 256px B=256", "model", {"mode": "infer", "res": 256, "batch": 256}, "img_per_s", 3300, True, "img/s"),
    Goal("block 64x512x32x32 fwd", "ops", {"op": "block", "mode": "forward", "case": "256px-L1", "dtype": "bf16"},
         "median_ms", 0.45, False, "ms"),
    Goal("block 64x512x32x32 fwd+bwd", "ops", {"op": "block", "mode": "full", "case": "256px-L1", "dtype": "bf16"},
         "median_ms", 1.3, False, "ms"),
)


def _rows_of_run(rows: list[dict], run: str | None) -> list[dict]:
    run = run or common.latest_run(rows)
    return [r for r in rows if r.get("run_id") == run]


def _match(rows: list[dict], select: dict) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in select.items())]


def _value(rows: list[dict], key: str, name: str, field: str):
    """The field of the ok row whose `key` is `name`, else None."""
    for r in rows:
        if r.get(key) == name and r.get("status") in ("ok", "mismatch") and r.get(field) is not None:
            return r[field]
    return None


def _best(rows: list[dict], key: str, names, field: str, higher_is_better: bool):
    """(value, name) of the best fcdm row, or (None, reason) when none ran."""
    found = [(r[field], r[key]) for r in rows
             if r.get(key) in names and r.get("status") == "ok" and r.get(field) is not None]
    if found:
        return (max if higher_is_better else min)(found)
    reasons = sorted({f"{r[key]}: {r.get('reason', '')}" for r in rows if r.get(key) in names})
    return None, "; ".join(reasons) or "no row"


def _verdict(value, goal: Goal) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= goal.bound if goal.higher_is_better else value <= goal.bound) else "MISSED"


MODEL_BASELINES = (("official", "official"), ("official_compile", "compile"), ("reference", "ref"), ("dit", "DiT"))
OP_BASELINES = (("nchw", "nchw"), ("channels_last", "ch_last"), ("compile", "compile"))


def _baselines(rows: list[dict], key: str, names, field: str, value, higher_is_better: bool, spec: str) -> str:
    """'name v (xS)' per baseline, S = how many times faster fcdm's value is (blank when either is missing)."""
    parts = []
    for name, short in names:
        v = _value(rows, key, name, field)
        speedup = None
        if v and value:
            speedup = value / v if higher_is_better else v / value
        parts.append(f"{short} {common.fmt(v, spec)}" + (f" (x{speedup:.2f})" if speedup else ""))
    return "  ".join(parts)


def goal_lines(model_rows: list[dict], op_rows: list[dict]) -> tuple[list[str], list[dict]]:
    f = common.fmt
    lines = [f"{'case':<36} {'goal':>7} {'fcdm':>9} {'by':<14} {'verdict':<12} same-run baselines (fcdm's speedup)"]
    records = []
    for goal in GOALS:
        rows = _match(model_rows if goal.bench == "model" else op_rows, goal.select)
        sign = ">=" if goal.higher_is_better else "<="
        if goal.bench == "model":
            if goal.field == "peak_gib":  # the memory of the fastest fcdm variant
                _, by = _best(rows, "variant", FCDM_MODEL_VARIANTS, "img_per_s", True)
                value = _value(rows, "variant", by, "peak_gib") if by in FCDM_MODEL_VARIANTS else None
                reserved = _value(rows, "variant", by, "reserved_gib") if by in FCDM_MODEL_VARIANTS else None
                base = f"reserved {f(reserved, '.1f')}" + "".join(
                    f"  {short} {f(_value(rows, 'variant', name, 'peak_gib'), '.1f')}"
                    for name, short in MODEL_BASELINES if name != "reference")
            else:
                value, by = _best(rows, "variant", FCDM_MODEL_VARIANTS, goal.field, True)
                base = _baselines(rows, "variant", MODEL_BASELINES, goal.field, value, True, ".0f")
        else:
            value, by = _best(rows, "provider", FCDM_OP_PROVIDERS, goal.field, False)
            floor = next((r.get("floor_ms") for r in rows if r.get("floor_ms")), None)
            base = _baselines(rows, "provider", OP_BASELINES, "median_ms", value, False, ".3f")
            base += f"  floor {f(floor, '.3f')}" + (f" (fcdm at {value / floor:.2f}x)" if value and floor else "")
        verdict = _verdict(value, goal)
        shown_by = by if value is not None else ""
        line = (f"{goal.label + ' (' + goal.unit + ')':<36} {sign + format(goal.bound, 'g'):>7} "
                f"{f(value, '.4g'):>9} {shown_by:<14} {verdict:<12} {base}")
        if value is None:
            line += f"  [{by[:80]}]"
        lines.append(line)
        records.append({"goal": goal.label.strip(), "unit": goal.unit, "bound": goal.bound, "sign": sign,
                        "value": value, "by": shown_by, "verdict": verdict})
    return lines, records


def sample_line(model_rows: list[dict]) -> str:
    rows = _match(model_rows, {"mode": "sample"})
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return "sampling 250-step DDPM+CFG: not measured"
    parts = [f"{r['variant']} {r['img_per_s']:.1f}" for r in ok]
    extrapolated = {r.get("extrapolated_from_steps") for r in ok} - {None}
    note = f" (timed {min(extrapolated)} steps, scaled to 250)" if extrapolated else ""
    return f"sampling 250-step DDPM+CFG img/s, B={ok[0]['batch']} {ok[0]['res']}px: " + ", ".join(parts) + note


def level_lines(op_rows: list[dict]) -> list[str]:
    """Block fwd+bwd per level (bf16): best fcdm, baselines, floor and the ratio to it."""
    f = common.fmt
    rows = _match(op_rows, {"op": "block", "mode": "full", "dtype": "bf16"})
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return ["block per level: not measured"]
    lines = [f"block fwd+bwd, bf16, ms:     {'fcdm':>7} {'nchw':>7} {'ch_last':>7} {'compile':>7} "
             f"{'floor':>6} {'x floor':>7}"]
    for case in cases:
        in_case = [r for r in rows if r["case"] == case]
        value, _ = _best(in_case, "provider", FCDM_OP_PROVIDERS, "median_ms", False)
        floor = next((r.get("floor_ms") for r in in_case if r.get("floor_ms")), None)
        ratio = value / floor if value is not None and floor else None
        shape = in_case[0].get("shape", "")
        lines.append(f"  {case:<9} {shape:<17} {f(value, '7.3f')} "
                     f"{f(_value(in_case, 'provider', 'nchw', 'median_ms'), '7.3f')} "
                     f"{f(_value(in_case, 'provider', 'channels_last', 'median_ms'), '7.3f')} "
                     f"{f(_value(in_case, 'provider', 'compile', 'median_ms'), '7.3f')} {f(floor, '6.3f')} "
                     f"{f(ratio, '7.2f')}")
    return lines


def stage_line(stages: Path | None) -> str | None:
    """gpu_check's stages file (name, rc, seconds per line) as one line."""
    if stages is None or not Path(stages).exists():
        return None
    parts = []
    for line in Path(stages).read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            name, rc, secs = fields[:3]
            state = {"0": "ok", "124": "TIMEOUT", "137": "KILLED"}.get(rc, f"rc={rc}")
            parts.append(f"{name} {state} {secs}s")
    return "stages: " + " | ".join(parts) if parts else None


def summarize(results_dir: Path, run: str | None = None, stages: Path | None = None) -> tuple[str, dict]:
    results_dir = Path(results_dir)
    model_rows = _rows_of_run(common.read_jsonl(results_dir / "model.jsonl"), run)
    op_rows = _rows_of_run(common.read_jsonl(results_dir / "ops.jsonl"), run)
    ceilings = _rows_of_run(common.read_jsonl(results_dir / "ceilings.jsonl"), run)
    head = (model_rows or op_rows or ceilings or [{}])[0]
    lines = [f"== fcdm benchmark summary: {head.get('device', 'no results')} | torch {head.get('torch', '-')} | "
             f"triton {head.get('triton', '-')} | commit {head.get('commit', '-')} | run {head.get('run_id', '-')} =="]
    if ceilings:
        c = ceilings[-1]
        gemm = ", ".join(f"{k} {v:.3g}" for k, v in c["gemm_tflops"].items())
        lines.append(f"ceilings this run: copy {c['copy_gbps']:.4g} GB/s; GEMM TFLOP/s: {gemm}")
    if head.get("device", "").startswith("cpu"):
        lines.append("NOTE: CPU run (no CUDA): smoke values from a perf_counter timer, not speeds")
    goals, records = goal_lines(model_rows, op_rows)
    lines += goals
    lines.append(sample_line(model_rows))
    lines += level_lines(op_rows)
    stage = stage_line(stages)
    if stage:
        lines.append(stage)
    met = sum(r["verdict"] == "met" for r in records)
    lines.append(f"goals met: {met}/{len(records)}; missed: {sum(r['verdict'] == 'MISSED' for r in records)}; "
                 f"not measured: {sum(r['verdict'] == 'not measured' for r in records)}")
    return "\n".join(lines), {"run_id": head.get("run_id"), "device": head.get("device"), "goals": records}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--run-id", default=None, help="default: the latest run in each results file")
    p.add_argument("--stages", type=Path, default=None, help="gpu_check's stages.tsv (name, exit code, seconds)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if not args.results_dir.is_dir():
        p.error(f"--results-dir {args.results_dir} is not a directory")
    text, record = summarize(args.results_dir, args.run_id, args.stages)
    if not args.no_write:
        (args.results_dir / "summary.txt").write_text(text + "\n")
        (args.results_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
