"""CUDA C++ backend (csrc/) of dwconv_ln_modulate; importing it registers the op with the dispatcher.

The import raises ImportError, with the reason, when the extension is not available (not built, CPU-only torch);
`fcdm_kernels.dispatch` turns that into one warning and falls back to Triton or torch. On CUDA, `auto` then picks the
faster of CUDA and Triton per shape from a one-time measurement cached on disk (autotune.py).
"""
from .extension import load_extension

_C = load_extension()

from . import autotune, registration  # noqa: E402  (both need the ops the extension registers)

__all__ = ["autotune", "registration"]
