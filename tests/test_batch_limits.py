"""Batches beyond CUDA's 65,535 blocks on a grid's y and z axes, in the Triton and the CUDA kernels.

Without a GPU: the Triton launchers run as on CUDA on meta tensors (fcdm_kernels.triton.dry_run, kernels stubbed) at
B = 70,000, and every grid they ask for must fit; the CUDA host code launches into the CPU emulation in a dry run,
which checks each grid against the same limits. The sliced launch path runs for real in the interpreter with slices
forced to 2 samples. On a GPU the ops run at B = 70,000 against the reference.
"""
import os

import pytest
import torch

import fcdm_kernels
from fcdm_kernels import dispatch
from tests.numerics import REL_TOL, assert_block_matches_fp64, assert_rel_close, block_args
from tests.test_cuda_build import emulated  # noqa: F401  (the CPU emulation of csrc/, built once and cached)

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import dry_run, launch  # noqa: E402

BIG_BATCH = 70_000


def big_batch_launches():
    """{"<op> <pass>": [(kernel, grid)]} for every forward and backward launcher at B = 70,000, 2x2 images, C = 8."""
    return {name: dry_run.dry_run(fn, *args).launches
            for name, (fn, args) in dry_run.op_launchers(BIG_BATCH, 2, 2, 8).items()}


def test_checked_grid_names_the_limit():
    assert launch.checked_grid(2 ** 31 - 1, 65535, 65535) == (2 ** 31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"axis 1, above CUDA's limit of 65,535"):
        launch.checked_grid(4, 70_000)
    with pytest.raises(ValueError, match=r"axis 0, above CUDA's limit of 2,147,483,647"):
        launch.checked_grid(2 ** 31)


def test_sample_slices_cover_the_batch_once():
    assert launch.sample_slices(3) == [(0, 3)]
    assert launch.sample_slices(BIG_BATCH) == [(0, 65535), (65535, BIG_BATCH - 65535)]
    assert launch.sample_slices(7, 3) == [(0, 3), (3, 3), (6, 1)]
    assert launch.sample_slices(5, 10 ** 6) == [(0, 5)]


def test_every_triton_launch_fits_the_grid_at_a_batch_of_70000():
    """No kernel runs: the launchers allocate meta tensors and record the grids they would launch."""
    launches = big_batch_launches()
    for name, kernels in launches.items():
        assert kernels, name
        for kernel, grid in kernels:
            assert all(n >= 1 for n in grid), (name, kernel, grid)
            assert grid[0] <= launch.MAX_GRID[0] and all(n <= 65535 for n in grid[1:]), (name, kernel, grid)
    # The kernels with the sample on axis 1 are launched in two slices; the others carry the batch on axis 0.
    forward = [g for k, g in launches["dwconv_ln_modulate forward"] if k == "_dwconv_ln_modulate_fwd_kernel"]
    assert [g[1] for g in forward] == [65535, BIG_BATCH - 65535]
    assert max(g[0] for k, g in launches["grn_mlp forward"] if k == "_grn_scale_kernel") == BIG_BATCH


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernels in the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_launches_match_fp64(monkeypatch, dtype):
    """Slices of 2 samples (as at 65,535) through the whole block and the two ops, with poisoned outputs."""
    slices = launch.sample_slices
    monkeypatch.setattr(launch, "sample_slices", lambda batch, most=2: slices(batch, min(most, 2)))
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)

    def two_ops(x, shift, scale, gate, dw_weight, dw_bias, w1, b1, gamma, beta, w2, b2):
        h = fcdm_kernels.dwconv_ln_modulate(x, dw_weight, dw_bias, shift, scale)
        return fcdm_kernels.grn_mlp(h, x, gate, w1, b1, gamma, beta, w2, b2)
    with fcdm_kernels.use_backend("triton"):
        for fn in (fcdm_kernels.convnext_block, two_ops):
            assert_block_matches_fp64(fn, block_args(5, 4, 3, 16, dtype, torch.device("cpu")), dtype)


# ------------------------------------------------------------------------------------- the CUDA kernels, emulated
@pytest.mark.cuda_build
def test_cuda_launches_fit_the_grid_at_a_batch_of_70000(emulated):
    """The host code's grids in a dry run of the emulation (null pointers: nothing runs). The emulation refuses a
    grid beyond CUDA's limits, as the control shows."""
    assert emulated.emu_grid_accepted(2 ** 31 - 1, 65535, 65535) == 1
    assert emulated.emu_grid_accepted(1, BIG_BATCH, 1) == 0 and emulated.emu_grid_accepted(1, 1, BIG_BATCH) == 0
    import ctypes
    null = ctypes.c_void_p(0)
    emulated.emu_set_dry_run(1)
    try:
        for t in (0, 2):  # fp32, bf16
            dims = (BIG_BATCH, 1, 1, 8, ctypes.c_float(1e-6), 1)
            assert emulated.emu_forward(t, *([null] * 7), *dims) == 0
            assert emulated.emu_backward(t, *([null] * 10), *dims) == 0
    finally:
        emulated.emu_set_dry_run(0)


# ------------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_batch_of_70000_runs_on_the_gpu(backend):
    """dwconv_ln_modulate (the op whose kernels had the batch on grid.y/z), forward and every gradient against fp64;
    2x2 images, so the tensors are a few MB."""
    from tests.test_triton_dwconv_ln_modulate import check_against_fp64, make_args
    cuda = torch.device("cuda")
    if dispatch.unavailable_reason("dwconv_ln_modulate", backend, cuda) is not None:
        pytest.skip(f"the {backend} backend is not available here")
    args = make_args(BIG_BATCH, 2, 2, 8, torch.bfloat16, cuda)
    with fcdm_kernels.use_backend(backend):
        assert dispatch.resolve("dwconv_ln_modulate", args[0]) == backend
    check_against_fp64(args, cuda, backend)
