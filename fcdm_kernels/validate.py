"""Input checks shared by every backend of every fused op.

Each check raises ValueError naming the offending argument, so a user who passes an NCHW tensor, a CPU tensor next to a
CUDA one, or a bf16 weight next to fp32 activations learns which argument is wrong rather than getting a kernel crash.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, shape: tuple, like: torch.Tensor | None = None, contiguous: bool = True) -> None:
    """Check type, shape (None entries are free), dtype/device against `like`, and contiguity."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but the activations have dtype {like.dtype}; "
                             f"cast it with .to({like.dtype})")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the activations are on {like.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
                         f"call .contiguous() first")


def check_nhwc(name: str, x, channels: int | None = None) -> None:
    """An activation must be a contiguous (B, H, W, C) tensor; NCHW inputs are the most common mistake."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D channels-last (B, H, W, C) tensor, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[-1] != channels:
        hint = " (it looks like NCHW; pass x.permute(0, 2, 3, 1).contiguous())" if x.shape[1] == channels else ""
        raise ValueError(f"{name} must have {channels} channels in its last dimension (NHWC), "
                         f"got shape {tuple(x.shape)}{hint}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous NHWC tensor (strides {x.stride()} for shape "
                         f"{tuple(x.shape)}); an NCHW tensor viewed with permute() is not contiguous")
