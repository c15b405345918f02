"""Compile every Triton kernel of the FCDM block for a GPU architecture, without a GPU.

The CPU interpreter runs the kernels' maths but never lowers them, so errors that only the GPU compiler sees (a
non-constexpr global, an unsupported op, a layout it cannot build) would first show up on a GPU machine. This lowers
each kernel with its production config to a cubin for sm_90 and prints ptxas's registers and spills per kernel.

    python -m fcdm_kernels.triton.compile_check [--arch 90] [--dtype bf16]

TRITON_INTERPRET must be unset (the decorators must build real JIT functions); exit status 1 if any kernel fails.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import block as blk
from . import dwconv_ln_modulate as dw
from . import grn_mlp as mlp

# Integer arguments that are multiples of 16 at every FCDM width get Triton's divisibility hint, as a launch would.
_DIVISIBLE = {"C", "N", "K", "J"}


def _kernels(dtype: str):
    """(kernel, pointer dtypes, constexprs, launch options) for each kernel at an FCDM-XL level-1 config."""
    A, F = f"*{dtype}", "*fp32"
    fp32 = dtype == "fp32"
    gemm = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8) if fp32 else \
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    gemm_opts = dict(num_warps=4 if fp32 else 8, num_stages=3)
    return [
        (dw._dwconv_ln_modulate_fwd_kernel, dict(X=A, WT=A, BIAS=A, SHIFT=A, SCALE=A, OUT=A, eps="fp32"),
         dict(BLOCK_P=8, BLOCK_C=512, EVEN_C=True), dict(num_warps=4)),
        (dw._dwconv_ln_modulate_bwd_norm_kernel, dict(X=A, WT=A, BIAS=A, SCALE=A, DH=A, DH0=A, PART_SHIFT=F,
                                                      PART_SCALE=F, PART_BIAS=F, eps="fp32"),
         dict(BLOCK_P=8, BLOCK_C=512, EVEN_C=True), dict(num_warps=4)),
        # With the block's residual add: a superset of the plain op's variant.
        (dw._dwconv_bwd_input_weight_kernel, dict(X=A, DH0=A, WT=A, RES=A, DX=A, PART_W=F),
         dict(HAS_RESIDUAL=True, BLOCK_P=128, BLOCK_C=64), dict(num_warps=8)),
        (mlp._gemm1_gelu_kernel, dict(A=A, W1=A, B1=A, U=A, PRE=A, SS=F),
         dict(SAVE_PRE=True, DOT_FP32=fp32, **gemm), gemm_opts),
        (mlp._gemm2_grn_gate_kernel, dict(U=A, S=F, W2=A, FBIAS=F, GATE=A, X=A, OUT=A, Z=A),
         dict(SAVE_Z=True, DOT_FP32=fp32, AT_MOST_TWO_SAMPLES=True, **gemm), gemm_opts),
        (mlp._dy_grn_stats_kernel, dict(DZ=A, W2=A, PRE=A, S=F, US=A, A_SUM=F),
         dict(DOT_FP32=fp32, AT_MOST_TWO_SAMPLES=True, **gemm), gemm_opts),
        (mlp._dy_gelu_bwd_kernel, dict(DZ=A, W2=A, PRE=A, S=F, COEF=F, DPRE=A, DB1=F),
         dict(DOT_FP32=fp32, AT_MOST_TWO_SAMPLES=True, **gemm), gemm_opts),
        (mlp._gate_bwd_kernel, dict(G=A, Z=A, GATE=A, DZ=A, SUM_B=F, DB2=F),
         dict(WITH_Z=True, AT_MOST_TWO_SAMPLES=True, BLOCK_M=32, BLOCK_N=256), dict(num_warps=8)),
        (mlp._grn_scale_kernel, dict(SS=F, GAMMA=A, S=F, eps="fp32"), dict(BLOCK_J=1024), dict(num_warps=4)),
        (mlp._grn_bwd_coeff_kernel, dict(SS=F, A_SUM=F, GAMMA=A, COEF=F, DGAMMA=F, eps="fp32"),
         dict(BLOCK_J=1024), dict(num_warps=4)),
        (blk._dw2_dgate_kernel, dict(G=A, US=A, GATE=A, W2=A, PART_W=F, DGATE=F),
         dict(DOT_FP32=fp32, BLOCK_C=64 if fp32 else 128, BLOCK_J=64 if fp32 else 128, BLOCK_P=32 if fp32 else 64),
         dict(num_warps=4 if fp32 else 8, num_stages=3)),
        (mlp._gate_bwd_kernel, dict(G=A, Z=A, GATE=A, DZ=A, SUM_B=F, DB2=F),
         dict(WITH_Z=False, AT_MOST_TWO_SAMPLES=True, BLOCK_M=32, BLOCK_N=256), dict(num_warps=8)),
    ]


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


def compile_all(arch: int, dtype: str) -> int:
    """Compile each kernel; print one line per kernel and return the number of failures."""
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for fn, pointers, constexprs, options in _kernels(dtype):
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if signature[name].startswith("*") or name in _DIVISIBLE}
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            print(f"OK   {fn.__name__:40s} {_resource_usage(kernel.asm['cubin'])}")
        except Exception as e:  # report every kernel, not just the first failure
            failures += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    return 1 if compile_all(args.arch, args.dtype) else 0


if __name__ == "__main__":
    sys.exit(main())
