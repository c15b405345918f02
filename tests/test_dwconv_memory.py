"""The Triton dwconv_ln_modulate backward keeps its fp32 partial sums small at every shape.

Each backward program sums its parameter gradients over several pixel tiles, and launch.py sizes the programs so the
partial sums take at most 1/8 of x's bytes (or 264 programs' rows, two per H100 SM, where that is more). The sizes are
checked without a GPU by running the launcher on meta tensors as on CUDA (fcdm_kernels.triton.dry_run) at FCDM-XL
shapes up to 512px, B=256, where the per-tile design needed 1.6 GB; the small-budget paths (several tiles per
program, programs spanning samples, a batch split over launches) run in the interpreter against fp64.
"""
import os

import pytest
import torch

import fcdm_kernels
from fcdm_kernels.reference import dwconv_ln_modulate_reference
from tests.numerics import REL_TOL, assert_block_matches_fp64, assert_rel_close, block_args
from tests.test_triton_dwconv_ln_modulate import check_against_fp64, make_args

triton = pytest.importorskip("triton")
from fcdm_kernels.triton import dry_run, launch  # noqa: E402
from fcdm_kernels.triton.dwconv_ln_modulate import dwconv_ln_modulate_backward  # noqa: E402

interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="runs the kernels in the Triton interpreter (TRITON_INTERPRET=1)")


def backward_on_meta(B, H, W, C, dtype=torch.bfloat16):
    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=dtype)
    x = meta(B, H, W, C)
    return x, dry_run.dry_run(dwconv_ln_modulate_backward, meta(B, H, W, C), x, meta(C, 7, 7), meta(C), meta(B, C),
                              1e-6)


def partial_sum_bytes(report, B, C) -> tuple[int, int]:
    """Bytes of the norm pass's (programs, 3, C) and the dx/dW pass's (programs, 49, C) fp32 partial sums."""
    fp32 = [torch.Size(shape) for shape, dtype in report.allocations if dtype == torch.float32 and len(shape) == 3]
    norm = [s for s in fp32 if s[1:] == (3, C)][1:]  # the first (B, 3, C) is the per-sample result
    grad = [s for s in fp32 if s[1:] == (49, C)]
    assert len(norm) == 1 and len(grad) == 1, fp32
    return 4 * norm[0].numel(), 4 * grad[0].numel()


# (B, H, W, C): every FCDM-XL level at 256px B=64 and 512px B=16 (the training goals), and 512px at B=256.
XL_SHAPES = [(64, 32, 32, 512), (64, 16, 16, 1024), (64, 8, 8, 2048), (16, 64, 64, 512), (16, 32, 32, 1024),
             (16, 16, 16, 2048), (256, 64, 64, 512), (256, 32, 32, 1024), (256, 16, 16, 2048)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", XL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_partial_sums_stay_within_an_eighth_of_x(shape, dtype):
    B, H, W, C = shape
    x, report = backward_on_meta(B, H, W, C, dtype)
    x_bytes = x.numel() * x.element_size()
    norm, grad = partial_sum_bytes(report, B, C)
    # The floor: 264 programs' rows, each 3 C floats (norm) or 49 x 64 floats (dW), so the GPU stays filled.
    assert norm <= max(x_bytes // 8, 264 * 3 * C * 4)
    assert grad <= max(x_bytes // 8, 264 * 49 * 64 * 4)
    # Held besides the inputs: dh0 (x's shape and dtype), the per-sample sums, one pass's partials, weight copies.
    others = B * 3 * C * 4 + 4 * 49 * C * 4
    assert report.workspace_bytes <= x_bytes + max(norm, grad) + others


def test_the_issue_shape_needs_megabytes_not_gigabytes():
    """512px, B=256, C=512 in bf16: x is 1 GiB; the per-tile design's partial sums were 1.6 GB."""
    x, report = backward_on_meta(256, 64, 64, 512)
    norm, grad = partial_sum_bytes(report, 256, 512)
    assert norm + grad < 16 * 2 ** 20
    assert report.workspace_bytes < 1.02 * x.numel() * x.element_size()  # dh0, essentially


@pytest.mark.parametrize("batch,tiles,allowed", [(1, 1, 264), (3, 7, 264), (64, 512, 1365), (64, 32, 264),
                                                 (4096, 1, 264), (3, 7, 2), (1, 7, 2), (5, 13, 3)])
def test_norm_split_covers_every_tile_once(monkeypatch, batch, tiles, allowed):
    monkeypatch.setattr(launch, "partial_programs_allowed", lambda row_bytes, activation_bytes: allowed)
    for device in (torch.device("cpu"), torch.device("cuda")):
        split = launch.dwconv_norm_split(batch, tiles, 512, 0, device)
        assert (split.programs_per_sample - 1) * split.tiles_per_program < tiles  # no empty program
        assert split.programs_per_sample * split.tiles_per_program >= tiles    # no tile left out
        assert 1 <= split.samples_per_launch <= batch
        rows = split.samples_per_launch * split.programs_per_sample
        assert rows <= max(allowed, split.programs_per_sample)


@pytest.mark.parametrize("total,blocks,allowed", [(1, 1, 264), (512, 8, 668), (64, 32, 264), (7, 2, 2), (21, 3, 2)])
def test_grad_split_covers_every_tile_once(monkeypatch, total, blocks, allowed):
    monkeypatch.setattr(launch, "partial_programs_allowed", lambda row_bytes, activation_bytes: allowed)
    for device in (torch.device("cpu"), torch.device("cuda")):
        per_program = launch.dwconv_grad_tiles_per_program(total, blocks, 64, 0, device)
        groups = triton.cdiv(total, per_program)
        assert (groups - 1) * per_program < total <= groups * per_program
        assert groups * blocks <= max(allowed, blocks)


@pytest.fixture
def small_tiles(monkeypatch):
    """8-pixel conv tiles (7 per 49-pixel sample) and 16-channel dW blocks, outputs poisoned."""
    conv = lambda channels, pixels, dtype, device: launch.TileConfig(8, triton.next_power_of_2(channels), 4)  # noqa
    monkeypatch.setattr(launch, "dwconv_config", conv)
    monkeypatch.setattr(launch, "dwconv_norm_config", conv)
    monkeypatch.setattr(launch, "dwconv_grad_config", lambda *args: launch.TileConfig(8, 16, 4))
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@interpreter_only
@pytest.mark.parametrize("B,allowed,dtype", [
    (2, 1, torch.float32),   # one row at a time: a norm program owns a whole sample (7 tiles), one launch per
    (2, 1, torch.bfloat16),  # sample; one dW program per channel block walks all 14 tiles across both samples
    (1, 2, torch.float32),   # two norm programs per sample, of 4 tiles and of 3
])
def test_small_budgets_match_fp64(monkeypatch, small_tiles, B, allowed, dtype):
    monkeypatch.setattr(launch, "partial_programs_allowed", lambda row_bytes, activation_bytes: allowed)
    check_against_fp64(make_args(B, 7, 7, 24, dtype, torch.device("cpu")), torch.device("cpu"))


@interpreter_only
def test_small_budget_with_h100_tiles_through_the_block_matches_fp64(monkeypatch):
    """The GPU's tiles (the block op adds the residual in the dx pass) with one program per channel block."""
    from tests.test_triton_h100_configs import as_on_h100
    as_on_h100(monkeypatch, 0)
    monkeypatch.setattr(launch, "partial_programs_allowed", lambda row_bytes, activation_bytes: 1)
    with fcdm_kernels.use_backend("triton"):
        assert_block_matches_fp64(fcdm_kernels.convnext_block, block_args(3, 9, 9, 48, torch.float32,
                                                                         torch.device("cpu")), torch.float32)


# ------------------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_gpu_backward_memory_matches_the_dry_run():
    """At FCDM-XL level 1 (B=64, 32x32, C=512, bf16): the peak of what the backward allocates on the GPU equals the
    dry run's (to the caching allocator's rounding), and the gradients match fp64."""
    cuda = torch.device("cuda")
    B, H, W, C = 64, 32, 32, 512
    _, report = backward_on_meta(B, H, W, C)
    args = [t.to(torch.bfloat16) for t in (torch.randn(B, H, W, C, device=cuda), torch.randn(C, 7, 7, device=cuda) / 7,
                                           torch.randn(C, device=cuda) * 0.5, torch.randn(B, C, device=cuda) * 0.5)]
    dh = torch.randn(B, H, W, C, device=cuda, dtype=torch.bfloat16)
    with torch.no_grad(), launch.on_device(dh):
        dwconv_ln_modulate_backward(dh, *args, 1e-6)  # compile outside the measurement
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = dwconv_ln_modulate_backward(dh, *args, 1e-6)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    # The caching allocator rounds to 512 B, and may hand a large request up to 1 MiB more than it asked for.
    slack = sum(512 + (2 ** 20 if torch.Size(shape).numel() * 4 >= 2 ** 20 else 0) for shape, _ in report.allocations)
    assert abs(peak - report.peak_bytes) <= slack, (peak, report.peak_bytes)
    x, weight, bias, scale = (a.double().requires_grad_() for a in args)
    shift = torch.zeros_like(scale, requires_grad=True)  # h's gradients do not depend on shift
    ref_grads = torch.autograd.grad(dwconv_ln_modulate_reference(x, weight, bias, shift, scale),
                                    (x, weight, bias, shift, scale), dh.double())
    for name, g, rg in zip(("dx", "dweight", "dbias", "dshift", "dscale"), grads, ref_grads):
        assert_rel_close(g, rg, REL_TOL[torch.bfloat16], name)
