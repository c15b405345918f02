"""FCDM: the fully convolutional diffusion U-Net of ConvNeXt blocks (Kwon et al., CVPR 2026).

State-dict keys, shapes and the order of operations match the official star-kwon/FCDM `models/fcdm_models.py`, so
official checkpoints load with strict=True and give the same outputs. The difference is layout: activations stay
channels-last (B, H, W, C) from the stem to the output, and each block runs as two fused ops from `fcdm_kernels`
(dwconv_ln_modulate, grn_mlp) whose backend is chosen by fcdm.set_backend / FCDM_BACKEND.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fcdm_kernels import convnext_block

from .embeddings import LabelEmbedder, TimestepEmbedder


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C); free when x is already channels_last in memory."""
    return x.permute(0, 2, 3, 1).contiguous()


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view with channels_last strides (no copy), for nn.Conv2d."""
    return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization parameters (ConvNeXt-V2); the maths lives in the grn_mlp op."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))


class ConvNeXtBlock(nn.Module):
    """dwconv7x7 -> LN -> adaLN modulate -> pwconv1 -> GELU -> GRN -> pwconv2 -> gate -> residual, on NHWC."""

    def __init__(self, dim: int, mlp_ratio: float = 3):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dim, self.hidden = dim, hidden
        # Registration order follows the official module, so state_dict order matches too.
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1)
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C) contiguous; c: (B, C)
        dt = x.dtype
        C, J = self.dim, self.hidden
        shift, scale, gate = (m.to(dt).contiguous() for m in self.adaLN_modulation(c).chunk(3, dim=1))
        return convnext_block(x, shift, scale, gate,
                              self.dwconv.weight.to(dt).view(C, 7, 7), self.dwconv.bias.to(dt),
                              self.pwconv1.weight.to(dt).view(J, C), self.pwconv1.bias.to(dt),
                              self.grn.gamma.to(dt).view(J), self.grn.beta.to(dt).view(J),
                              self.pwconv2.weight.to(dt).view(C, J), self.pwconv2.bias.to(dt))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> x * (1 + scale) + shift -> Conv3x3 to the output channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.conv = nn.Conv2d(hidden_size, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, H, W, C) -> (B, out, H, W)
        shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=1)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        x = x * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
        return self.conv(to_nchw(x))


class Downsample(nn.Module):
    """Conv3x3(C_in, C_out/4, no bias) -> PixelUnshuffle(2): half the resolution, C_out channels."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_ch, out_ch // 4, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.conv(to_nchw(x)))


class Upsample(nn.Module):
    """Conv3x3(C_in, 4 C_out, no bias) -> PixelShuffle(2): twice the resolution, C_out channels."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_ch, out_ch * 4, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_nhwc(self.conv(to_nchw(x)))


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv applied to NHWC x as a linear layer over the channel axis."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class FCDM(nn.Module):
    """Fully convolutional diffusion model: a 3-level U-Net of adaLN-conditioned ConvNeXt blocks."""

    def __init__(self, in_channels: int = 4, hidden_size: int = 512, depth=(2, 4, 8, 4, 2), mlp_ratio: float = 3,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 grad_checkpointing: bool = False, label_dropout: str = "shared", **unused):
        super().__init__()
        if len(depth) != 5:
            raise ValueError(f"depth must list 5 block counts (enc1, enc2, latent, dec2, dec1), got {depth!r}")
        unused.pop("input_size", None)  # DiT-style callers pass it; a fully convolutional model takes any size
        if unused:
            # The official constructor swallows unknown kwargs too; say so rather than silently ignoring typos.
            warnings.warn(f"FCDM ignores unknown arguments {sorted(unused)}", stacklevel=2)
        C = hidden_size
        self.in_channels, self.hidden_size, self.depth = in_channels, hidden_size, list(depth)
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.grad_checkpointing = grad_checkpointing
        if label_dropout not in ("shared", "per_level", "external"):
            raise ValueError(f"label_dropout must be 'shared', 'per_level' or 'external', got {label_dropout!r}")
        # The official code draws the CFG label dropout independently in each level's embedder, so a training sample
        # is unconditional at all three levels (as every CFG sampling step is) only 0.1% of the time. "shared" drops a
        # label at every level at once; "per_level" reproduces the official behaviour exactly; "external" leaves it
        # to the caller (the trainer draws it per global batch, so the result does not depend on the world size).
        self.label_dropout = label_dropout

        for level, width in ((1, C), (2, 2 * C), (3, 4 * C)):
            self.add_module(f"t_embedder_{level}", TimestepEmbedder(width))
            self.add_module(f"y_embedder_{level}", LabelEmbedder(num_classes, width, class_dropout_prob))
        self.x_embedder = nn.Conv2d(in_channels, C, kernel_size=3, padding=1)

        def blocks(n, width):
            return nn.ModuleList(ConvNeXtBlock(width, mlp_ratio) for _ in range(n))

        self.encoder_level_1 = blocks(depth[0], C)
        self.down1_2 = Downsample(C, 2 * C)
        self.encoder_level_2 = blocks(depth[1], 2 * C)
        self.down2_3 = Downsample(2 * C, 4 * C)
        self.latent = blocks(depth[2], 4 * C)
        self.up3_2 = Upsample(4 * C, 2 * C)
        self.reduce_chans_2 = nn.Conv2d(4 * C, 2 * C, kernel_size=1)
        self.decoder_level_2 = blocks(depth[3], 2 * C)
        self.up2_1 = Upsample(2 * C, C)
        self.reduce_chans_1 = nn.Conv2d(2 * C, C, kernel_size=1)
        self.decoder_level_1 = blocks(depth[4], C)
        self.output_layer = nn.Conv2d(C, C, kernel_size=3, padding=1)
        self.final_layer = FinalLayer(C, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform weights and zero biases everywhere; N(0, 0.02) for label tables and timestep MLPs; and
        adaLN-Zero: every modulation output layer and the final conv start at zero, so each block starts as the
        identity and the network as a zero predictor (DiT, Peebles & Xie 2023)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the stem as a linear layer on its flattened patch
        for level in (1, 2, 3):
            nn.init.normal_(getattr(self, f"y_embedder_{level}").embedding_table.weight, std=0.02)
            t_mlp = getattr(self, f"t_embedder_{level}").mlp
            nn.init.normal_(t_mlp[0].weight, std=0.02)
            nn.init.normal_(t_mlp[2].weight, std=0.02)
        for block in self.all_blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.conv.weight, self.final_layer.conv.bias):
            nn.init.zeros_(p)

    def all_blocks(self):
        return [*self.encoder_level_1, *self.encoder_level_2, *self.latent, *self.decoder_level_2,
                *self.decoder_level_1]

    def set_grad_checkpointing(self, enable: bool = True) -> FCDM:
        """Recompute each block in the backward instead of storing its activations (the official code always does)."""
        self.grad_checkpointing = enable
        return self

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return x

    def condition(self, t: torch.Tensor, y: torch.Tensor):
        """Per-level conditions c_l = t_emb_l + y_emb_l; (N,), (N,) -> three (N, W_l) tensors."""
        drop_per_level = self.training and self.label_dropout == "per_level"
        if self.training and self.label_dropout == "shared" and self.y_embedder_1.dropout_prob > 0:
            y = self.y_embedder_1.drop_labels(y)  # one draw for all levels
        return [getattr(self, f"t_embedder_{lv}")(t) + getattr(self, f"y_embedder_{lv}")(y, drop_per_level)
                for lv in (1, 2, 3)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) NCHW; t: (N,) timesteps; y: (N,) labels -> (N, out_channels, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"x height and width must be divisible by 4 (two 2x downsamplings), "
                             f"got {x.shape[2]}x{x.shape[3]}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        c1, c2, c3 = self.condition(t, y)

        enc1 = self._run_blocks(self.encoder_level_1, to_nhwc(self.x_embedder(x)), c1)  # (N, H, W, C)
        enc2 = self._run_blocks(self.encoder_level_2, self.down1_2(enc1), c2)           # (N, H/2, W/2, 2C)
        lat = self._run_blocks(self.latent, self.down2_3(enc2), c3)                      # (N, H/4, W/4, 4C)
        dec2 = _pointwise(self.reduce_chans_2, torch.cat([self.up3_2(lat), enc2], dim=-1))
        dec2 = self._run_blocks(self.decoder_level_2, dec2, c2)                          # (N, H/2, W/2, 2C)
        dec1 = _pointwise(self.reduce_chans_1, torch.cat([self.up2_1(dec2), enc1], dim=-1))
        dec1 = self._run_blocks(self.decoder_level_1, dec1, c1)                          # (N, H, W, C)
        out = to_nhwc(self.output_layer(to_nchw(dec1)))
        return self.final_layer(out, c1).contiguous()                                    # (N, out, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_all_channels: bool = False) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries null labels.

        The first half of x is duplicated (the second half is ignored), the batch runs once, and
        eps = uncond + cfg_scale * (cond - uncond) is written to both halves. As in the official code, guidance
        touches only the first 3 channels by default (needed to reproduce the paper's FIDs);
        guide_all_channels=True guides all in_channels (the standard form).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if guide_all_channels else 3
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)
