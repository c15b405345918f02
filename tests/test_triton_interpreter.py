"""TRITON_INTERPRET=1 decides how the Triton kernels run, whatever device the tensors are on.

@triton.jit builds interpreted functions when TRITON_INTERPRET=1 is set at import, and the interpreter accepts CUDA
tensors (it copies them to the host). launch.py must then choose the interpreter's configs, with bf16 dots widened
to fp32 (the interpreter multiplies them wrongly), as cast.py already rounds by hand. Each case runs in a fresh
process, since the flag only counts at import; the GPU test runs the kernels interpreted on CUDA tensors.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

DECISIONS = r"""
import sys, torch
from fcdm_kernels.triton import cast, launch
cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
expected = sys.argv[1] == "1"
assert cast.INTERPRETED is expected and bool(cast.INTERPRETER_ROUNDING) is expected
assert launch.interpreting(cuda) is expected and launch.interpreting(cpu)
assert launch.dot_in_fp32(torch.bfloat16, cuda) is expected and launch.dot_in_fp32(torch.float32, cuda)
if expected:
    def run(cfg):
        raise AssertionError("the interpreter's configs are never timed")
    cfg = launch.gemm_config("gemm1", 4096, 1536, 512, 1024, torch.bfloat16, cuda, run)
    assert cfg.num_stages == 1 and cfg.block_m == 128, cfg  # the interpreter's config, not an H100 candidate
    assert launch.dwconv_config(512, 1024, torch.bfloat16, cuda).block_p == 32
else:
    assert launch.dwconv_config(512, 1024, torch.bfloat16, cuda).block_p == 8
print("DECISIONS OK")
"""


def run_fresh(script: str, interpret: bool, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


@pytest.mark.parametrize("interpret", [True, False], ids=["TRITON_INTERPRET=1", "unset"])
def test_launch_follows_the_flag_for_cuda_tensors(interpret):
    result = run_fresh(DECISIONS, interpret, "1" if interpret else "0")
    assert result.returncode == 0 and "DECISIONS OK" in result.stdout, result.stdout + result.stderr


INTERPRETED_ON_CUDA = r"""
import torch, fcdm_kernels
from tests.test_triton_grn_mlp import check_against_fp64, make_args
check_against_fp64(make_args(2, 3, 5, 16, torch.bfloat16, torch.device("cuda")))
print("INTERPRETED OK")
"""


@pytest.mark.gpu
def test_interpreted_kernels_on_cuda_tensors_match_fp64():
    """bf16 grn_mlp (its GEMMs), interpreted on CUDA tensors: wrong without the widened dots."""
    result = run_fresh(INTERPRETED_ON_CUDA, True)
    assert result.returncode == 0 and "INTERPRETED OK" in result.stdout, result.stdout + result.stderr
