"""Backend selection for the fused ops: `torch` | `triton` | `cuda` | `auto`.

The requested backend comes from, in order of precedence: the innermost `use_backend(...)` context, the last
`set_backend(...)`, then the environment variable FCDM_BACKEND (default `auto`). It is resolved per call from the
device of the activations, so one model can run on CPU and GPU without changing settings:

* `auto` picks a fused backend on CUDA tensors (per-op preference, possibly from a cached measurement) and the
  reference on CPU.
* An explicitly requested backend that cannot run here (Triton not installed, the CUDA extension not built, CPU
  tensors without TRITON_INTERPRET=1) falls back along cuda -> triton -> torch with one BackendFallbackWarning per
  reason (the test suite turns it into an error, so a kernel test cannot pass on the reference by accident).

Backend modules register their implementations with `register(op, backend)`. They are imported lazily, on first use,
so importing fcdm never touches CUDA or compiles anything.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda", "auto")
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


def set_auto_preference(op: str, chooser: Callable[[torch.Tensor], tuple[str, ...]]) -> None:
    """Let a backend module order the CUDA backends `auto` tries for `op`, given the activation tensor."""
    _auto_preference[op] = chooser


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
    return _IMPLS[op][resolve(op, x)]


def implementation_on(op: str, backend: str) -> Callable | None:
    """`op`'s implementation on an already resolved backend, or None where that backend has none."""
    return _IMPLS.get(op, {}).get(backend)


def block_implementation(op: str, like_op: str, x: torch.Tensor) -> Callable | None:
    """The backend-specific implementation of composite `op` on the backend `like_op` resolves to, or None.

    Composite ops (a whole block) are optional per backend: without one, the caller composes the per-op kernels,
    so asking for a composite never triggers a fallback warning of its own.
    """
    return implementation_on(op, resolve(like_op, x))
