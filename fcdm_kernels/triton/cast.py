"""Down-casts for kernel outputs that round to nearest even everywhere.

GPUs round fp32 -> bf16 to nearest even, but the Triton CPU interpreter (3.9) truncates, which doubles the bf16 error
the CPU tests see. Under the interpreter the rounding is therefore done by hand on the bits; on GPU this is a plain
cast. TRITON_INTERPRET is read at import because it must be set before any @triton.jit runs anyway.
"""
import os

import triton
import triton.language as tl

# Whether @triton.jit built interpreted functions: it decides when each kernel module is imported, so this is read
# once, at import, too (launch.py follows it, whatever device the tensors are on).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETER_ROUNDING = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """Cast an fp32 tensor to `dtype` (round to nearest even)."""
    if INTERPRETER_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
