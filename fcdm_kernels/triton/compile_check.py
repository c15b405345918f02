"""Compile every Triton kernel of the FCDM block for a GPU architecture, without a GPU.

The CPU interpreter runs the kernels' maths but never lowers them, so errors that only the GPU compiler sees (a
non-constexpr global, an unsupported op, a layout it cannot build) and register spills would first show up on a GPU
machine. This lowers each kernel, with the tile configs `launch.py` picks on CUDA at each FCDM-XL level of a 256px
model and at FCDM-T's narrowest, to a cubin and prints ptxas's registers and spill stack per kernel.

    python -m fcdm_kernels.triton.compile_check [--arch 90] [--dtype bf16] [--fail-on-spill] [--all-candidates]

--all-candidates also compiles every GEMM config the tuner may time (not only the untuned default). A default config
that spills is printed as SPILL; --fail-on-spill makes it a failure. TRITON_INTERPRET must be unset (the decorators
must build real JIT functions); the exit status is 1 if any kernel fails.

Spill counts belong to one compiler: the default configs were tuned to be spill-free with the Triton versions in
TUNED_TRITON, and another version's ptxas may keep a few bytes of stack for the same kernel. A spill costs speed, not
correctness, so the test suite fails on it only where FCDM_STRICT_SPILLS=1 (CI's pinned toolchain) and reports it
everywhere else.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import block as blk
from . import dwconv_ln_modulate as dw
from . import grn_mlp as mlp
from . import launch

# Integer arguments that are multiples of 16 at every FCDM width get Triton's divisibility hint, as a launch would.
_DIVISIBLE = {"C", "N", "K", "J"}
# Triton releases (major.minor) on which every default config compiles for sm_90 without spills (what other releases
# keep on the stack is listed in benchmarks/NOTES.md).
TUNED_TRITON = ("3.9",)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (channels, pixels per image) of the three FCDM-XL levels at 256px (a 32x32 latent), then FCDM-T's first level at
# 128px, whose 32-channel GEMM2 output is narrower than every wide tile.
LEVELS = ((512, 32 * 32), (1024, 16 * 16), (2048, 8 * 8), (32, 16 * 16))
_GEMMS = {  # op name in launch.gemm_candidates -> (kernel, pointer dtypes (filled per dtype), extra constexprs)
    "gemm1": (mlp._gemm1_gelu_kernel, ("A", "W1", "B1", "U", "PRE"), ("SS",), dict(SAVE_PRE=True)),
    "gemm2": (mlp._gemm2_grn_gate_kernel, ("U", "W2", "GATE", "X", "OUT", "Z"), ("S", "FBIAS"), dict(SAVE_Z=True)),
    "dy_stats": (mlp._dy_grn_stats_kernel, ("DZ", "W2", "PRE", "US"), ("S", "A_SUM"), {}),
    "dy_gelu": (mlp._dy_gelu_bwd_kernel, ("DZ", "W2", "PRE", "DPRE"), ("S", "COEF", "DB1"), {}),
}


# Kernels that sum across programs come in two variants: per-tile partials (deterministic) and relaxed atomics.
_ATOMIC_VARIANTS = {"gemm1": ({"ATOMIC": False}, {"ATOMIC": True}), "gemm2": ({},),
                    "dy_stats": ({"ATOMIC": False}, {"ATOMIC": True}), "dy_gelu": ({"ATOMIC": False}, {"ATOMIC": True})}


def _kernels(dtype: str, channels: int, pixels: int, all_candidates: bool):
    """(kernel, pointer dtypes, constexprs, launch options, is_default) for each launch at one level's shape, with the
    configs launch.py chooses on a CUDA device."""
    A, F = f"*{dtype}", "*fp32"
    tdtype = _DTYPES[dtype]
    cuda = torch.device("cuda")  # launch.py only looks at the device type; no GPU is touched
    C, J, P = channels, 3 * channels, pixels
    fp32 = dtype == "fp32"
    out = []
    tile = launch.dwconv_config(C, P, tdtype, cuda)
    tiles = dict(BLOCK_P=tile.block_p, BLOCK_C=tile.block_c, EVEN_C=tile.block_c == C)
    out.append((dw._dwconv_ln_modulate_fwd_kernel, dict(X=A, WT=A, BIAS=A, SHIFT=A, SCALE=A, OUT=A, eps="fp32"),
                tiles, dict(num_warps=tile.num_warps), True))
    norm = launch.dwconv_norm_config(C, P, tdtype, cuda)
    out.append((dw._dwconv_ln_modulate_bwd_norm_kernel, dict(X=A, WT=A, BIAS=A, SCALE=A, DH=A, DH0=A, PART=F,
                                                             eps="fp32"),
                dict(BLOCK_P=norm.block_p, BLOCK_C=norm.block_c, EVEN_C=norm.block_c == C),
                dict(num_warps=norm.num_warps), True))
    grad = launch.dwconv_grad_config(C, P, tdtype, cuda)
    # With the block's residual add: a superset of the plain op's variant.
    out.append((dw._dwconv_bwd_input_weight_kernel, dict(X=A, DH0=A, WT=A, RES=A, DX=A, PART_W=F),
                dict(HAS_RESIDUAL=True, BLOCK_P=grad.block_p, BLOCK_C=grad.block_c),
                dict(num_warps=grad.num_warps), True))
    for op, (fn, act_ptrs, fp32_ptrs, extra) in _GEMMS.items():
        n = C if op == "gemm2" else J
        candidates = launch.gemm_candidates(op, n, tdtype)
        for i, cfg in enumerate(candidates if all_candidates else candidates[:1]):
            meta = cfg.meta()
            options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
            constexprs = dict(DOT_FP32=fp32, **extra, **meta)
            if op != "gemm1":
                constexprs["AT_MOST_TWO_SAMPLES"] = cfg.block_m <= P
            pointers = {**{name: A for name in act_ptrs}, **{name: F for name in fp32_ptrs}}
            for atomic in _ATOMIC_VARIANTS[op]:
                out.append((fn, pointers, dict(constexprs, **atomic), options, i == 0))
    rows = launch.rows_config(C, cuda)
    for with_z in (True, False):
        for atomic in (False, True):
            out.append((mlp._gate_bwd_kernel, dict(G=A, Z=A, GATE=A, DZ=A, SUM_B=F, DB2=F),
                        dict(WITH_Z=with_z, AT_MOST_TWO_SAMPLES=rows.block_p <= P, ATOMIC=atomic,
                             BLOCK_M=rows.block_p, BLOCK_N=rows.block_c), dict(num_warps=rows.num_warps), True))
    out.append((mlp._per_sample_sum_kernel, dict(PART=F, OUT=F), dict(BLOCK_N=launch.sum_block(J, cuda)),
                dict(num_warps=4), True))
    vec = launch.vector_block(J, cuda)
    out.append((mlp._grn_scale_kernel, dict(SS=F, GAMMA=A, S=F, eps="fp32"), dict(BLOCK_J=vec), dict(num_warps=4),
                True))
    out.append((mlp._grn_bwd_coeff_kernel, dict(SS=F, A_SUM=F, GAMMA=A, COEF=F, DGAMMA=F, eps="fp32"),
                dict(BLOCK_J=vec), dict(num_warps=4), True))
    meta = launch.dw2_dgate_config(C, J, P, tdtype, cuda)
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    for atomic in (False, True):
        out.append((blk._dw2_dgate_kernel, dict(G=A, US=A, GATE=A, W2=A, PART_W=F, DGATE=F),
                    dict(DOT_FP32=fp32, ATOMIC=atomic, **meta), options, True))
    return out


def _resource_usage(cubin: bytes) -> str:
    """ptxas's register/stack line for a cubin, via the cuobjdump bundled with Triton (empty if it is missing)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(word for line in out.splitlines() if "REG:" in line for word in line.split()
                    if word.startswith(("REG:", "STACK:")))


def spill_bytes(usage: str) -> int:
    """The STACK bytes of a `_resource_usage` line (0 when absent)."""
    found = re.search(r"STACK:(\d+)", usage)
    return int(found.group(1)) if found else 0


def triton_release() -> str:
    """The installed Triton's major.minor, as TUNED_TRITON records it."""
    return ".".join(triton.__version__.split(".")[:2])


def strict_spills() -> bool:
    """Whether a spill fails the test suite: FCDM_STRICT_SPILLS=1, which CI sets for its pinned toolchain."""
    return os.environ.get("FCDM_STRICT_SPILLS") == "1"


def _describe(constexprs: dict, options: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_C", "BLOCK_J")
    tile = "x".join(str(constexprs[k]) for k in keys if k in constexprs)
    return f"{tile} w{options.get('num_warps', 4)}" + (f"s{options['num_stages']}" if "num_stages" in options else "") \
        + (" atomic" if constexprs.get("ATOMIC") else "")


def compile_all(arch: int, dtype: str, levels=LEVELS, all_candidates: bool = False,
                fail_on_spill: bool = False) -> int:
    """Compile each kernel at each level; print one line per launch config (SPILL where a default config spills) and
    return the number of failures (compile errors, and spills if fail_on_spill)."""
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    seen = set()
    for channels, pixels in levels:
        for fn, pointers, constexprs, options, default in _kernels(dtype, channels, pixels, all_candidates):
            key = (fn.__name__, tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
            if key in seen:  # the same specialisation at another level: one cubin, one line
                continue
            seen.add(key)
            signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                         for name in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                     if signature[name].startswith("*") or name in _DIVISIBLE}
            label = f"{fn.__name__:36s} C={channels:<5d}{_describe(constexprs, options):29s}"
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            except Exception as e:  # report every kernel, not just the first failure
                failures += 1
                print(f"FAIL {label} {type(e).__name__}: {e}")
                continue
            usage = _resource_usage(kernel.asm["cubin"])
            if default and spill_bytes(usage) > 0:
                failures += 1 if fail_on_spill else 0
                print(f"SPILL {label} {usage}")
            else:
                print(f"OK   {label} {usage}{'' if default else '  (tuning candidate)'}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="bf16")
    parser.add_argument("--all-candidates", action="store_true",
                        help="also compile every GEMM config the tuner may time, not only the default")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="fail when a default config spills registers to local memory")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    return 1 if compile_all(args.arch, args.dtype, all_candidates=args.all_candidates,
                            fail_on_spill=args.fail_on_spill) else 0


if __name__ == "__main__":
    sys.exit(main())
