"""Numerical comparison helpers shared by the kernel and model tests."""
from __future__ import annotations

import contextlib

import torch

# Relative-error budgets against an fp64 oracle (developers' guide): fp32 kernels with TF32 off, and bf16/fp16.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 2e-3}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in fp64 on out's device; NaN anywhere gives inf so it can never pass."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    """Fail with the worst mismatching elements when ||out - ref|| / ||ref|| > tol."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_error(out, ref)
    if err <= tol:
        return
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().flatten()
    diff = torch.nan_to_num(diff, nan=float("inf"))
    worst = diff.topk(min(5, diff.numel())).indices
    lines = [f"  [{tuple(int(i) for i in torch.unravel_index(k, out.shape))}] out={out.flatten()[k].item():.6g} "
             f"ref={ref.flatten()[k].item():.6g}" for k in worst]
    raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst elements:\n" + "\n".join(lines))


# The whole ConvNeXt block's arguments, in the order of fcdm_kernels.reference.convnext_block_reference.
BLOCK_ARG_NAMES = ("x", "shift", "scale", "gate", "dw_weight", "dw_bias", "w1", "b1", "gamma", "beta", "w2", "b2")


def block_args(B, H, W, C, dtype, device, requires_grad=True) -> list[torch.Tensor]:
    """Random (never zero) block arguments at a scale that keeps every path of the block active."""
    J = 3 * C
    args = (torch.randn(B, H, W, C), torch.randn(B, C) * 0.5, torch.randn(B, C) * 0.5, torch.randn(B, C),
            torch.randn(C, 7, 7) / 7, torch.randn(C) * 0.5, torch.randn(J, C) / C ** 0.5, torch.randn(J) * 0.1,
            torch.randn(J), torch.randn(J) * 0.3, torch.randn(C, J) / J ** 0.5, torch.randn(C) * 0.1)
    return [a.to(device=device, dtype=dtype).requires_grad_(requires_grad) for a in args]


def assert_matches_fp64(fn, reference, args: list[torch.Tensor], names, tol: float, label: str = "") -> None:
    """fn(*args) and the gradients of every argument that requires one against `reference` run in fp64 on the same
    (rounded) inputs, each within tol; a reference gradient that is all zero fails, as the check would not exercise
    it. `label` prefixes every message (say what the inputs are, so that a failure names its cause)."""
    prefix = f"{label}: " if label else ""
    wanted = [i for i, a in enumerate(args) if a.requires_grad]
    out = fn(*args)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [args[i] for i in wanted], grad_out)
    exact = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
    ref = reference(*exact)
    ref_grads = torch.autograd.grad(ref, [exact[i] for i in wanted], grad_out.double())
    names = [names[i] for i in wanted]
    assert_rel_close(out, ref, tol, prefix + "out")
    for name, g, rg in zip(names, grads, ref_grads):
        assert rg.abs().sum() > 0, f"{prefix}d{name} is zero in the reference; the test would not exercise it"
        assert_rel_close(g, rg, tol, prefix + "d" + name)


def assert_block_matches_fp64(block, args: list[torch.Tensor], dtype: torch.dtype, label: str = "") -> None:
    """block(*args) and the gradients of all twelve arguments against convnext_block_reference in fp64, each within
    REL_TOL[dtype]."""
    from fcdm_kernels.reference import convnext_block_reference
    assert_matches_fp64(block, convnext_block_reference, args, BLOCK_ARG_NAMES, REL_TOL[dtype], label)


def saved_tensors(fn, args) -> list[torch.Tensor]:
    """The tensors autograd saves for the backward of one call of fn(*args)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved


@contextlib.contextmanager
def runs_on(backend: str, *ops: str):
    """Run the body with `backend` requested, and fail unless every op in `ops` was called on that backend at least
    once: a test of fused kernels must prove they ran, not only that the numbers match (the torch reference matches
    them too). Yields the per-op call counts. Counts calls through the dispatcher, so it also sees the ops inside a
    model."""
    from fcdm_kernels import dispatch, use_backend
    dispatch._load(backend)  # registers the backend's implementations (the first call would, too)
    calls = dict.fromkeys(ops, 0)
    originals = {op: dispatch._IMPLS.get(op, {}).get(backend) for op in ops}
    missing = [op for op, fn in originals.items() if fn is None]
    assert not missing, f"the {backend} backend has no implementation of {missing}: {dispatch._loaded.get(backend)}"

    def counted(op, fn):
        def call(*args):
            calls[op] += 1
            return fn(*args)
        return call
    for op, fn in originals.items():
        dispatch._IMPLS[op][backend] = counted(op, fn)
    try:
        with use_backend(backend):
            yield calls
    finally:
        for op, fn in originals.items():
            dispatch._IMPLS[op][backend] = fn
    never = [op for op, n in calls.items() if n == 0]
    assert not never, (f"{never} never ran on the {backend} backend (calls {calls}): the test compared another "
                       f"implementation (a fallback or a composed path) with the reference")
