"""Benchmark inputs and providers: one setup function per op, so tests and benchmarks build inputs the same way.

A *case* is one FCDM-XL U-Net level at one resolution (batch, H, W, C). An *op* is `dwconv_ln_modulate`, `grn_mlp`
or the whole `block` (both ops plus its adaLN linear). A *provider* is one way of running an op:

    nchw           the official layout, eager: NCHWBlock's modules on NCHW tensors (what the official code runs)
    channels_last  fcdm's reference ops on NHWC tensors, eager (the `torch` backend)
    compile        torch.compile of the nchw provider (what users get by compiling the official code)
    triton, cuda   fcdm's fused kernels, via fcdm.use_backend(...)

Every provider of one (op, case, dtype) shares the same parameters and activations, so they compute the same
function and can be checked against each other before they are timed. A provider that cannot run here is returned as
`Unavailable(reason)`, never raised, so a benchmark table always completes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fcdm_kernels import dispatch, dwconv_ln_modulate, grn_mlp, use_backend, use_deterministic
from fcdm.models.fcdm import ConvNeXtBlock
from fcdm.models.official_layout import NCHWBlock, _layer_norm_over_channels

OPS = ("dwconv_ln_modulate", "grn_mlp", "block")
# triton_composed: the block as the two Triton ops (saving h and z) instead of the single convnext_block op, to
# measure what the lean-saves block op gains or costs. triton runs the fixed-order (deterministic) reductions, the
# default; triton_atomic the relaxed fp32 atomics instead, to measure what determinism costs.
PROVIDERS = ("nchw", "channels_last", "compile", "triton", "triton_composed", "triton_atomic", "cuda")
MODES = ("forward", "backward", "full")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The fused kernels each op needs, as registered in fcdm_kernels.dispatch.
KERNELS_OF_OP = {"dwconv_ln_modulate": ("dwconv_ln_modulate",), "grn_mlp": ("grn_mlp",),
                 "block": ("dwconv_ln_modulate", "grn_mlp")}
# Activation arguments of each op, in call order; 4-D ones are NHWC here and NCHW for the official layout.
ACTIVATIONS_OF_OP = {"dwconv_ln_modulate": ("x", "shift", "scale"), "grn_mlp": ("h", "x", "gate"),
                     "block": ("x", "c")}

XL_WIDTH = 512
BATCH_FOR_RES = {256: 64, 512: 16}  # the batch sizes of the training goals (README, Performance)


@dataclass(frozen=True)
class Case:
    """One benchmark shape: a batch of (B, H, W, C) activations at one U-Net level."""

    name: str
    batch: int
    height: int
    width: int
    channels: int
    mlp_ratio: int = 3

    @property
    def hidden(self) -> int:
        return self.channels * self.mlp_ratio

    @property
    def rows(self) -> int:
        """Pixels in the batch: the M of the block's GEMMs."""
        return self.batch * self.height * self.width

    def shape(self) -> str:
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}"


def xl_cases(resolutions=(256, 512)) -> list[Case]:
    """FCDM-XL's three levels at each image resolution (latent = res / 8; C doubles as the side halves)."""
    cases = []
    for res in resolutions:
        if res not in BATCH_FOR_RES:
            raise ValueError(f"resolution must be one of {sorted(BATCH_FOR_RES)}, got {res}")
        for level in (1, 2, 3):
            side = (res // 8) >> (level - 1)
            cases.append(Case(f"{res}px-L{level}", BATCH_FOR_RES[res], side, side, XL_WIDTH << (level - 1)))
    return cases


# Shapes small enough for the CPU smoke run; odd sizes so layout mistakes cannot hide behind symmetry.
TINY_CASES = (Case("tiny-L1", 2, 8, 6, 32), Case("tiny-L3", 3, 4, 4, 64))
ALL_CASES = {c.name: c for c in (*xl_cases(), *TINY_CASES)}


def find_cases(names) -> list[Case]:
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {sorted(ALL_CASES)}")
    return [ALL_CASES[n] for n in names]


# ---------------------------------------------------------------------------------------------------------------- setup
@dataclass
class OpInputs:
    """Parameters (as fcdm's NHWC block and the official NCHW block, equal) and NHWC activations of one op."""

    op: str
    case: Case
    dtype: torch.dtype
    block: ConvNeXtBlock
    official: NCHWBlock
    activations: dict[str, torch.Tensor]


def make_blocks(case: Case, dtype: torch.dtype, device, seed: int = 0) -> tuple[ConvNeXtBlock, NCHWBlock]:
    """fcdm's block and the official block with the same random parameters (none zero, unlike adaLN-zero init)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    block = ConvNeXtBlock(case.channels, case.mlp_ratio).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            # Unit-variance activations through the GEMMs; small biases and GRN/adaLN terms so no path dominates.
            std = 1 / math.sqrt(p[0].numel()) if name.endswith("weight") else 0.1
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)
    official = NCHWBlock(case.channels, case.mlp_ratio).to(device=device, dtype=dtype)
    official.load_state_dict(block.state_dict())
    return block, official


def _randn(shape, gen, device, dtype, std=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def setup_dwconv_ln_modulate(case: Case, dtype, device, seed: int = 0) -> OpInputs:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    B, H, W, C = case.batch, case.height, case.width, case.channels
    acts = {"x": _randn((B, H, W, C), gen, device, dtype),
            "shift": _randn((B, C), gen, device, dtype, 0.1), "scale": _randn((B, C), gen, device, dtype, 0.1)}
    return OpInputs("dwconv_ln_modulate", case, dtype, *make_blocks(case, dtype, device, seed), acts)


def setup_grn_mlp(case: Case, dtype, device, seed: int = 0) -> OpInputs:
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    B, H, W, C = case.batch, case.height, case.width, case.channels
    acts = {"h": _randn((B, H, W, C), gen, device, dtype), "x": _randn((B, H, W, C), gen, device, dtype),
            "gate": _randn((B, C), gen, device, dtype, 0.1)}
    return OpInputs("grn_mlp", case, dtype, *make_blocks(case, dtype, device, seed), acts)


def setup_block(case: Case, dtype, device, seed: int = 0) -> OpInputs:
    gen = torch.Generator(device=device).manual_seed(seed + 3)
    B, H, W, C = case.batch, case.height, case.width, case.channels
    acts = {"x": _randn((B, H, W, C), gen, device, dtype), "c": _randn((B, C), gen, device, dtype)}
    return OpInputs("block", case, dtype, *make_blocks(case, dtype, device, seed), acts)


SETUP = {"dwconv_ln_modulate": setup_dwconv_ln_modulate, "grn_mlp": setup_grn_mlp, "block": setup_block}


def setup(op: str, case: Case, dtype, device, seed: int = 0) -> OpInputs:
    if op not in SETUP:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return SETUP[op](case, dtype, torch.device(device), seed)


# ------------------------------------------------------------------------------------------------ the op, per layout
def official_dwconv_ln_modulate(block: NCHWBlock, x, shift, scale):
    """The official block's first half on NCHW x: dwconv -> LayerNorm2d -> modulate."""
    h = _layer_norm_over_channels(block.dwconv(x))
    return torch.addcmul(shift[:, :, None, None], h, scale[:, :, None, None] + 1)


def official_grn_mlp(block: NCHWBlock, h, x, gate):
    """The official block's second half on NCHW h, x: pwconv1 -> GELU -> GRN -> pwconv2 -> gated residual."""
    return x + block.pwconv2(block.grn(F.gelu(block.pwconv1(h)))) * gate[:, :, None, None]


def official_block(block: NCHWBlock, x, c):
    return block(x, c)


def fcdm_dwconv_ln_modulate(block: ConvNeXtBlock, x, shift, scale):
    C = block.dim
    return dwconv_ln_modulate(x, block.dwconv.weight.view(C, 7, 7), block.dwconv.bias, shift, scale)


def fcdm_grn_mlp(block: ConvNeXtBlock, h, x, gate):
    C, J = block.dim, block.hidden
    return grn_mlp(h, x, gate, block.pwconv1.weight.view(J, C), block.pwconv1.bias, block.grn.gamma.view(J),
                   block.grn.beta.view(J), block.pwconv2.weight.view(C, J), block.pwconv2.bias)


def fcdm_block(block: ConvNeXtBlock, x, c):
    return block(x, c)


def fcdm_block_composed(block: ConvNeXtBlock, x, c):
    """The block as dwconv_ln_modulate then grn_mlp, bypassing any fused convnext_block implementation."""
    shift, scale, gate = (m.contiguous() for m in block.adaLN_modulation(c).chunk(3, dim=1))
    return fcdm_grn_mlp(block, fcdm_dwconv_ln_modulate(block, x, shift, scale), x, gate)


OFFICIAL_FN = {"dwconv_ln_modulate": official_dwconv_ln_modulate, "grn_mlp": official_grn_mlp,
               "block": official_block}
FCDM_FN = {"dwconv_ln_modulate": fcdm_dwconv_ln_modulate, "grn_mlp": fcdm_grn_mlp, "block": fcdm_block}
FCDM_BACKEND_OF = {"channels_last": "torch", "triton": "triton", "triton_composed": "triton", "triton_atomic": "triton",
                   "cuda": "cuda"}


# ------------------------------------------------------------------------------------------------------- providers
@dataclass
class Runnable:
    """One op under one provider: `forward()` runs it on fixed inputs; `leaves` receive gradients."""

    provider: str
    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    nchw_output: bool
    # The fused kernels' reduction mode, whatever FCDM_DETERMINISTIC says; the backward runs outside forward(), so
    # mode_callable sets it around everything it times.
    deterministic: bool = True

    def output_nhwc(self) -> torch.Tensor:
        """A no-grad forward in NHWC layout, for comparing providers."""
        with torch.no_grad():
            out = self.forward()
        return out.permute(0, 2, 3, 1) if self.nchw_output else out


@dataclass
class Unavailable:
    """A provider that cannot run here, and why (reported as n/a)."""

    provider: str
    reason: str


def unavailable_reason(op: str, provider: str, device) -> str | None:
    """None when `provider` can run `op` on `device`, else why not."""
    device = torch.device(device)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "triton_composed" and op != "block":
        return "triton_composed differs from triton only for the whole block"
    if provider == "triton_atomic" and op == "dwconv_ln_modulate":
        return "dwconv_ln_modulate has no atomic reductions: triton_atomic would time triton again"
    if provider in ("nchw", "channels_last"):
        return None
    if device.type != "cuda":
        if provider == "compile" and os.environ.get("FCDM_BENCH_CPU_COMPILE") == "1":
            return None
        if provider == "compile":
            return "torch.compile is timed on CUDA only (set FCDM_BENCH_CPU_COMPILE=1 to try inductor on CPU)"
        return f"the {provider} kernels are timed on CUDA only (the Triton interpreter is not a speed)"
    if provider == "compile":
        try:
            import triton  # noqa: F401  (inductor generates Triton kernels on CUDA)
        except ImportError as e:
            return f"torch.compile needs triton on CUDA ({e})"
        return None
    for kernel in KERNELS_OF_OP[op]:
        reason = dispatch.unavailable_reason(kernel, FCDM_BACKEND_OF[provider], device)
        if reason is not None:
            return reason
    return None


def _leaf(t: torch.Tensor, nchw: bool, requires_grad: bool) -> torch.Tensor:
    if nchw and t.dim() == 4:
        t = t.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    return t.detach().contiguous().clone().requires_grad_(requires_grad)


def _compiled(fn: Callable) -> Callable:
    """torch.compile with a fresh dynamo cache, static shapes, and room for one graph per grad mode."""
    import torch._dynamo

    from .common import allow_recompiles
    torch._dynamo.reset()  # each (op, case, dtype) compiles afresh; stale guards would only add recompiles
    allow_recompiles()
    return torch.compile(fn, dynamic=False)


def build(inputs: OpInputs, provider: str, requires_grad: bool = True) -> Runnable | Unavailable:
    """`provider` running `inputs.op` on fresh leaf copies of the activations (parameters are shared)."""
    device = next(inputs.block.parameters()).device
    reason = unavailable_reason(inputs.op, provider, device)
    if reason is not None:
        return Unavailable(provider, reason)
    nchw = provider in ("nchw", "compile")
    acts = [_leaf(inputs.activations[k], nchw, requires_grad) for k in ACTIVATIONS_OF_OP[inputs.op]]
    module = inputs.official if nchw else inputs.block
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(requires_grad)
    if nchw:
        fn = OFFICIAL_FN[inputs.op]
        if provider == "compile":
            fn = _compiled(fn)

        def forward():
            return fn(module, *acts)
    else:
        fn, backend = FCDM_FN[inputs.op], FCDM_BACKEND_OF[provider]
        if provider == "triton_composed":
            fn = fcdm_block_composed
        deterministic = provider != "triton_atomic"

        def forward():
            with use_backend(backend), use_deterministic(deterministic):
                return fn(module, *acts)
        return Runnable(provider, forward, acts + params, nchw, deterministic)
    return Runnable(provider, forward, acts + params, nchw)


def mode_callable(run: Runnable, mode: str, seed: int = 0) -> Callable[[], None]:
    """What is timed: `forward` (no grad, as in inference), `backward` (of one retained forward), or `full` (both)."""
    if mode == "forward":
        def timed():
            with torch.no_grad():
                run.forward()
        return timed
    if mode not in ("backward", "full"):
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = run.forward()
    gen = torch.Generator(device=out.device).manual_seed(seed + 4)
    grad_out = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)
    if mode == "backward":
        def timed():
            with use_deterministic(run.deterministic):
                out.backward(grad_out, retain_graph=True)
        return timed
    del out

    def timed():
        with use_deterministic(run.deterministic):
            run.forward().backward(grad_out)
    return timed


def clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None
