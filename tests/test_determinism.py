"""Bitwise reproducibility of the Triton backend (fcdm_kernels.determinism).

On CPU the interpreter runs programs one after another, so two plain runs would agree even with atomics. These tests
therefore run the programs of every launch in a shuffled order (a different permutation per run, as a GPU's scheduler
would): the deterministic path must give identical bits whatever the order, while the atomic path does not, which
shows the shuffle reaches the reductions. Both paths are also checked against fp64 with poisoned outputs, and on a GPU
two runs of the deterministic path must be torch.equal.
"""
import contextlib
import os
import random

import pytest
import torch

import fcdm_kernels
from fcdm_kernels import determinism, dispatch
from fcdm_kernels.reference import convnext_block_reference
from tests.numerics import BLOCK_ARG_NAMES, REL_TOL, assert_block_matches_fp64, assert_rel_close, block_args, rel_error

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import grn_mlp, launch  # noqa: E402  (needs Triton)

interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="shuffles the Triton interpreter's programs (TRITON_INTERPRET=1)")


def two_ops(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
    h = fcdm_kernels.dwconv_ln_modulate(x, dw_weight, dw_bias, shift, scale)
    return fcdm_kernels.grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2)


BLOCKS = {"block_op": fcdm_kernels.convnext_block, "two_ops": two_ops}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles small enough that every cross-program sum has many contributors: 16-row GEMM and row tiles straddling
    samples, 8-pixel conv tiles, 16-wide dW2 tiles (several J tiles add into dgate), 2 tiles per dW program."""
    gemm = launch.GemmConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1)
    monkeypatch.setattr(launch, "gemm_config", lambda *args: gemm)
    monkeypatch.setattr(launch, "rows_config", lambda cols, device: launch.TileConfig(16, 16, 1))
    monkeypatch.setattr(launch, "vector_block", lambda n, device: 16)
    monkeypatch.setattr(launch, "sum_block", lambda n, device: 16)
    conv = lambda channels, pixels, dtype, device: launch.TileConfig(8, triton.next_power_of_2(channels), 4)  # noqa
    monkeypatch.setattr(launch, "dwconv_config", conv)
    monkeypatch.setattr(launch, "dwconv_norm_config", conv)
    monkeypatch.setattr(launch, "dwconv_grad_config", lambda *args: launch.TileConfig(8, 16, 4))
    monkeypatch.setattr(launch, "dw2_dgate_config", lambda *args: dict(BLOCK_C=16, BLOCK_J=16, BLOCK_P=16,
                                                                      num_warps=1, num_stages=1))
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.fixture
def shuffled_programs(monkeypatch):
    """Run each launch's programs in a random order; returns a function that reseeds the permutation (None: the
    interpreter's own order)."""
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    state = {"rng": None, "order": None, "dims": None}

    def grid_dim(nx, ny, nz):
        set_dim(nx, ny, nz)
        ids = [(x, y, z) for x in range(nx) for y in range(ny) for z in range(nz)]
        if state["rng"] is not None:
            state["rng"].shuffle(ids)
        state["order"], state["dims"] = ids, (ny, nz)

    def grid_idx(x, y, z):
        ny, nz = state["dims"]
        set_idx(*state["order"][(x * ny + y) * nz + z])

    monkeypatch.setattr(builder, "set_grid_dim", grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", grid_idx)

    def reseed(seed):
        state["rng"] = None if seed is None else random.Random(seed)
    return reseed


def forward_backward(block, args, grad_out) -> list[torch.Tensor]:
    """Output and the gradients of every argument; on the Triton backend unless a backend is already in use."""
    with contextlib.nullcontext() if dispatch._backend_stack else fcdm_kernels.use_backend("triton"):
        out = block(*args)
    return [out.detach()] + list(torch.autograd.grad(out, args, grad_out))


# 30-pixel samples: 16-row tiles straddle them; C = 16 and J = 48 give 1 and 3 column tiles, 4 conv tiles per sample.
SHAPE = (2, 5, 6, 16)


def runs_in_orders(block, seeds, shuffled_programs, dtype=torch.float32):
    args = block_args(*SHAPE, dtype, torch.device("cpu"))
    grad_out = torch.randn(*SHAPE).to(dtype)
    results = []
    for seed in seeds:
        shuffled_programs(seed)
        results.append(forward_backward(block, args, grad_out))
    return results


@interpreter_only
@pytest.mark.parametrize("name", list(BLOCKS))
def test_deterministic_path_does_not_depend_on_program_order(name, small_tiles, shuffled_programs):
    """fp32, so a reordered sum shows in the last bits: the interpreter's order against a random one."""
    first, second = runs_in_orders(BLOCKS[name], (None, 1), shuffled_programs)
    for label, a, b in zip(("out",) + BLOCK_ARG_NAMES, first, second):
        assert torch.equal(a, b), f"{label} changed with the program order"


@interpreter_only
def test_atomic_path_depends_on_program_order(small_tiles, shuffled_programs):
    """The control: with atomics the same shuffles change some fp32 result, so the test above can fail."""
    with fcdm_kernels.use_deterministic(False):
        first, second = runs_in_orders(fcdm_kernels.convnext_block, (1, 2), shuffled_programs)
    assert any(not torch.equal(a, b) for a, b in zip(first, second))


@interpreter_only
@pytest.mark.parametrize("deterministic,name,dtype", [
    (True, "block_op", torch.float32), (True, "two_ops", torch.bfloat16),
    (False, "block_op", torch.bfloat16), (False, "two_ops", torch.float32)],
    ids=["fixed_order-block_op-fp32", "fixed_order-two_ops-bf16", "atomic-block_op-bf16", "atomic-two_ops-fp32"])
def test_both_paths_match_fp64(name, deterministic, dtype, small_tiles, shuffled_programs):
    """Forward and all twelve gradients against the fp64 reference, outputs poisoned, programs shuffled (the other
    Triton tests cover the fixed-order default in the interpreter's order). The tolerance is REL_TOL, or twice the
    error of torch computing the same in that dtype where that is larger (at 30 pixels per sample, bf16's dh makes
    the conv bias gradient about 1% off in torch too)."""
    shuffled_programs(3)
    args = block_args(*SHAPE, dtype, torch.device("cpu"))
    grad_out = torch.randn(*SHAPE).to(dtype)
    exact = [a.detach().double().requires_grad_() for a in args]
    oracle = forward_backward(convnext_block_reference, exact, grad_out.double())
    with fcdm_kernels.use_backend("torch"):
        same_dtype = forward_backward(BLOCKS[name], args, grad_out)
    with fcdm_kernels.use_deterministic(deterministic):
        got = forward_backward(BLOCKS[name], args, grad_out)
    for label, g, t, o in zip(("out",) + BLOCK_ARG_NAMES, got, same_dtype, oracle):
        assert_rel_close(g, o, max(REL_TOL[dtype], 2 * rel_error(t, o)), label)


@interpreter_only
def test_atomic_path_with_h100_configs_matches_fp64(monkeypatch):
    """The atomic path with the tiles a GPU gets (128-row GEMM tiles straddling samples)."""
    from tests.test_triton_h100_configs import as_on_h100
    as_on_h100(monkeypatch, 0)
    args = block_args(2, 12, 12, 48, torch.float32, torch.device("cpu"))
    with fcdm_kernels.use_deterministic(False), fcdm_kernels.use_backend("triton"):
        assert_block_matches_fp64(fcdm_kernels.convnext_block, args, torch.float32)


@pytest.fixture
def reduction_modes_seen(monkeypatch) -> list[bool]:
    """Whether each cross-program sum set up from now on is atomic (True) or fixed-order (False)."""
    seen = []
    init = grn_mlp.ProgramSums.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.atomic)
    monkeypatch.setattr(grn_mlp.ProgramSums, "__init__", spy)
    return seen


def test_torch_deterministic_mode_forces_the_fixed_order_and_no_tuning(monkeypatch, reduction_modes_seen):
    seen = reduction_modes_seen
    monkeypatch.setenv("FCDM_TRITON_TUNE", "1")
    args = block_args(1, 4, 4, 8, torch.float32, torch.device("cpu"), requires_grad=False)
    fcdm_kernels.set_deterministic(False)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        assert not fcdm_kernels.deterministic() and launch.tuning_enabled()
        torch.use_deterministic_algorithms(True)
        assert fcdm_kernels.deterministic() and not launch.tuning_enabled()
        if os.environ.get("TRITON_INTERPRET") == "1":
            with fcdm_kernels.use_backend("triton"):
                fcdm_kernels.convnext_block(*args)
            assert seen and not any(seen)
    finally:
        torch.use_deterministic_algorithms(previous)
        fcdm_kernels.set_deterministic(None)


def test_switch_precedence_and_errors(monkeypatch):
    monkeypatch.delenv(determinism.ENV, raising=False)
    assert fcdm_kernels.deterministic()  # the default
    monkeypatch.setenv(determinism.ENV, "0")
    assert not fcdm_kernels.deterministic()
    try:
        fcdm_kernels.set_deterministic(True)  # the function beats the environment
        assert fcdm_kernels.deterministic()
        with fcdm_kernels.use_deterministic(False):  # a scope beats both
            assert not fcdm_kernels.deterministic()
            with fcdm_kernels.use_deterministic(True):
                assert fcdm_kernels.deterministic()
            assert not fcdm_kernels.deterministic()
        assert fcdm_kernels.deterministic()
    finally:
        fcdm_kernels.set_deterministic(None)
    monkeypatch.setenv(determinism.ENV, "maybe")
    with pytest.raises(ValueError, match=determinism.ENV):
        fcdm_kernels.deterministic()
    with pytest.raises(ValueError, match="mode"):
        fcdm_kernels.set_deterministic("yes")


# ------------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BLOCKS))
def test_two_gpu_runs_are_bitwise_equal(name):
    """The deterministic path on CUDA: forward and every gradient of two runs are torch.equal (bf16, FCDM-XL level 1
    at B=16: the kernels the other GPU tests compile)."""
    cuda = torch.device("cuda")
    args = block_args(16, 32, 32, 512, torch.bfloat16, cuda)
    grad_out = torch.randn(16, 32, 32, 512, device=cuda, dtype=torch.bfloat16)
    with fcdm_kernels.use_deterministic(True):
        first = forward_backward(BLOCKS[name], args, grad_out)
        second = forward_backward(BLOCKS[name], args, grad_out)
    for label, a, b in zip(("out",) + BLOCK_ARG_NAMES, first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b), label


@pytest.mark.gpu
def test_relaxed_atomics_match_fp64_on_the_gpu():
    """The atomic path (relaxed order) on real hardware: the block, forward and every gradient, against fp64."""
    args = block_args(16, 32, 32, 512, torch.bfloat16, torch.device("cuda"))
    with fcdm_kernels.use_deterministic(False), fcdm_kernels.use_backend("triton"):
        assert_block_matches_fp64(fcdm_kernels.convnext_block, args, torch.bfloat16)
