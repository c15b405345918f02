"""The benchmarks run end to end on CPU (tiny shapes, perf_counter timer) and write well-formed results.

No speed is checked here: CPU timings are smoke values. What is checked is that the benchmark compares like with like
(every provider computes the same function and gradients), that the roofline budget matches the kernel design, that the
results files, summary and chart are produced and say what they should, and that gpu_check.sh parses.
"""
from __future__ import annotations

import csv
import os
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import chart, kernel_profile, model as model_bench, ops, roofline, summary
from benchmarks.common import CPU_TIMER, read_jsonl
from benchmarks.dit_baseline import DIT_CONFIGS, build_dit, dit_macs
from benchmarks.providers import (ACTIVATIONS_OF_OP, OPS, Runnable, Unavailable, build, find_cases, setup,
                                  xl_cases)
from fcdm.models.flops import train_flops_per_image
from tests.numerics import assert_rel_close

REPO = Path(__file__).resolve().parent.parent
TINY = find_cases(["tiny-L1"])[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI box is 2 shared cores: oversubscribed threads make tiny ops 10-50x slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ops_results(tmp_path_factory) -> Path:
    """One small CPU run of the op benchmark, shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("ops")
    code = ops.main(["--cases", "tiny-L1", "--ops", "block,grn_mlp", "--dtypes", "fp32",
                     "--providers", "nchw,channels_last,cuda", "--warmup-ms", "1", "--rep-ms", "5",
                     "--device", "cpu", "--results-dir", str(out)])
    assert code == 0
    return out


# ------------------------------------------------------------------------------------------------------- roofline
def test_roofline_budget_matches_kernels_md():
    """FCDM-XL level 1, B=64, bf16: K1 moves 134 MB, each GEMM is 103 GFLOP, the forward floor is 0.27-0.32 ms and
    the backward about 0.8 ms at 2.9 TB/s and 770 TFLOP/s (the design's budget, benchmarks/NOTES.md)."""
    case = xl_cases((256,))[0]
    assert (case.batch, case.height, case.channels) == (64, 32, 512)
    k1, k2, k4 = roofline.op_passes("block", "forward", case, torch.bfloat16)
    assert k1.bytes == pytest.approx(134.2e6, rel=1e-3)
    assert k2.gemm_flops == k4.gemm_flops == pytest.approx(103.1e9, rel=1e-3)
    fwd = roofline.floor_seconds("block", "forward", case, torch.bfloat16, 2944, 769)
    bwd = roofline.floor_seconds("block", "backward", case, torch.bfloat16, 2944, 769)
    full = roofline.floor_seconds("block", "full", case, torch.bfloat16, 2944, 769)
    assert 0.27e-3 <= fwd <= 0.32e-3
    assert 0.7e-3 <= bwd <= 0.95e-3
    assert full == pytest.approx(fwd + bwd)
    # fp32 moves twice the bytes for the same FLOPs; the backward does twice the forward's GEMM work.
    nbytes16, flops16 = roofline.budget("grn_mlp", "forward", case, torch.bfloat16)
    nbytes32, flops32 = roofline.budget("grn_mlp", "forward", case, torch.float32)
    assert nbytes32 == 2 * nbytes16 and flops32 == flops16
    assert roofline.budget("grn_mlp", "backward", case, torch.bfloat16)[1] == 2 * flops16
    with pytest.raises(ValueError, match="mode"):
        roofline.op_passes("block", "sideways", case, torch.bfloat16)
    with pytest.raises(ValueError, match="positive"):
        roofline.floor_seconds("block", "forward", case, torch.bfloat16, 0, 769)


# ------------------------------------------------------------------------------------------------------ providers
@pytest.mark.parametrize("op", OPS)
def test_nchw_and_channels_last_providers_compute_the_same_function(op):
    """The official-layout baseline and fcdm's reference get equal inputs and give equal outputs and gradients."""
    inputs = setup(op, TINY, torch.float32, "cpu")
    runs = [build(inputs, p) for p in ("nchw", "channels_last")]
    assert all(isinstance(r, Runnable) for r in runs)
    grad_nhwc = torch.randn_like(runs[1].output_nhwc())
    for run in runs:
        out = run.forward()
        out.backward(grad_nhwc.permute(0, 3, 1, 2) if run.nchw_output else grad_nhwc)
    assert_rel_close(runs[0].output_nhwc(), runs[1].output_nhwc(), 1e-5, f"{op} output")
    names = list(ACTIVATIONS_OF_OP[op]) + [n for n, _ in inputs.block.named_parameters()]
    assert len(runs[0].leaves) == len(runs[1].leaves) == len(names)
    with_grad = 0
    for name, a, b in zip(names, runs[0].leaves, runs[1].leaves):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is None:  # a parameter of the other half of the block
            continue
        with_grad += 1
        ga = a.grad.permute(0, 2, 3, 1) if a.dim() == 4 and name in ACTIVATIONS_OF_OP[op] else a.grad
        assert torch.count_nonzero(b.grad) > 0, f"{op}: zero gradient for {name}"
        assert_rel_close(ga, b.grad.view_as(ga), 1e-4, f"{op} grad {name}")
    assert with_grad == {"dwconv_ln_modulate": 5, "grn_mlp": 9, "block": 12}[op]  # activations + used params


def test_providers_without_cuda_are_reported_not_run():
    inputs = setup("block", TINY, torch.float32, "cpu")
    for provider in ("triton", "cuda", "compile"):
        result = build(inputs, provider)
        assert isinstance(result, Unavailable) and "CUDA" in result.reason
    with pytest.raises(ValueError, match="provider"):
        build(inputs, "tensorrt")
    with pytest.raises(ValueError, match="op"):
        setup("attention", TINY, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown case"):
        find_cases(["1024px-L1"])


# ---------------------------------------------------------------------------------------------------- op benchmark
def test_ops_benchmark_writes_well_formed_rows(ops_results):
    assert torch.get_float32_matmul_precision() == "highest"  # the benchmark's TF32 setting did not leak out
    rows = read_jsonl(ops_results / "ops.jsonl")
    assert len(rows) == 2 * 3 * 3  # ops x modes x providers
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"nchw", "channels_last"}
    for r in ok:
        assert r["timer"] == CPU_TIMER and r["device"].startswith("cpu")
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and math.isfinite(r["p80_ms"])
        assert r["floor_ms"] > 0 and r["ratio_to_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["rel_err_vs_channels_last"] < 1e-5
        assert r["run_id"] and r["torch"] == torch.__version__ and r["commit"]
    for r in rows:
        if r["provider"] == "nchw" and r["status"] == "ok":
            assert r["speedup_vs_nchw"] == pytest.approx(1.0)
        assert r["speedup_vs_compile"] is None  # compile is n/a on CPU; never invented
    cuda = [r for r in rows if r["provider"] == "cuda"]
    assert cuda and all(r["status"] == "n/a" and r["reason"] and r.get("median_ms") is None for r in cuda)
    with (ops_results / "ops.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ops.CSV_FIELDS and len(table) == len(rows)
    ceilings = read_jsonl(ops_results / "ceilings.jsonl")
    assert len(ceilings) == 1 and ceilings[0]["copy_gbps"] > 0 and ceilings[0]["gemm_tflops"]["float32"] > 0


def test_ops_cli_rejects_bad_arguments(capsys):
    for argv, named in ((["--ops", "attention"], "--ops"), (["--cases", "2048px-L1"], "2048px-L1"),
                        (["--rep-ms", "-1"], "--rep-ms"), (["--dtypes", "fp8"], "--dtypes")):
        with pytest.raises(SystemExit) as exc:
            ops.main(argv + ["--no-write"])
        assert exc.value.code == 2 and named in capsys.readouterr().err


def test_chart_is_a_png_with_every_panel(ops_results, tmp_path):
    out = tmp_path / "chart.png"
    assert chart.main(["--results-dir", str(ops_results), "--dtype", "fp32", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with pytest.raises(SystemExit):
        chart.main(["--results-dir", str(ops_results), "--dtype", "bf16"])  # no bf16 rows in this run


def test_chart_draws_every_provider_a_gpu_run_times(ops_results, tmp_path):
    """On a GPU the run also has triton, cuda and triton_composed rows, which the CPU run never times."""
    rows = [r for r in read_jsonl(ops_results / "ops.jsonl") if r.get("dtype") == "fp32" and r.get("median_ms")]
    extra = [dict(r, provider=p) for r in rows[:3] for p in ("triton", "cuda", "triton_composed")]
    out = chart.draw(rows + extra, tmp_path / "gpu.png", dtype="fp32")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_profile_writes_a_table_per_available_provider(tmp_path, capsys):
    assert kernel_profile.main(["--op", "grn_mlp", "--mode", "backward", "--dtype", "fp32", "--device", "cpu",
                                "--providers", "channels_last,cuda", "--calls", "1", "--results-dir",
                                str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("profile_*.txt"))
    assert [f.name for f in files] == ["profile_grn_mlp_backward_tiny-L1_fp32_channels_last.txt"]
    assert "aten::mm" in files[0].read_text()  # the backward's GEMMs show up
    assert "cuda: n/a" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- model benchmark
def test_model_benchmark_train_and_sample_on_cpu(tmp_path):
    common = ["--model", "FCDM-T", "--batch", "2", "--res", "128", "--precision", "fp32", "--device", "cpu",
              "--results-dir", str(tmp_path)]
    assert model_bench.main(common + ["--mode", "train", "--steps", "2", "--warmup", "1",
                                      "--variants", "reference,official,dit,fused"]) == 0
    assert model_bench.main(common + ["--mode", "sample", "--sample-timed-steps", "2", "--variants", "reference"]) == 0
    rows = read_jsonl(tmp_path / "model.jsonl")
    by = {(r["mode"], r["variant"]): r for r in rows}
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest without a GPU: fused runs there too
    for variant in ("reference", "official", "dit") + (("fused",) if interpreted else ()):
        r = by[("train", variant)]
        assert r["status"] == "ok", r["reason"]
        assert r["img_per_s"] == pytest.approx(2 / (r["ms_per_step"] * 1e-3)) and r["img_per_s"] > 0
        assert r["steps"] == 2 and r["flops_per_image"] > 0
        assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["img_per_s"] / (r["gemm_tflops"] * 1e12))
    fcdm_t = model_bench.FCDM_models["FCDM-T"]()
    assert by[("train", "official")]["flops_per_image"] == by[("train", "reference")]["flops_per_image"] == \
        train_flops_per_image(fcdm_t, 16)  # counted by fcdm.models.flops, 16 = 128 px / 8
    assert by[("train", "official")]["speedup_vs_official"] == pytest.approx(1.0)
    if interpreted:
        assert by[("train", "fused")]["backend"] == "triton"
        assert by[("train", "fused")]["flops_per_image"] == by[("train", "reference")]["flops_per_image"]
    else:
        assert by[("train", "fused")]["status"] == "n/a" and "CUDA" in by[("train", "fused")]["reason"]
    sample = by[("sample", "reference")]
    assert sample["status"] == "ok" and sample["extrapolated_from_steps"] == 2 and sample["img_per_s"] > 0
    assert by[("sample", "reference+graph")]["status"] == "n/a"
    with (tmp_path / "model.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with pytest.raises(SystemExit):
        model_bench.main(common + ["--res", "100"])


def test_train_step_updates_weights_and_fp32_ema():
    """One step moves the weights, and the EMA moves by exactly (1 - decay) of the way towards them."""
    net = model_bench.FCDM_models["FCDM-T"]()
    with torch.no_grad():  # leave adaLN-zero's identity start, so that every parameter gets a gradient
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    step = model_bench.make_train_step(net, 2, 8, torch.device("cpu"), "fp32")
    ema = step.ema
    step()
    moved = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    for (name, p), shadow in zip(net.named_parameters(), ema.shadow):
        assert shadow.dtype == torch.float32
        expected = before[name] + (1 - ema.decay) * (p.detach() - before[name])
        torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------------ DiT baseline
def test_dit_xl2_has_the_papers_size():
    with torch.device("meta"):
        dit = build_dit("DiT-XL/2", 32)
    assert sum(p.numel() for p in dit.parameters()) == pytest.approx(675e6, rel=2e-3)
    assert dit_macs(dit) == pytest.approx(118.6e9, rel=2e-3)  # DiT paper, Table 4: 118.6 Gflops (MACs)
    assert DIT_CONFIGS["DiT-XL/2"] == (28, 1152, 16, 2)


def test_dit_baseline_is_adaln_zero_and_trains():
    dit = build_dit("DiT-T/2", 8)
    x, t, y = torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), torch.randint(0, 1000, (3,))
    out = dit(x, t, y)
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0  # adaLN-Zero: a zero predictor at init
    torch.optim.SGD(dit.parameters(), lr=0.1).zero_grad()
    (dit(x, t, y) - torch.randn(3, 8, 8, 8)).square().mean().backward()
    torch.optim.SGD(dit.parameters(), lr=0.1).step()
    out = dit(x, t, y)
    assert torch.isfinite(out).all() and torch.count_nonzero(out) > 0
    guided = dit.forward_with_cfg(torch.randn(4, 4, 8, 8), torch.full((4,), 500), torch.tensor([1, 2, 1000, 1000]), 4.0)
    assert torch.equal(guided[:2], guided[2:])
    with pytest.raises(ValueError, match="8x8"):
        dit(torch.randn(1, 4, 16, 16), t[:1], y[:1])


# ----------------------------------------------------------------------------------------------------------- summary
def _model_row(run, mode, res, batch, variant, img_per_s, peak=None):
    return {"run_id": run, "device": "NVIDIA H100 80GB HBM3", "bench": "model", "mode": mode, "res": res,
            "batch": batch, "variant": variant, "status": "ok", "reason": "", "img_per_s": img_per_s,
            "peak_gib": peak, "reserved_gib": peak and peak + 1}


def _op_row(run, mode, provider, median_ms):
    return {"run_id": run, "op": "block", "mode": mode, "case": "256px-L1", "dtype": "bf16", "provider": provider,
            "status": "ok", "median_ms": median_ms, "floor_ms": 0.3 if mode == "forward" else 1.1,
            "shape": "64x512x32x32"}


def test_summary_judges_each_goal_from_the_latest_run(tmp_path):
    from benchmarks.common import append_jsonl
    old = [_model_row("r0", "train", 256, 64, "fused", 9999.0, 1.0), _op_row("r0", "forward", "triton", 0.01)]
    new = [_model_row("r1", "train", 256, 64, "fused", 700.0, 21.5),
           _model_row("r1", "train", 256, 64, "official", 166.0, 33.5),
           _model_row("r1", "infer", 256, 256, "fused", 3000.0),
           _model_row("r1", "infer", 256, 256, "fused_compile", 3400.0),
           {**_model_row("r1", "train", 512, 16, "fused", None), "status": "n/a", "reason": "out of memory"},
           _op_row("r1", "forward", "triton", 0.5), _op_row("r1", "forward", "compile", 1.35),
           _op_row("r1", "full", "cuda", 1.2), _op_row("r1", "full", "triton", 1.25)]
    append_jsonl(tmp_path / "model.jsonl", [r for r in old + new if r.get("bench") == "model"])
    append_jsonl(tmp_path / "ops.jsonl", [r for r in old + new if r.get("op")])
    (tmp_path / "stages.tsv").write_text("install\t0\t40\nmodel\t124\t140\n")
    assert summary.main(["--results-dir", str(tmp_path), "--stages", str(tmp_path / "stages.tsv")]) == 0
    record = json.loads((tmp_path / "summary.json").read_text())
    verdicts = {g["goal"].strip(): (g["verdict"], g["value"], g["by"]) for g in record["goals"]}
    assert verdicts["train 256px B=64"] == ("met", 700.0, "fused")
    assert verdicts["peak memory (AdamW+fp32 EMA)"] == ("MISSED", 21.5, "fused")
    assert verdicts["train 512px B=16"][0] == "not measured"
    assert verdicts["infer 256px B=256"] == ("met", 3400.0, "fused_compile")  # the best fcdm variant counts
    assert verdicts["block 64x512x32x32 fwd"] == ("MISSED", 0.5, "triton")
    assert verdicts["block 64x512x32x32 fwd+bwd"] == ("met", 1.2, "cuda")
    text = (tmp_path / "summary.txt").read_text()
    assert "out of memory" in text and "model TIMEOUT 140s" in text and "goals met: 3/6" in text
    assert len(text.splitlines()) <= 30


def test_summary_of_the_cpu_run_says_not_measured(ops_results):
    text, record = summary.summarize(ops_results)
    assert "CPU run" in text
    assert all(g["verdict"] == "not measured" and g["value"] is None for g in record["goals"])


# ------------------------------------------------------------------------------------------------------ gpu_check.sh
def test_gpu_check_script_parses_and_keeps_its_promises():
    script = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    for needed in ("set -uo pipefail", "pip install --no-deps --no-build-isolation",
                   "pytest -m \"gpu and not slow and not gemm_candidates\"", "pytest -m gemm_candidates",
                   "FCDM_FORCE_CUDA=1", "TORCH_CUDA_ARCH_LIST", "timeout", "benchmarks.ops --quick",
                   "benchmarks.model --suite", "benchmarks.chart", "$OUT"):
        assert needed in text, needed
    assert text.rstrip().splitlines()[-1].lstrip().startswith("timeout") and "benchmarks.summary" in \
        text.rstrip().splitlines()[-1]  # the summary is the last thing printed


def test_triton_composed_provider_runs_the_two_ops_and_matches_the_block(monkeypatch):
    """The composed block (two ops) computes the same function as the block module; n/a for single ops."""
    import benchmarks.providers as providers
    from benchmarks.providers import fcdm_block, fcdm_block_composed
    inputs = setup("block", find_cases(["tiny-L1"])[0], torch.float64, "cpu")
    block, x, c = inputs.block, inputs.activations["x"], inputs.activations["c"]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero adaLN, so gate and modulation matter
        torch.testing.assert_close(fcdm_block_composed(block, x, c), fcdm_block(block, x, c), rtol=1e-12, atol=1e-12)
    assert "only for the whole block" in providers.unavailable_reason("grn_mlp", "triton_composed", "cpu")
