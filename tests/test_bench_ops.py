"""pytest-benchmark versions of the op microbenchmarks (CUDA only). A run over tests/ leaves them out unless
--benchmark-only is given (tests/conftest.py), so neither an ordinary run nor gpu_check's pytest stage times them:

    pytest tests/test_bench_ops.py --benchmark-only --benchmark-group-by=group
    pytest tests/test_bench_ops.py --benchmark-only -k "block and 256px-L1 and bf16"

Inputs come from benchmarks.providers, like `python -m benchmarks.ops`; each test is one (op, mode, case, dtype,
provider), grouped so providers of one case sit side by side, with the ideal bytes and FLOPs in extra_info
(divide by the time for TB/s and TFLOP/s; `python -m benchmarks.ops` also gives the ratio to the roofline floor).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import roofline
from benchmarks.providers import (DTYPES, MODES, OPS, PROVIDERS, Unavailable, build, clear_grads, mode_callable, setup,
                                  xl_cases)

pytest.importorskip("pytest_benchmark")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="op benchmarks need CUDA")]

_inputs_cache: dict = {}


def _inputs(op, case, dtype):
    """One (op, case, dtype) at a time: consecutive tests of its providers share the inputs."""
    key = (op, case.name, dtype)
    if key not in _inputs_cache:
        _inputs_cache.clear()
        _inputs_cache[key] = setup(op, case, dtype, "cuda")
    return _inputs_cache[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype_name", tuple(DTYPES))
@pytest.mark.parametrize("case", xl_cases(), ids=lambda c: c.name)
def test_op(benchmark, case, dtype_name, op, mode, provider):
    dtype = DTYPES[dtype_name]
    inputs = _inputs(op, case, dtype)
    runnable = build(inputs, provider)
    if isinstance(runnable, Unavailable):
        pytest.skip(runnable.reason)
    fn = mode_callable(runnable, mode)
    fn()  # compile and autotune outside the timing

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"{op} {mode} {case.name} {dtype_name}"
    nbytes, flops = roofline.budget(op, mode, case, dtype)
    benchmark.extra_info.update(ideal_bytes=nbytes, flops=flops, shape=case.shape())
    benchmark.pedantic(timed, setup=lambda: clear_grads(runnable.leaves), rounds=20, warmup_rounds=3)
