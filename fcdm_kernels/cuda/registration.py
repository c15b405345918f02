"""torch.library registration of the CUDA dwconv_ln_modulate: fake kernels (torch.compile), autograd, dispatch.

The schemas and CUDA kernels are registered by the extension (csrc/bindings.cpp); this file adds what is easier to say
in Python, the way pytorch/extension-cpp does it.
"""
from __future__ import annotations

import torch

from .. import dispatch
from ..reference import LN_EPS

FORWARD = "fcdm::dwconv_ln_modulate_cuda"
BACKWARD = "fcdm::dwconv_ln_modulate_cuda_backward"


@torch.library.register_fake(FORWARD)
def _forward_fake(x, weight, bias, shift, scale, eps):
    return torch.empty_like(x)


@torch.library.register_fake(BACKWARD)
def _backward_fake(grad_h, x, weight, bias, shift, scale, eps):
    return tuple(torch.empty_like(t) for t in (x, weight, bias, shift, scale))


def _setup_context(ctx, inputs, output):
    x, weight, bias, shift, scale, eps = inputs
    # Every gradient but dshift (grad_h summed over the pixels) recomputes the LayerNorm from x, weight, bias and
    # scale; when dshift alone is wanted nothing is kept.
    ctx.only_shift = not any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
    if not ctx.only_shift:
        ctx.save_for_backward(x, weight, bias, shift, scale)
    ctx.eps = eps


def _backward(ctx, grad_h):
    needs = ctx.needs_input_grad[:5]
    if not any(needs):
        return (None,) * 6
    if ctx.only_shift:
        return None, None, None, grad_h.float().sum(dim=(1, 2)).to(grad_h.dtype), None, None
    x, weight, bias, shift, scale = ctx.saved_tensors
    # One kernel pass yields all five gradients; the ones nobody asked for are dropped.
    grads = torch.ops.fcdm.dwconv_ln_modulate_cuda_backward(grad_h.contiguous(), x, weight, bias, shift, scale,
                                                             ctx.eps)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,)


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


@dispatch.register("dwconv_ln_modulate", "cuda")
def dwconv_ln_modulate_cuda(x, weight, bias, shift, scale, eps: float = LN_EPS):
    """The CUDA kernels behind fcdm_kernels.dwconv_ln_modulate (inputs already validated by fcdm_kernels.ops)."""
    return torch.ops.fcdm.dwconv_ln_modulate_cuda(x, weight, bias, shift, scale, float(eps))
