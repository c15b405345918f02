"""Predicted peak memory of a training step, from a fake-tensor trace: no GPU, no real allocation.

    python -m benchmarks.memory --model FCDM-XL --batch 64 --res 256
    python -m benchmarks.memory --suite quick --results-dir DIR      # the goal cases: 256px B=64 and 512px B=16

The step is exactly the one `benchmarks.model` times (bf16 autocast over fp32 master weights, fused AdamW, an fp32
EMA), built by the same functions, run twice under FakeTensorMode with torch's MemTracker counting every tensor's
bytes by role; the peak of the second (steady-state) step is reported. Fake tensors live on the CPU, so CPU autocast
stands in for CUDA's (both cast convolutions and matmuls to bf16), and the fused variant traces the Triton block
op's fake kernel, which allocates and saves exactly what the GPU kernels do.

What a trace cannot see, and a GPU run adds on top: the CUDA context, cuBLAS/cuDNN workspaces, the caching
allocator's rounding and fragmentation, and Triton's autotuning scratch. `max_memory_allocated` on the GPU excludes
the context and workspaces that live outside the allocator, so it should land at or slightly above this prediction.

The same trace counts the bytes that the step's glue copies write (dtype casts, layout copies, concatenations,
pixel shuffles): memory traffic outside the kernels, which bounds what fusing the glue could save.

A trace sees each fused op's outputs only, not what its launcher allocates and frees inside (u between the GEMMs, the
backward's intermediate gradients, fp32 partial sums). So each Triton op's transient memory is also reported per
U-Net level, forward and backward: its launcher run on meta tensors with the configs it picks on CUDA and every kernel
stubbed (fcdm_kernels.triton.dry_run), an exact count of the bytes it holds besides its inputs and outputs at its
peak (written to transient.jsonl).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fcdm.models import FCDM_CONFIGS, FCDM_models
from fcdm.optim import use_fused_adamw
from fcdm_kernels import dispatch

from . import common
from .model import _backend_context, build_variant, make_train_step

VARIANTS = ("official", "reference", "fused", "dit")
# What each MemTracker role is called here; the EMA's fp32 copy is the only tensor tracked as "Other".
ROLES = {"Parameter": "params", "Buffer": "buffers", "Gradient": "grads", "Optstate": "adamw", "Other": "ema",
         "Activation": "activations", "Temp": "temporaries"}
SUITES = {"quick": (("FCDM-XL", 64, 256), ("FCDM-XL", 16, 512)), "tiny": (("FCDM-T", 2, 64),)}


@contextlib.contextmanager
def _fused_ops_on_fake_cpu():
    """Let dispatch resolve the Triton backend for CPU tensors while tracing: no kernel runs under FakeTensorMode,
    only the ops' fake implementations, so the interpreter flag merely unlocks the resolution."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _mem_tracker():
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as e:  # a private module: say which torch lacks it rather than failing obscurely
        raise RuntimeError(f"torch {torch.__version__} has no torch.distributed._tools.mem_tracker ({e}); "
                           f"the memory prediction needs torch >= 2.5") from None
    return MemTracker()


class CopyTraffic(TorchDispatchMode):
    """Bytes written by the glue copies of the ops run under it, by kind: dtype casts (autocast's weight casts and
    the fp32 gradients they return), layout copies (clone, contiguous, same-dtype copies), concatenations and pixel
    (un)shuffles. Each is read about as much as it is written, so 2x this is its memory traffic."""

    KINDS = ("casts", "layout", "concat", "shuffle")

    def __init__(self):
        super().__init__()
        self.bytes = dict.fromkeys(self.KINDS, 0)

    def _kind(self, func, args, out):
        aten = torch.ops.aten
        if func in (aten.cat.default, aten.cat.out):
            return "concat"
        if func in (aten.pixel_shuffle.default, aten.pixel_unshuffle.default):
            return "shuffle"
        if func in (aten._to_copy.default, aten.copy_.default, aten.clone.default):
            source = args[1] if func is aten.copy_.default else args[0]
            return "casts" if source.dtype != out.dtype else "layout"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            kind = self._kind(func, args, out)
            if kind is not None:
                self.bytes[kind] += out.numel() * out.element_size()
        return out


def predict_train_step(variant: str, model_name: str, batch: int, res: int, grad_checkpointing: bool = False,
                       precision: str = "bf16", copies: dict | None = None) -> dict:
    """Peak bytes of one steady-state training step, by role, plus 'total' (all in bytes). If `copies` is a dict,
    it receives the bytes the step's glue copies write, by CopyTraffic kind."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if model_name not in FCDM_models:
        raise ValueError(f"model must be one of {sorted(FCDM_models)}, got {model_name!r}")
    if batch < 1 or res % 32:
        raise ValueError(f"batch must be positive and res a multiple of 32, got batch={batch}, res={res}")
    cpu = torch.device("cpu")
    dit = "DiT-T/2" if model_name == "FCDM-T" else "DiT-XL/2"
    fused = variant == "fused"
    if fused and dispatch.unavailable_reason("convnext_block", "triton", torch.device("cuda")) is not None:
        raise RuntimeError("the fused variant traces the Triton backend, which cannot be loaded here: "
                           + dispatch.unavailable_reason("convnext_block", "triton", torch.device("cuda")))
    with FakeTensorMode(), (_fused_ops_on_fake_cpu() if fused else contextlib.nullcontext()):
        built = build_variant(variant, model_name, dit, res // 8, cpu, "blocks", grad_checkpointing,
                              fused_backend="triton" if fused else None)
        # The step predicted is a CUDA one: the trainer's optimiser as fcdm.optim builds it there (fused AdamW).
        step = make_train_step(built.model, batch, res // 8, cpu, precision, fused_optimizer=use_fused_adamw("cuda"))
        tracker = _mem_tracker()
        tracker.track_external(built.model, step.optimizer, *step.ema.shadow)
        traffic = CopyTraffic()
        with tracker, _backend_context(built.backend):
            step()  # the first step creates AdamW's state
            tracker.reset_mod_stats()
            with traffic:
                step()
        peak = tracker.get_tracker_snapshot("peak")
    if copies is not None:
        copies.update(traffic.bytes)
    by_role = next(iter(peak.values()), {})
    out = {name: 0 for name in ROLES.values()}
    for role, nbytes in by_role.items():
        key = getattr(role, "value", role)
        if key == "Total":
            out["total"] = nbytes
        else:
            out[ROLES.get(key, key)] = nbytes
    out.setdefault("total", sum(v for k, v in out.items()))
    return out


def prediction_row(variant: str, model_name: str, batch: int, res: int, grad_checkpointing: bool, env: dict) -> dict:
    row = dict(env, bench="memory", mode="train", model=model_name, variant=variant, batch=batch, res=res,
               precision="bf16", grad_checkpointing=grad_checkpointing)
    try:
        copies = {}
        gib = {k: v / 2 ** 30 for k, v in predict_train_step(variant, model_name, batch, res,
                                                             grad_checkpointing, copies=copies).items()}
        row.update(status="ok", reason="", predicted_gib=gib.pop("total"), **{f"{k}_gib": v for k, v in gib.items()},
                   **{f"copies_{k}_gib": v / 2 ** 30 for k, v in copies.items()})
    except Exception as e:  # one variant that cannot be traced must not lose the others' rows
        row.update(status="n/a", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return row


def transient_rows(model_name: str, batch: int, res: int, env: dict) -> list[dict]:
    """Per U-Net level of the model and per Triton op and pass (bf16, as trained): the bytes its launcher holds at its
    peak besides its inputs and outputs ("workspace", its transient memory) and the bytes it returns, also as
    multiples of the level's activation x (module docstring)."""
    hidden, _ = FCDM_CONFIGS[model_name]
    rows = []
    for level in (1, 2, 3):
        side, C = (res // 8) >> (level - 1), hidden << (level - 1)
        base = dict(env, bench="transient", model=model_name, batch=batch, res=res, level=level, precision="bf16",
                    shape=f"{batch}x{side}x{side}x{C}")
        try:
            from fcdm_kernels.triton.dry_run import dry_run, op_launchers
            launchers = op_launchers(batch, side, side, C, torch.bfloat16)
        except Exception as e:  # Triton missing: say so in the rows rather than lose the train-step predictions
            rows.append(dict(base, op="all", status="n/a", reason=f"{type(e).__name__}: {e}"))
            continue
        x_bytes = batch * side * side * C * 2
        for name, (launcher, args) in launchers.items():
            op, phase = name.split()
            report = dry_run(launcher, *args)
            rows.append(dict(base, op=op, phase=phase, status="ok", reason="", x_gib=x_bytes / 2 ** 30,
                             workspace_gib=report.workspace_bytes / 2 ** 30, outputs_gib=report.output_bytes / 2 ** 30,
                             workspace_vs_x=report.workspace_bytes / x_bytes, launches=len(report.launches)))
    return rows


def format_transient_row(r: dict) -> str:
    head = f"transient {r['model']:<8} B={r['batch']:<4} {r['res']:>4}px L{r['level']} {r['shape']:<16}"
    if r["status"] != "ok":
        return f"{head} n/a: {r['reason']}"
    return (f"{head} {r['op']:<18} {r['phase']:<8} workspace {r['workspace_gib']:.4g} GiB = "
            f"{r['workspace_vs_x']:.2f} x  outputs {r['outputs_gib']:.4g} GiB  ({r['launches']} launches)")


def format_row(r: dict) -> str:
    head = f"train  {r['model']:<8} B={r['batch']:<4} {r['res']:>4}px {r['variant']:<10}"
    if r["status"] != "ok":
        return f"{head} n/a: {r['reason']}"
    parts = "  ".join(f"{name} {r[f'{name}_gib']:.3g}" for name in ("params", "grads", "adamw", "ema", "activations",
                                                                    "temporaries"))
    copies = "  ".join(f"{kind} {r[f'copies_{kind}_gib']:.3g}" for kind in CopyTraffic.KINDS)
    return f"{head} predicted peak {r['predicted_gib']:.4g} GiB = {parts}\n{'':44} glue copies written per step " \
           f"(GiB): {copies}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="FCDM-XL", choices=sorted(FCDM_models))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--res", type=int, default=256, help="image resolution in pixels; the latent is res/8")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {VARIANTS}")
    p.add_argument("--suite", choices=tuple(SUITES), default=None,
                   help="a fixed set of cases instead of one (ignores --model/--batch/--res)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    p.add_argument("--no-write", action="store_true")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be positive, got {args.batch}")
    if args.res % 32:
        p.error(f"--res must be a multiple of 32 (latent res/8 divisible by 4), got {args.res}")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants must be a comma list from {VARIANTS}, got {args.variants!r}")
    cases = SUITES[args.suite] if args.suite else ((args.model, args.batch, args.res),)
    env = common.environment(torch.device("cpu"))
    print(f"# predicted from a fake-tensor trace (no GPU) | torch {env['torch']} | commit {env['commit']} | "
          f"run {env['run_id']}", flush=True)
    rows, transient = [], []
    for model_name, batch, res in cases:
        for variant in variants:
            rows.append(prediction_row(variant, model_name, batch, res, args.grad_checkpointing, env))
            print(format_row(rows[-1]), flush=True)
    print("# each Triton op's transient memory (launcher on meta tensors, CUDA configs; x = the level's activation)")
    for model_name, batch, res in cases:
        for row in transient_rows(model_name, batch, res, env):
            transient.append(row)
            print(format_transient_row(row), flush=True)
    if not args.no_write:
        common.append_jsonl(Path(args.results_dir) / "memory.jsonl", rows)
        common.append_jsonl(Path(args.results_dir) / "transient.jsonl", transient)
    return 0 if all(r["status"] == "ok" for r in rows + transient) else 1


if __name__ == "__main__":
    sys.exit(main())
