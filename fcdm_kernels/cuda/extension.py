"""Finds the compiled extension: the built `fcdm_kernels._C`, else an opt-in JIT build, else a clear ImportError."""
from __future__ import annotations

import importlib
import os

import torch

from . import build  # stdlib only: importing it builds nothing

JIT_ENV = "FCDM_CUDA_JIT"  # "1": compile csrc/ with torch.utils.cpp_extension.load on first use (needs nvcc, ninja)


def load_extension():
    """Return the module whose import registered torch.ops.fcdm.dwconv_ln_modulate_cuda*, or raise ImportError."""
    try:
        return importlib.import_module("fcdm_kernels._C")
    except ImportError as e:
        not_built = e
    if torch.version.cuda is None:
        raise ImportError(f"torch {torch.__version__} is a CPU-only build, so the CUDA extension cannot run here")
    if os.environ.get(JIT_ENV) == "1":
        if not build.sources():
            raise ImportError(f"{JIT_ENV}=1 but there is no csrc/ next to the package (JIT needs a source checkout)")
        try:
            return build.jit_load()
        except Exception as e:  # a compiler error must surface as "backend unavailable", with the reason
            raise ImportError(f"JIT build of the CUDA extension failed: {e}") from e
    raise ImportError(f"the CUDA extension fcdm_kernels._C is not built ({not_built}); build it with "
                      f"`pip install --no-build-isolation -e .` (docs/building.md) or set {JIT_ENV}=1")
