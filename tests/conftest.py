"""Test harness: Triton runs under its CPU interpreter when there is no GPU; GPU-only tests skip cleanly there.

A backend fallback is an error here (pytest_configure below), so a Triton or CUDA test cannot pass on the torch
reference; the tests of the fallback itself record the warning explicitly.
"""
import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Forced, not defaulted: TRITON_INTERPRET=0 inherited from a shell would send every Triton test to the fallback.
    # Must be set before any @triton.jit decorator runs, i.e. before test modules import the kernels.
    os.environ["TRITON_INTERPRET"] = "1"

from fcdm_kernels import dispatch  # noqa: E402  (imports no backend)

# Tests compare fp32 kernels against fp64 at ~1e-6 relative; TF32 would hide real errors behind its own. Likewise
# cuBLAS may sum split-K partials of bf16/fp16 GEMMs in bf16/fp16 unless told not to (K = B*H*W reaches 65536).
def _exact_matmuls() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


_exact_matmuls()


def pytest_configure(config):
    # Here rather than in pyproject.toml: resolving the class there imports Triton (through torch._dynamo) before
    # TRITON_INTERPRET is set above, and Triton's own @jit helpers (tl.sum, ...) would then not be interpreted.
    config.addinivalue_line("filterwarnings", "error::fcdm_kernels.dispatch.BackendFallbackWarning")


def pytest_ignore_collect(collection_path, config):
    # The op timings are not tests: a run over tests/ collects them only with --benchmark-only (test_bench_ops.py).
    if collection_path.name == "test_bench_ops.py" and not config.getoption("benchmark_only", default=False):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed_everything():
    """Fresh but reproducible randomness per test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def fallback_warns_in_every_test(monkeypatch):
    """The dispatcher warns once per reason and process; each test starts unwarned, so that a fallback in any test
    raises (instead of passing silently because an earlier test already consumed the warning)."""
    monkeypatch.setattr(dispatch, "_warned", set())
    yield


@pytest.fixture(autouse=True)
def no_tf32():
    """Every test starts with exact matmuls, even after an in-process train() or sample.py run switched TF32 on."""
    _exact_matmuls()
    yield


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def single_thread():
    """For modules of tiny tensors: one thread is faster than two and immune to oversubscribed CI cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
