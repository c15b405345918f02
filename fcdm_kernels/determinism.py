"""Whether the fused kernels must give bitwise-identical results from run to run.

Deterministic (the default): every sum that spans several GPU programs is written as per-tile partial sums and
reduced in a fixed order, so the result does not depend on which program finishes first. Otherwise the Triton
kernels add into shared accumulators with relaxed fp32 atomics, whose order (and so whose rounding) changes from run
to run. `torch.use_deterministic_algorithms(True)` always wins: it forces the deterministic path.

    fcdm_kernels.set_deterministic(False)          # or FCDM_DETERMINISTIC=0: allow the atomic reductions
    with fcdm_kernels.use_deterministic(True):     # scoped
        loss.backward()

The reference and CUDA backends are deterministic either way. Bitwise equality also needs the same launch configs:
they are a function of the shape, dtype and GPU, except the Triton GEMM tiles that the lazy tuner picks by timing,
which may differ between processes (FCDM_TRITON_TUNE=0 or torch's deterministic mode turns the timing off;
docs/kernels.md).
"""
from __future__ import annotations

import contextlib
import os

import torch

ENV = "FCDM_DETERMINISTIC"
_setting: bool | None = None  # set_deterministic(); None: the environment decides
_scopes: list[bool] = []      # use_deterministic() nesting


def _from_env() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {ENV} must be 1 or 0, got {value!r}")


def set_deterministic(mode: bool | None) -> None:
    """True: fixed-order reductions; False: allow atomic reductions; None: follow FCDM_DETERMINISTIC (default 1)."""
    global _setting
    if mode is not None and not isinstance(mode, bool):
        raise ValueError(f"mode must be True, False or None, got {mode!r}")
    _setting = mode


@contextlib.contextmanager
def use_deterministic(mode: bool):
    """Scoped set_deterministic(mode); torch's deterministic mode still forces True inside."""
    if not isinstance(mode, bool):
        raise ValueError(f"mode must be True or False, got {mode!r}")
    _scopes.append(mode)
    try:
        yield
    finally:
        _scopes.pop()


def deterministic() -> bool:
    """Whether the kernels launched now must reduce in a fixed order (see the module docstring)."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if _scopes:
        return _scopes[-1]
    return _setting if _setting is not None else _from_env()
