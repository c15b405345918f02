"""Fused ops of the FCDM block (channels-last), with a reference, Triton and CUDA backend each.

    from fcdm_kernels import dwconv_ln_modulate, grn_mlp, use_backend
"""
from .determinism import deterministic, set_deterministic, use_deterministic
from .dispatch import BACKENDS, BackendFallbackWarning, get_backend, resolve, set_backend, use_backend
from .ops import convnext_block, dwconv_ln_modulate, grn_mlp
from .reference import convnext_block_reference, dwconv_ln_modulate_reference, grn_mlp_reference

__all__ = [
    "BACKENDS", "BackendFallbackWarning", "get_backend", "set_backend", "use_backend", "resolve",
    "deterministic", "set_deterministic", "use_deterministic",
    "dwconv_ln_modulate", "grn_mlp", "convnext_block",
    "dwconv_ln_modulate_reference", "grn_mlp_reference", "convnext_block_reference",
]
