"""What a Triton launcher allocates and launches on a GPU, at any shape, without a GPU and without running a kernel.

    report = dry_run(dwconv_ln_modulate_backward, dh, x, weight, bias, scale, 1e-6)   # meta tensors
    report.workspace_bytes, report.output_bytes, report.launches
    for name, (launcher, args) in op_launchers(64, 32, 32, 512).items(): ...          # every op, both passes

The launcher runs on meta tensors with the configs launch.py picks on CUDA (the untuned GEMM defaults), while every
Triton kernel of the backend is replaced by a stub that records its grid. A dispatch mode follows each tensor the
launcher allocates until it is freed, so the peak of what it holds besides its inputs is exact. benchmarks.memory
reports each op's transient memory this way, and the tests check the bounds at shapes far too large to run.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary
from triton.runtime.jit import KernelInterface

from . import block, dwconv_ln_modulate, grn_mlp, launch

KERNEL_MODULES = (dwconv_ln_modulate, grn_mlp, block)


@dataclass
class DryRunReport:
    """Bytes are of tensors the launcher allocated: `peak_bytes` at their largest together, `workspace_bytes` the
    largest of those it did not return (its transient memory), `output_bytes` what it returned. `launches` lists
    (kernel, grid) in launch order; `allocations` every (shape, dtype) it asked for, in order."""
    peak_bytes: int = 0
    workspace_bytes: int = 0
    output_bytes: int = 0
    launches: list = field(default_factory=list)
    allocations: list = field(default_factory=list)


class _AllocationLog(TorchDispatchMode):
    """Logs ("alloc", key, bytes) for each new storage an op returns and ("free", key) when it dies."""

    def __init__(self, report: DryRunReport):
        super().__init__()
        self.report = report
        self.events: list[tuple] = []
        self.keys = WeakIdKeyDictionary()
        self.next_key = itertools.count()

    def key_of(self, t: torch.Tensor):
        return self.keys.get(t.untyped_storage())

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.keys:
            return
        key = next(self.next_key)
        self.keys[storage] = key
        self.events.append(("alloc", key, storage.nbytes()))
        self.report.allocations.append((tuple(t.shape), t.dtype))
        weakref.finalize(storage, self.events.append, ("free", key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class _KernelStub:
    def __init__(self, name: str, report: DryRunReport):
        self.name, self.report = name, report

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.report.launches.append((self.name, tuple(grid)))
        return launch_


@contextlib.contextmanager
def _as_on_cuda(report: DryRunReport):
    """CUDA's launch configs (no interpreter, untuned GEMMs) and stubbed kernels, restored afterwards."""
    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)
    try:
        patch(launch, "interpreting", lambda device: False)
        patch(launch, "gemm_config", lambda op, m, n, k, pixels, dtype, device, run:
              launch._default_gemm_config(op, n, dtype))
        for module in KERNEL_MODULES:
            for name, obj in list(vars(module).items()):
                if name.endswith("_kernel") and isinstance(obj, KernelInterface):
                    patch(module, name, _KernelStub(name, report))
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def dry_run(launcher, *args, **kwargs) -> DryRunReport:
    """Run `launcher(*args, **kwargs)` on meta tensors as on a GPU (module docstring) and report its memory."""
    if any(isinstance(a, torch.Tensor) and a.device.type != "meta" for a in tree_leaves((args, kwargs))):
        raise ValueError("dry_run needs meta tensors (torch.empty(..., device='meta')), so nothing is allocated")
    report = DryRunReport()
    log = _AllocationLog(report)
    for t in tree_leaves((args, kwargs)):  # the inputs (and views of them) are not the launcher's allocations
        if isinstance(t, torch.Tensor):
            log.keys[t.untyped_storage()] = None
    with _as_on_cuda(report), log:
        result = launcher(*args, **kwargs)
        outputs = {log.key_of(t) for t in tree_leaves(result) if isinstance(t, torch.Tensor)} - {None}
    live = held = 0
    sizes = {}
    for event in log.events:
        if event[0] == "alloc":
            _, key, nbytes = event
            sizes[key] = nbytes
            live += nbytes
            held += 0 if key in outputs else nbytes
        else:
            live -= sizes[event[1]]
            held -= 0 if event[1] in outputs else sizes[event[1]]
        report.peak_bytes = max(report.peak_bytes, live)
        report.workspace_bytes = max(report.workspace_bytes, held)
    report.output_bytes = sum(sizes[k] for k in outputs)
    del result
    return report


def op_launchers(B: int, H: int, W: int, C: int, dtype: torch.dtype = torch.bfloat16,
                 mlp_ratio: int = 3) -> dict[str, tuple]:
    """{"<op> <pass>": (launcher, meta arguments)} for the forward and backward of each Triton op at one shape, as its
    autograd function calls it when a gradient is needed (forwards save for the backward)."""
    J, M = mlp_ratio * C, B * H * W

    def meta(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt)
    x, vec = meta(B, H, W, C), meta(B, C)
    conv = (meta(C, 7, 7), meta(C))
    w1, b1, gamma, beta, w2, b2 = meta(J, C), meta(J), meta(J), meta(J), meta(C, J), meta(C)
    pre, z, ss = meta(M, J), meta(M, C), meta(B, J, dt=torch.float32)
    return {
        "dwconv_ln_modulate forward": (dwconv_ln_modulate.dwconv_ln_modulate_forward, (x, *conv, vec, vec, 1e-6)),
        "dwconv_ln_modulate backward": (dwconv_ln_modulate.dwconv_ln_modulate_backward, (x, x, *conv, vec, 1e-6)),
        "grn_mlp forward": (grn_mlp.grn_mlp_forward, (x, x, vec, w1, b1, gamma, beta, w2, b2, True)),
        "grn_mlp backward": (grn_mlp.grn_mlp_backward, (x, x, vec, w1, gamma, beta, w2, pre, z, ss, ss)),
        "convnext_block forward": (block.convnext_block_forward, (x, vec, vec, vec, *conv, w1, b1, gamma, beta, w2,
                                                                  b2, True)),
        "convnext_block backward": (block.convnext_block_backward, (x, x, vec, vec, vec, *conv, w1, gamma, beta, w2,
                                                                    b2, pre, ss, ss)),
    }
