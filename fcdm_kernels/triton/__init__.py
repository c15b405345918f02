"""Triton backend of the fused FCDM-block ops: importing it registers `triton` implementations with the dispatcher.

Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). Nothing touches CUDA at import.
See docs/kernels.md.
"""
from __future__ import annotations

from .. import dispatch
from . import block as block_module
from . import dwconv_ln_modulate as dwconv_ln_modulate_module
from . import grn_mlp as grn_mlp_module

dispatch.register("dwconv_ln_modulate", "triton")(dwconv_ln_modulate_module.dwconv_ln_modulate)
dispatch.register("grn_mlp", "triton")(grn_mlp_module.grn_mlp)
# The whole block as one op: saves x and pre only (h is recomputed, z is never needed).
dispatch.register("convnext_block", "triton")(block_module.convnext_block)


def _prefer_triton(x):
    """`auto` on CUDA: the Triton kernels first (a CUDA-extension backend, where built, second)."""
    return ("triton", "cuda")


# Never replace a chooser another backend installed first (the CUDA backend's one times both backends).
for _op in ("dwconv_ln_modulate", "grn_mlp"):
    dispatch.set_auto_preference(_op, _prefer_triton, replace=False)
