"""Whole-model throughput: training steps, inference forwards and the sampling loop, per variant, in one process.

    python -m benchmarks.model --model FCDM-XL --batch 64 --res 256 --mode train
    python -m benchmarks.model --model FCDM-XL --batch 256 --res 256 --mode infer
    python -m benchmarks.model --model FCDM-XL --batch 32 --res 256 --mode sample   # 250-step DDPM with CFG
    python -m benchmarks.model --suite quick                                          # what gpu_check.sh runs

Variants, all measured in the same run so every speed is a ratio against the same baselines:
    official          the official FCDM layout (NCHW modules), eager
    official_compile  torch.compile of it (per block with --compile-scope blocks, the whole model with full)
    reference         fcdm's channels-last model on the reference ops (`torch` backend), eager
    fused             fcdm on its fused kernels (`auto` backend: Triton or CUDA), eager
    fused_compile     torch.compile of the fused model
    dit               the DiT-XL/2-sized transformer of benchmarks/dit_baseline.py (SDPA), eager

A training step is forward + backward under bf16 autocast (fp32 master weights), AdamW and an fp32 EMA update, on a
fixed batch (no data loading). Peak memory is torch.cuda.max_memory_allocated over the timed steps (reserved too), so
it includes parameters, gradients, AdamW state and the EMA. MFU is counted FLOPs per second over the bf16 GEMM rate
measured in the same run. The sampler is a 250-step DDPM with classifier-free guidance (the doubled batch runs as one
forward), with and without CUDA-graph capture of the denoiser; in the quick suite it times fewer steps of the same
chain and scales to 250 (rows say so).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcdm.models import FCDM_CONFIGS, FCDM_models
from fcdm.models.fcdm import ConvNeXtBlock
from fcdm.models.flops import count_macs
from fcdm.models.official_layout import NCHWBlock, NCHWFCDM
from fcdm.optim import PAPER_LR, PAPER_WEIGHT_DECAY, build_optimizer
from fcdm_kernels import dispatch, use_backend

from . import common, roofline
from .dit_baseline import DIT_CONFIGS, DiTBlock, build_dit, dit_macs
from .sampling_loop import SAMPLE_STEPS, make_sample_run

VARIANTS = ("official", "official_compile", "reference", "fused", "fused_compile", "dit")
MODES = ("train", "infer", "sample")
CSV_FIELDS = ["run_id", "time_utc", "device", "torch", "triton", "cuda", "commit", "bench", "mode", "model", "variant",
              "batch", "res", "precision", "status", "reason", "ms_per_step", "img_per_s", "mfu", "peak_gib",
              "reserved_gib", "speedup_vs_official", "speedup_vs_official_compile", "speedup_vs_reference",
              "speedup_vs_dit", "backend", "compile_scope", "cuda_graph", "grad_checkpointing", "steps", "sampler"]


@dataclass
class Built:
    """A model ready to time: the module, the fcdm backend to run it under, and its FLOPs per image forward."""

    model: nn.Module
    backend: str | None
    forward_flops: float
    label: str


class Unavailable(Exception):
    """This variant cannot run here; the message says why (reported as n/a)."""


# ----------------------------------------------------------------------------------------------------------- models
def _fused_backend(device: torch.device) -> str:
    """What `auto` runs the blocks on, as a label (e.g. "auto(triton convnext_block op)"), or raise Unavailable."""
    if device.type != "cuda":
        if device.type == "cpu" and dispatch.unavailable_reason("grn_mlp", "triton", device) is None:
            return "triton"  # the Triton interpreter (TRITON_INTERPRET=1): a smoke run of the fused path, not a speed
        raise Unavailable("the fused kernels are timed on CUDA only (TRITON_INTERPRET=1 smoke-runs them on CPU)")
    with use_backend("auto"):
        plan = dispatch.block_plan(torch.empty(1, 1, 1, 8, device=device))  # what the model's blocks will run
    if plan.conv_backend == plan.mlp_backend == "torch":
        reasons = {b: dispatch.unavailable_reason("grn_mlp", b, device) for b in ("triton", "cuda")}
        raise Unavailable("no fused backend is available: " + "; ".join(f"{b}: {r}" for b, r in reasons.items()))
    return f"auto({plan.describe()})"


def _compile_blocks(model: nn.Module) -> None:
    """Regional compilation: each ConvNeXt block is compiled once per level shape and reused by its siblings."""
    for m in model.modules():
        if isinstance(m, (ConvNeXtBlock, NCHWBlock, DiTBlock)):
            m.compile(dynamic=False)


def build_variant(variant: str, model_name: str, dit_name: str, latent: int, device: torch.device,
                  compile_scope: str, grad_checkpointing: bool, fused_backend: str | None = None) -> Built:
    """The model of one variant on `device`. `fused_backend` names the backend of the fused variant instead of probing
    what `auto` would run here (the memory predictor traces the Triton path on fake CPU tensors)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant.endswith("_compile") and device.type != "cuda" and os.environ.get("FCDM_BENCH_CPU_COMPILE") != "1":
        raise Unavailable("torch.compile is timed on CUDA only (set FCDM_BENCH_CPU_COMPILE=1 to try inductor on CPU)")
    C, depth = FCDM_CONFIGS[model_name]
    fcdm_flops = 2 * count_macs(C, depth, latent)
    with device:  # initialise on the device: a 700 M-parameter init on the host CPU costs seconds per variant
        if variant == "dit":
            model = build_dit(dit_name, latent)
            built = Built(model, None, 2 * dit_macs(model), dit_name)
        elif variant.startswith("official"):
            model = NCHWFCDM(hidden_size=C, depth=depth, grad_checkpointing=grad_checkpointing)
            built = Built(model, None, fcdm_flops, f"{model_name} official layout")
        else:
            backend = "torch" if variant == "reference" else fused_backend or _fused_backend(device)
            model = FCDM_models[model_name](grad_checkpointing=grad_checkpointing)
            built = Built(model, backend, fcdm_flops, f"{model_name} channels-last")
    if any(t.device != device for t in built.model.state_dict().values()):  # a no-op .to() breaks fake tensors
        built.model.to(device)
    if variant.endswith("_compile"):
        import torch._dynamo
        torch._dynamo.reset()
        common.allow_recompiles()
        if compile_scope == "blocks":
            _compile_blocks(built.model)
        else:
            built.model = torch.compile(built.model, dynamic=False)
    return built


def _backend_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    return use_backend("auto" if backend.startswith("auto") else backend)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class FP32EMA:
    """Exponential moving average of the parameters in fp32, updated with one fused foreach lerp per step."""

    def __init__(self, params, decay: float = 0.9999):
        self.params = [p for p in params]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)


# ------------------------------------------------------------------------------------------------------- one step
def _inputs(batch: int, latent: int, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(batch, 4, latent, latent, generator=gen, device=device)
    noise = torch.randn(batch, 4, latent, latent, generator=gen, device=device)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    y = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    return x0, noise, t, y


def make_train_step(model: nn.Module, batch: int, latent: int, device, precision: str,
                    fused_optimizer: bool | None = None) -> Callable[[], None]:
    """forward + backward (bf16 autocast, fp32 master weights) + AdamW + fp32 EMA on one fixed batch. AdamW is the
    fused kernel on CUDA (no parameter-sized temporaries) unless `fused_optimizer` says otherwise."""
    x0, noise, t, y = _inputs(batch, latent, device)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64, device=device)
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise  # the eps-prediction objective's input
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, PAPER_LR, PAPER_WEIGHT_DECAY, device, fused=fused_optimizer)  # the trainer's
    ema = FP32EMA(params)
    model.train()

    def step():
        with _autocast(device, precision):
            out = model(x_t, t, y)
        loss = F.mse_loss(out[:, :4].float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
    step.optimizer, step.ema = opt, ema
    return step


def make_infer_step(model: nn.Module, batch: int, latent: int, device, precision: str) -> Callable[[], None]:
    x0, _, t, y = _inputs(batch, latent, device)
    model.eval()

    def step():
        with torch.no_grad(), _autocast(device, precision):
            model(x0, t, y)
    return step


# -------------------------------------------------------------------------------------------------------- measuring
def _timed(step: Callable[[], None], warmup: int, steps: int, device) -> tuple[float, float | None, float | None]:
    """ms per step over `steps` calls after `warmup` calls; peak and reserved GiB over the timed calls."""
    for _ in range(warmup):
        step()
    common.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    common.sync(device)
    ms = (time.perf_counter() - start) * 1e3 / steps
    if device.type != "cuda":
        return ms, None, None
    return ms, torch.cuda.max_memory_allocated(device) / 2 ** 30, torch.cuda.max_memory_reserved(device) / 2 ** 30


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import torch._dynamo
        torch._dynamo.reset()
    except Exception:
        pass


def measure(mode: str, variant: str, args, device, gemm_tflops: float, env: dict, cuda_graph: bool = False) -> dict:
    """One row: one variant in one mode."""
    latent = args.res // 8
    row = dict(env, bench="model", mode=mode, model=args.model, variant=variant + ("+graph" if cuda_graph else ""),
               batch=args.batch, res=args.res, precision=args.precision, compile_scope=args.compile_scope
               if variant.endswith("_compile") else None, cuda_graph=cuda_graph,
               grad_checkpointing=args.grad_checkpointing, gemm_tflops=gemm_tflops)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if cuda_graph and device.type != "cuda":
            raise Unavailable("CUDA graphs need CUDA")
        built = build_variant(variant, args.model, args.dit, latent, device, args.compile_scope,
                              args.grad_checkpointing)
        row.update(backend=built.backend, label=built.label,
                   params_m=sum(p.numel() for p in built.model.parameters()) / 1e6)
        with _backend_context(built.backend):
            if mode == "train":
                step = make_train_step(built.model, args.batch, latent, device, args.precision)
                flops = 3 * built.forward_flops * args.batch
                warmup = args.warmup + (2 if variant.endswith("_compile") else 0)
                ms, peak, reserved = _timed(step, warmup, args.steps, device)
                steps_timed, sampler = args.steps, None
            elif mode == "infer":
                step = make_infer_step(built.model, args.batch, latent, device, args.precision)
                flops = built.forward_flops * args.batch
                warmup = args.warmup + (2 if variant.endswith("_compile") else 0)
                ms, peak, reserved = _timed(step, warmup, args.steps, device)
                steps_timed, sampler = args.steps, None
            else:
                steps_timed = args.sample_timed_steps or SAMPLE_STEPS
                run, sampler = make_sample_run(built.model, args.batch, latent, device, args.precision,
                                               steps_timed, args.cfg_scale, cuda_graph)
                ms_run, peak, reserved = _timed(run, 1, 1, device)
                ms = ms_run / steps_timed * SAMPLE_STEPS  # one 250-step sample of the batch
                flops = None
        img_per_s = args.batch / (ms * 1e-3)
        row.update(status="ok", reason="", ms_per_step=ms, img_per_s=img_per_s, peak_gib=peak, reserved_gib=reserved,
                   steps=steps_timed, sampler=sampler, flops_per_image=flops / args.batch if flops else None,
                   mfu=flops / (ms * 1e-3) / (gemm_tflops * 1e12) if flops and gemm_tflops else None,
                   extrapolated_from_steps=steps_timed if mode == "sample" and steps_timed != SAMPLE_STEPS else None)
    except Unavailable as e:
        row.update(status="n/a", reason=str(e))
    except torch.OutOfMemoryError as e:
        row.update(status="n/a", reason=f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:  # one broken variant must not lose the others' rows
        row.update(status="n/a", reason=f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        built = step = run = None  # noqa: F841  (drop the model, optimizer and graphs before the next variant)
        _release(device)
    return row


def add_speedups(rows: list[dict]) -> None:
    """img/s of each row over that of each baseline measured in the same run at the same mode, model, batch, res."""
    key = lambda r: (r["mode"], r["model"], r["batch"], r["res"])  # noqa: E731
    ok = {(key(r), r["variant"]): r for r in rows if r.get("img_per_s")}
    for r in rows:
        for base in ("official", "official_compile", "reference", "dit"):
            b = ok.get((key(r), base))
            r[f"speedup_vs_{base}"] = r["img_per_s"] / b["img_per_s"] if r.get("img_per_s") and b else None


def format_row(r: dict) -> str:
    f = common.fmt
    head = f"{r['mode']:<6} {r['model']:<8} B={r['batch']:<4} {r['res']:>4}px {r['variant']:<18}"
    if r["status"] != "ok":
        return f"{head} n/a: {r['reason']}"
    return (f"{head} {f(r['ms_per_step'], '9.2f')} ms {f(r['img_per_s'], '8.1f')} img/s  MFU {f(r['mfu'], '5.1%')}"
            f"  peak {f(r['peak_gib'], '5.1f')} GiB (reserved {f(r['reserved_gib'], '5.1f')})"
            f"  x official {f(r['speedup_vs_official'], '.2f')}  x compile {f(r['speedup_vs_official_compile'], '.2f')}"
            f"  x DiT {f(r['speedup_vs_dit'], '.2f')}")


# ------------------------------------------------------------------------------------------------------------ suites
@dataclass(frozen=True)
class Group:
    """One model benchmark case: mode, size, and the variants to time side by side."""

    mode: str
    model: str
    batch: int
    res: int
    variants: tuple
    graphs: tuple = (False,)


def suite(name: str) -> list[Group]:
    """quick: the cases of the performance goals at gpu_check's budget, eager first and the compiles (~20 s each) last, so a
    time-boxed run loses the fewest rows; full: every variant everywhere; tiny: a CPU smoke run of every path."""
    eager = ("fused", "official", "reference", "dit")
    compiled = ("official_compile", "fused_compile")
    if name == "quick":
        return [Group("train", "FCDM-XL", 64, 256, eager),
                Group("infer", "FCDM-XL", 256, 256, eager),
                Group("train", "FCDM-XL", 16, 512, ("fused", "official", "dit")),
                Group("sample", "FCDM-XL", 32, 256, ("fused", "official"), (False, True)),
                Group("train", "FCDM-XL", 64, 256, compiled),
                Group("infer", "FCDM-XL", 256, 256, compiled)]
    if name == "full":
        return [Group("train", "FCDM-XL", 64, 256, eager + compiled),
                Group("infer", "FCDM-XL", 256, 256, eager + compiled),
                Group("train", "FCDM-XL", 16, 512, eager + compiled),
                Group("sample", "FCDM-XL", 32, 256, ("fused", "reference", "official", "dit"), (False, True))]
    if name == "tiny":
        return [Group("train", "FCDM-T", 2, 128, ("reference", "official", "dit", "fused")),
                Group("infer", "FCDM-T", 2, 128, ("reference", "official", "dit")),
                Group("sample", "FCDM-T", 2, 128, ("reference",), (False, True))]
    raise ValueError(f"suite must be quick, full or tiny, got {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="FCDM-XL", choices=sorted(FCDM_models))
    p.add_argument("--dit", default=None, choices=sorted(DIT_CONFIGS),
                   help="the transformer baseline (default DiT-XL/2; DiT-T/2 for FCDM-T)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--res", type=int, default=256, help="image resolution in pixels; the latent is res/8")
    p.add_argument("--mode", default="train", choices=MODES)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {VARIANTS}")
    p.add_argument("--suite", choices=("quick", "full", "tiny"), default=None,
                   help="run a fixed set of cases instead of one (ignores --model/--batch/--res/--mode/--variants)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick suite 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick suite 2)")
    p.add_argument("--sample-timed-steps", type=int, default=None,
                   help="DDPM steps actually run in --mode sample, scaled to 250 (default 250; quick suite 10)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--graph", choices=("off", "on", "both"), default="both", help="CUDA-graph the denoiser (sample)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast or plain fp32")
    p.add_argument("--compile-scope", choices=("blocks", "full"), default="blocks",
                   help="torch.compile each block (reused across a level) or the whole model")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--no-write", action="store_true")
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    for name in ("batch", "steps", "warmup", "sample_timed_steps"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name != "warmup")):
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.res % 32:
        p.error(f"--res must be a multiple of 32 (latent res/8 divisible by 4), got {args.res}")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants must be a comma list from {VARIANTS}, got {args.variants!r}")
    args.variants = variants


def main(argv=None) -> int:
    with common.tf32_matmuls():
        return _main(argv)


def _main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    device = torch.device(args.device) if args.device else common.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    quick = args.suite == "quick"
    args.steps = args.steps or (4 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    if args.suite:
        groups = suite(args.suite)
        args.sample_timed_steps = args.sample_timed_steps or {"quick": 10, "tiny": 3}.get(args.suite)
    else:
        graphs = {"off": (False,), "on": (True,), "both": (False, True)}[args.graph] if args.mode == "sample" \
            else (False,)
        groups = [Group(args.mode, args.model, args.batch, args.res, args.variants, graphs)]

    env = common.environment(device)
    ceilings = roofline.measure_ceilings(device, (torch.bfloat16,), quick=True)
    gemm = ceilings.gemm_tflops["bfloat16"]
    print(f"# {env['device']} | torch {env['torch']} | commit {env['commit']} | run {env['run_id']} | "
          f"bf16 GEMM {gemm:.1f} TFLOP/s measured now (the MFU denominator)", flush=True)
    if device.type != "cuda":
        print("# no CUDA: wall-clock on CPU; these numbers are smoke values, not speeds", flush=True)
    all_rows: list[dict] = []
    for g in groups:
        args.model, args.batch, args.res, args.mode = g.model, g.batch, g.res, g.mode
        if args.dit is None or args.suite:
            args.dit = "DiT-T/2" if g.model == "FCDM-T" else "DiT-XL/2"
        rows = []
        for variant in g.variants:
            for graph in g.graphs:
                rows.append(measure(g.mode, variant, args, device, gemm, env, cuda_graph=graph))
                all_rows.append(rows[-1])
                add_speedups(all_rows)  # against every baseline measured so far in this run
                print(format_row(rows[-1]), flush=True)
        if not args.no_write:  # per group, so a time-boxed run keeps what it measured
            common.append_jsonl(Path(args.results_dir) / "model.jsonl", rows)
            common.append_csv(Path(args.results_dir) / "model.csv", rows, CSV_FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
