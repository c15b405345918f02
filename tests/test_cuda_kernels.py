"""CUDA kernels of dwconv_ln_modulate on a GPU: forward and all five gradients vs an fp64 oracle, errors, sanitizers.

Needs a GPU and the built extension (benchmarks/gpu_check.sh builds it first); on a GPU machine a missing extension
fails these tests rather than skipping them, so a broken build cannot pass unnoticed.
Tolerance (STYLE.md): at most max(REL_TOL[dtype], 2x the error of PyTorch computing the same thing in that dtype).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fcdm_kernels
from fcdm_kernels import dispatch
from fcdm_kernels.reference import dwconv_ln_modulate_reference
from tests.numerics import REL_TOL, assert_rel_close, rel_error, saved_tensors

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
GRAD_NAMES = ("dx", "dweight", "dbias", "dshift", "dscale")

# (B, H, W, C): every FCDM-XL level at batch 64 plus the 512px level-1 shape, then shapes that break assumptions.
# Level 2 and 512px are `slow`, outside gpu_check's time box.
XL_SHAPES = [(64, 32, 32, 512), (64, 8, 8, 2048), pytest.param((64, 16, 16, 1024), marks=pytest.mark.slow),
             pytest.param((16, 64, 64, 512), marks=pytest.mark.slow)]
ODD_CASES = [
    ((3, 7, 7, 40), torch.float32),    # C=40: two chunks, the second half empty; 7x7 image smaller than one tile
    ((3, 7, 7, 40), torch.bfloat16),   # 40 = 5 bf16 vectors of 8
    ((3, 7, 7, 40), torch.float16),
    ((2, 9, 13, 44), torch.bfloat16),  # C % 8 != 0: the scalar (non-vector) path for 16-bit types
    ((2, 9, 13, 44), torch.float32),   # ... but C % 4 == 0 keeps fp32 vectorized
    ((2, 5, 3, 3), torch.float32),     # odd C: a channel pair with no partner; image narrower than the halo
    ((2, 20, 17, 96), torch.float32),  # several partial tiles in both directions
    ((2, 6, 11, 2056), torch.bfloat16),  # C > 2048, not a power of two: one-row tiles, many chunks
    ((8, 16, 16, 512), torch.float32),
    ((4, 16, 16, 1024), torch.float16),
]


@pytest.fixture(scope="module")
def backend():
    try:
        import fcdm_kernels.cuda as cuda_backend
    except ImportError as e:
        pytest.fail(f"the CUDA extension is not available on this GPU machine ({e}); "
                    "build it with `pip install --no-deps --no-build-isolation -e .`")
    return cuda_backend


def make_inputs(shape, dtype, device="cuda"):
    """x, weight, bias, shift, scale at the scales of a trained block (conv output O(1)), and a random grad_h."""
    B, H, W, C = shape

    def rand(*s, scale=1.0):
        return (torch.randn(*s, device=device) * scale).to(dtype)
    inputs = (rand(B, H, W, C), rand(C, 7, 7, scale=1 / 7), rand(C, scale=0.5), rand(B, C, scale=0.5),
              rand(B, C, scale=0.5))
    return inputs, rand(B, H, W, C)


def forward_and_grads(fn, inputs, grad_h):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_h)
    return out.detach(), grads


def poison_allocator(nbytes: int) -> None:
    """Leave one NaN-filled free block in the caching allocator, so outputs the kernels allocate start as NaN."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    block = torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")
    del block


def run_cuda(backend, inputs, grad_h):
    out_bytes = sum(t.numel() * t.element_size() for t in inputs) * 4 + inputs[0].numel() * 8
    poison_allocator(out_bytes)
    return forward_and_grads(backend.registration.dwconv_ln_modulate_cuda, inputs, grad_h)


def check_against_oracle(out, grads, inputs, grad_h):
    dtype = inputs[0].dtype
    ref_out, ref_grads = forward_and_grads(dwconv_ln_modulate_reference, [t.double() for t in inputs], grad_h.double())
    torch_out, torch_grads = forward_and_grads(lambda *a: dwconv_ln_modulate_reference(*a, upcast=True), inputs,
                                               grad_h)
    pairs = [("h", out, torch_out, ref_out)] + list(zip(GRAD_NAMES, grads, torch_grads, ref_grads))
    for name, got, torch_same_dtype, ref in pairs:
        assert got.dtype == dtype and got.is_contiguous(), name
        tol = max(REL_TOL[dtype], 2 * rel_error(torch_same_dtype, ref))
        assert_rel_close(got, ref, tol, name)


@pytest.mark.parametrize("shape", XL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_xl_shapes_bf16(backend, shape):
    inputs, grad_h = make_inputs(shape, torch.bfloat16)
    out, grads = run_cuda(backend, inputs, grad_h)
    check_against_oracle(out, grads, inputs, grad_h)


@pytest.mark.parametrize("shape,dtype", ODD_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).removeprefix("torch."))
def test_odd_shapes_and_dtypes(backend, shape, dtype):
    inputs, grad_h = make_inputs(shape, dtype)
    out, grads = run_cuda(backend, inputs, grad_h)
    check_against_oracle(out, grads, inputs, grad_h)


def test_unaligned_storage_takes_the_scalar_path(backend):
    """Contiguous tensors whose data does not start on a 16-byte boundary must not use 16-byte vector loads."""
    inputs, grad_h = make_inputs((2, 9, 10, 64), torch.bfloat16)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view
    inputs = (shifted(inputs[0]),) + inputs[1:3] + (shifted(inputs[3]), shifted(inputs[4]))
    out, grads = run_cuda(backend, inputs, shifted(grad_h))
    check_against_oracle(out, grads, inputs, grad_h)


def test_repeatable(backend):
    """No atomics: two runs give bit-identical outputs and gradients."""
    inputs, grad_h = make_inputs((4, 16, 16, 256), torch.bfloat16)
    first, second = run_cuda(backend, inputs, grad_h), run_cuda(backend, inputs, grad_h)
    for a, b in zip((first[0],) + first[1], (second[0],) + second[1]):
        assert torch.equal(a, b)


def test_dshift_alone_keeps_nothing_for_the_backward(backend):
    # dshift is grad_h summed over the pixels: with x, weight, bias and scale frozen nothing needs saving.
    (x, weight, bias, shift, scale), grad_h = make_inputs((2, 8, 8, 64), torch.float32)
    shift.requires_grad_()
    op = backend.registration.dwconv_ln_modulate_cuda
    assert saved_tensors(op, (x, weight, bias, shift, scale)) == []
    (dshift,) = torch.autograd.grad(op(x, weight, bias, shift, scale), shift, grad_h)
    assert_rel_close(dshift, grad_h.double().sum(dim=(1, 2)), REL_TOL[torch.float32], "dshift")


def test_public_op_dispatches_to_cuda(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("FCDM_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))  # `auto` times; keep the user's cache
    inputs, grad_h = make_inputs((2, 8, 8, 64), torch.bfloat16)
    with fcdm_kernels.use_backend("cuda"):
        assert dispatch.resolve("dwconv_ln_modulate", inputs[0]) == "cuda"
        out = fcdm_kernels.dwconv_ln_modulate(*inputs)
    assert torch.equal(out, backend.registration.dwconv_ln_modulate_cuda(*inputs))
    with fcdm_kernels.use_backend("auto"):
        assert dispatch.resolve("dwconv_ln_modulate", inputs[0]) in ("cuda", "triton")


def test_opcheck(backend):
    inputs, _ = make_inputs((2, 7, 9, 40), torch.float32)
    args = tuple(t.requires_grad_() for t in inputs) + (1e-6,)
    torch.library.opcheck(torch.ops.fcdm.dwconv_ln_modulate_cuda.default, args)


def _bad_calls():
    B, H, W, C = 2, 8, 8, 64
    good, grad_h = make_inputs((B, H, W, C), torch.float32)
    x, w, b, sh, sc = good
    return {
        "x on CPU": ((x.cpu(), w.cpu(), b.cpu(), sh.cpu(), sc.cpu()), NotImplementedError, "CPU"),
        "shift on CPU": ((x, w, b, sh.cpu(), sc), ValueError, "shift must be a CUDA tensor"),
        "weight wrong dtype": ((x, w.half(), b, sh, sc), ValueError, "weight has dtype"),
        "x float64": ((x.double(), w.double(), b.double(), sh.double(), sc.double()), ValueError,
                      "float32, float16 or bfloat16"),
        "x NCHW": ((x.permute(0, 3, 1, 2).contiguous(), w, b, sh, sc), ValueError, "looks like NCHW"),
        # H == W, so only the strides give the transposed view away.
        "x transposed view": ((x.transpose(1, 2), w, b, sh, sc), ValueError, "contiguous"),
        "x 3-D": ((x[0], w, b, sh, sc), ValueError, "4-D"),
        "weight 5x5": ((x, w[:, :5, :5].contiguous(), b, sh, sc), ValueError, "weight must have shape"),
        "scale wrong batch": ((x, w, b, sh, sc[:1].contiguous()), ValueError, "scale must have shape"),
        "bias wrong length": ((x, w, b[:-1].contiguous(), sh, sc), ValueError, "bias must have shape"),
    }


@pytest.mark.parametrize("case", [
    "x on CPU", "shift on CPU", "weight wrong dtype", "x float64", "x NCHW", "x transposed view", "x 3-D",
    "weight 5x5", "scale wrong batch", "bias wrong length"])
def test_bad_inputs_raise_clear_errors(backend, case):
    args, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        torch.ops.fcdm.dwconv_ln_modulate_cuda(*args, 1e-6)
    torch.cuda.synchronize()  # the process (and the CUDA context) survived


def test_bad_grad_h_raises(backend):
    inputs, grad_h = make_inputs((2, 8, 8, 64), torch.float32)
    with pytest.raises(ValueError, match="grad_h must have shape"):
        torch.ops.fcdm.dwconv_ln_modulate_cuda_backward(grad_h[:, :4].contiguous(), *inputs, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_agrees_with_triton(backend, dtype):
    try:
        import fcdm_kernels.triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no Triton backend to compare with ({e})")
    if dispatch.unavailable_reason("dwconv_ln_modulate", "triton", torch.device("cuda")) is not None:
        pytest.skip("the Triton backend has no dwconv_ln_modulate yet")
    inputs, grad_h = make_inputs((8, 16, 16, 512), dtype)
    triton_impl = dispatch.implementation_on("dwconv_ln_modulate", "triton")
    cuda_out, cuda_grads = run_cuda(backend, inputs, grad_h)
    tri_out, tri_grads = forward_and_grads(triton_impl, inputs, grad_h)
    for name, a, b in zip(("h",) + GRAD_NAMES, (cuda_out,) + cuda_grads, (tri_out,) + tri_grads):
        assert_rel_close(a, b, 2 * REL_TOL[dtype], f"{name} cuda vs triton")


def test_autotune_measures_once_and_caches(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("FCDM_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.delenv("FCDM_AUTOTUNE", raising=False)
    monkeypatch.setattr(backend.autotune, "_memory", {})
    x = make_inputs((2, 8, 8, 64), torch.bfloat16)[0][0]
    order = backend.autotune.preference(x)
    assert set(order) == {"cuda", "triton"}
    if dispatch.unavailable_reason("dwconv_ln_modulate", "triton", x.device) is None:
        cached = backend.autotune.read_cache(tmp_path / "autotune.json")
        assert len(cached) == 1 and list(cached.values())[0]["order"] == list(order)
    monkeypatch.setattr(backend.autotune, "measure", lambda x: pytest.fail("measured twice"))
    assert backend.autotune.preference(x) == order


SANITIZER_SCRIPT = r"""
import torch
import fcdm_kernels.cuda as backend
for shape, dtype in (((2, 7, 7, 40), torch.bfloat16), ((1, 9, 13, 44), torch.float32), ((1, 8, 9, 516), torch.float16)):
    B, H, W, C = shape
    shapes = ((B, H, W, C), (C, 7, 7), (C,), (B, C), (B, C))
    args = [torch.randn(s, device="cuda").to(dtype).requires_grad_() for s in shapes]
    h = backend.registration.dwconv_ln_modulate_cuda(*args)
    h.backward(torch.randn_like(h))
torch.cuda.synchronize()
print("SANITIZED OK")
"""


@pytest.mark.slow  # the sanitizer instruments every kernel of the process: minutes, beyond gpu_check's time box
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(backend, tool):
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.isfile(p)), None)
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed on this machine")
    # Without the caching allocator every buffer is its own allocation, so memcheck sees overruns past its end.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "97", sys.executable, "-c",
                             SANITIZER_SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0 and "SANITIZED OK" in result.stdout, (result.stdout + result.stderr)[-8000:]
