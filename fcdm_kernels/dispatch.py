"""Backend selection for the fused ops: `torch` | `triton` | `cuda` | `auto`.

The requested backend comes from, in order of precedence: the innermost `use_backend(...)` context, the last
`set_backend(...)`, then the environment variable FCDM_BACKEND (default `auto`). It is resolved per call from the
device of the activations, so one model can run on CPU and GPU without changing settings:

* `auto` picks a fused backend on CUDA tensors (per-op preference, possibly from a cached measurement) and the
  reference on CPU.
* An explicitly requested backend that cannot run here (Triton not installed, the CUDA extension not built, CPU
  tensors without TRITON_INTERPRET=1) falls back along cuda -> triton -> torch with one BackendFallbackWarning per
  reason (the test suite turns it into an error, so a kernel test cannot pass on the reference by accident).

Backend modules register their implementations with `register(op, backend)`, and may order what `auto` tries with
`set_auto_preference`. They are imported lazily, on first use, so importing fcdm never touches CUDA or compiles
anything. `block_plan` is the one rule for a whole ConvNeXt block: one fused op, or the two ops on their backends.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, NamedTuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")  # every name a user may request; the one list the flags offer
FALLBACK = {"cuda": "triton", "triton": "torch"}

# Modules that register a backend's implementations when imported.
_BACKEND_MODULES = {"triton": "fcdm_kernels.triton", "cuda": "fcdm_kernels.cuda"}


class BackendFallbackWarning(RuntimeWarning):
    """A requested backend cannot run here and a slower one runs instead; a class of its own so that warning filters
    can target it (`warnings.simplefilter("error", BackendFallbackWarning)`, or pytest's filterwarnings)."""


_IMPLS: dict[str, dict[str, Callable]] = {}
_loaded: dict[str, str | None] = {}          # backend -> None if loaded, else the reason it is unavailable
_warned: set[str] = set()
_global_backend: str | None = None
# use_backend() nesting. A plain list rather than a ContextVar: torch.compile traces through list reads (and guards
# on them, so switching backends recompiles), while a ContextVar lookup is a graph break.
_backend_stack: list[str] = []
# Per-op preference on CUDA for `auto`; backends may refine it (e.g. from an on-disk timing cache).
_auto_preference: dict[str, Callable[[torch.Tensor], tuple[str, ...]]] = {}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the fused-op backend for this process: 'torch', 'triton', 'cuda' or 'auto'."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The requested backend (before per-device resolution)."""
    if _backend_stack:
        return _backend_stack[-1]
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get("FCDM_BACKEND", "auto")
    try:
        return _check_name(env)
    except ValueError:
        raise ValueError(f"environment variable FCDM_BACKEND must be one of {BACKENDS}, got {env!r}") from None


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: `with fcdm.use_backend('torch'): model(x, t, y)`."""
    _backend_stack.append(_check_name(name))
    try:
        yield
    finally:
        _backend_stack.pop()


def register(op: str, backend: str):
    """Decorator used by backend modules: @register('dwconv_ln_modulate', 'triton')."""
    def wrap(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn
    return wrap


def set_auto_preference(op: str, chooser: Callable[[torch.Tensor], tuple[str, ...]], replace: bool = True) -> bool:
    """Let a backend module order the CUDA backends `auto` tries for `op`: chooser(activations) -> backend names,
    first preferred. With replace=False a chooser installed earlier is kept. Returns whether `chooser` was installed."""
    if not replace and op in _auto_preference:
        return False
    _auto_preference[op] = chooser
    return True


def auto_preference(op: str) -> Callable[[torch.Tensor], tuple[str, ...]] | None:
    """The chooser installed for `op` by set_auto_preference, or None (then `auto` tries triton, then cuda)."""
    return _auto_preference.get(op)


@torch.compiler.assume_constant_result  # runs eagerly while torch.compile traces: an import is no graph break
def _load(backend: str) -> str | None:
    """Import a backend's module once; return None when it loaded, else why not."""
    if backend == "torch":
        return None
    if backend not in _loaded:
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
            _loaded[backend] = None
        except Exception as e:  # a missing extension or Triton must degrade, not break import fcdm
            _loaded[backend] = f"{type(e).__name__}: {e}"
    return _loaded[backend]


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """None when `backend` can run `op` on `device`, else a human-readable reason."""
    if backend == "torch":
        return None
    reason = _load(backend)
    if reason is not None:
        return f"the {backend} backend could not be loaded ({reason})"
    if backend not in _IMPLS.get(op, {}):
        return f"the {backend} backend has no implementation of {op}"
    if device.type == "cuda":
        return None
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)" if backend == "triton" else ""
    return f"the {backend} backend needs CUDA tensors, got {device.type} tensors{hint}"


def capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` is being captured into a CUDA graph: the backends' choosers must not
    time (or synchronise) then."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _warn_once(message: str) -> None:
    if torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn; eager calls (the first ones) still warn
        return
    if message not in _warned:
        # Remembered only once the warning is out: where a filter makes it an error, every call keeps failing.
        warnings.warn(message, BackendFallbackWarning, stacklevel=4)
        _warned.add(message)


def resolve(op: str, x: torch.Tensor) -> str:
    """The concrete backend that will run `op` on activations `x`."""
    requested = get_backend()
    if requested == "auto":
        if x.device.type != "cuda":
            return "torch"
        _load("cuda")  # lets the CUDA backend install its measured per-shape preference; a no-op if unavailable
        chooser = _auto_preference.get(op)
        order = chooser(x) if chooser is not None else ("triton", "cuda")
        for backend in order:
            if unavailable_reason(op, backend, x.device) is None:
                return backend
        return "torch"
    backend = requested
    while backend != "torch":
        reason = unavailable_reason(op, backend, x.device)
        if reason is None:
            return backend
        nxt = FALLBACK[backend]
        _warn_once(f"fcdm: {reason}; falling back to the {nxt} backend for {op}")
        backend = nxt
    return "torch"


def implementation(op: str, x: torch.Tensor) -> Callable:
    """The implementation of `op` that runs on activations `x`."""
    return _IMPLS[op][resolve(op, x)]


def implementation_on(op: str, backend: str) -> Callable | None:
    """`op`'s implementation on an already resolved backend, or None where that backend has none."""
    return _IMPLS.get(op, {}).get(backend)


class BlockPlan(NamedTuple):
    """How one ConvNeXt block runs on given activations: the fused whole-block op of `mlp_backend` when `fused` is
    set, else dwconv_ln_modulate on `conv_backend` followed by grn_mlp on `mlp_backend`."""

    conv_backend: str
    mlp_backend: str
    fused: Callable | None

    @property
    def dwconv_ln_modulate(self) -> Callable:
        return _IMPLS["dwconv_ln_modulate"][self.conv_backend]

    @property
    def grn_mlp(self) -> Callable:
        return _IMPLS["grn_mlp"][self.mlp_backend]

    def describe(self) -> str:
        """E.g. 'triton convnext_block op' or 'cuda dwconv_ln_modulate + triton grn_mlp'."""
        if self.fused is not None:
            return f"{self.mlp_backend} convnext_block op"
        return f"{self.conv_backend} dwconv_ln_modulate + {self.mlp_backend} grn_mlp"


def block_plan(x: torch.Tensor) -> BlockPlan:
    """The one rule for a whole block on activations `x`. The block follows grn_mlp's backend, as one op where that
    backend has a whole-block op (which may recompute rather than save activations). An explicitly requested backend
    that has dwconv_ln_modulate but no grn_mlp (cuda) runs its own dwconv, with grn_mlp on the fallback, rather than
    the fallback's whole-block op. A whole-block op is optional, so it never warns of a fallback of its own."""
    mlp_backend = resolve("grn_mlp", x)  # once per block: this runs for every block of every step
    requested = get_backend()
    conv_backend = resolve("dwconv_ln_modulate", x) if requested not in ("auto", mlp_backend) else mlp_backend
    fused = implementation_on("convnext_block", mlp_backend) if conv_backend == mlp_backend else None
    return BlockPlan(conv_backend, mlp_backend, fused)
