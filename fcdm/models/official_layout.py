"""FCDM written module by module in NCHW, the way the official code lays it out.

This is an independent oracle, not the model users run: tests check that the channels-last, fused-op `FCDM` equals
it in fp64, and benchmarks use it as the "official code" baseline (eager NCHW). Its state_dict has exactly the
official keys, so `FCDM.load_state_dict(NCHWFCDM(...).state_dict(), strict=True)` is the strict-loading test.
It shares only the embedders with `FCDM` (they have no layout).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import LabelEmbedder, TimestepEmbedder


def _layer_norm_over_channels(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over dim 1 of an NCHW tensor, no affine, eps 1e-6 (the official LayerNorm2d)."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)


class NCHWGRN(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x):
        g = torch.norm(x, p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class NCHWBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 3):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1)
        self.grn = NCHWGRN(hidden)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x, c):
        h = self.dwconv(x)
        shift, scale, gate = self.adaLN_modulation(c)[:, :, None, None].chunk(3, dim=1)
        h = torch.addcmul(shift, _layer_norm_over_channels(h), scale + 1)
        h = self.pwconv2(self.grn(F.gelu(self.pwconv1(h))))
        return x + h * gate


class NCHWFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.conv = nn.Conv2d(hidden_size, out_channels, 3, padding=1)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, :, None, None].chunk(2, dim=1)
        return self.conv(_layer_norm_over_channels(x) * (1 + scale) + shift)


class NCHWResample(nn.Module):
    """Conv3x3 (no bias) then PixelUnshuffle(2) (down) or PixelShuffle(2) (up); the official key is `conv.0`."""

    def __init__(self, in_ch: int, out_ch: int, down: bool):
        super().__init__()
        mid = out_ch // 4 if down else out_ch * 4
        shuffle = nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2)
        self.conv = nn.Sequential(nn.Conv2d(in_ch, mid, 3, padding=1, bias=False), shuffle)

    def forward(self, x):
        return self.conv(x)


class NCHWFCDM(nn.Module):
    """The FCDM architecture in plain NCHW modules; same keys and maths as `fcdm.FCDM`."""

    def __init__(self, in_channels=4, hidden_size=512, depth=(2, 4, 8, 4, 2), mlp_ratio=3, class_dropout_prob=0.1,
                 num_classes=1000, learn_sigma=True, grad_checkpointing=False):
        super().__init__()
        C = hidden_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grad_checkpointing = grad_checkpointing
        for level, width in ((1, C), (2, 2 * C), (3, 4 * C)):
            self.add_module(f"t_embedder_{level}", TimestepEmbedder(width))
            self.add_module(f"y_embedder_{level}", LabelEmbedder(num_classes, width, class_dropout_prob))
        self.x_embedder = nn.Conv2d(in_channels, C, 3, padding=1)
        self.encoder_level_1 = nn.ModuleList(NCHWBlock(C, mlp_ratio) for _ in range(depth[0]))
        self.down1_2 = NCHWResample(C, 2 * C, down=True)
        self.encoder_level_2 = nn.ModuleList(NCHWBlock(2 * C, mlp_ratio) for _ in range(depth[1]))
        self.down2_3 = NCHWResample(2 * C, 4 * C, down=True)
        self.latent = nn.ModuleList(NCHWBlock(4 * C, mlp_ratio) for _ in range(depth[2]))
        self.up3_2 = NCHWResample(4 * C, 2 * C, down=False)
        self.reduce_chans_2 = nn.Conv2d(4 * C, 2 * C, 1)
        self.decoder_level_2 = nn.ModuleList(NCHWBlock(2 * C, mlp_ratio) for _ in range(depth[3]))
        self.up2_1 = NCHWResample(2 * C, C, down=False)
        self.reduce_chans_1 = nn.Conv2d(2 * C, C, 1)
        self.decoder_level_1 = nn.ModuleList(NCHWBlock(C, mlp_ratio) for _ in range(depth[4]))
        self.output_layer = nn.Conv2d(C, C, 3, padding=1)
        self.final_layer = NCHWFinalLayer(C, self.out_channels)

    def _blocks(self, blocks, x, c):
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return x

    def forward(self, x, t, y):
        c1, c2, c3 = (getattr(self, f"t_embedder_{lv}")(t) + getattr(self, f"y_embedder_{lv}")(y, self.training)
                      for lv in (1, 2, 3))
        e1 = self._blocks(self.encoder_level_1, self.x_embedder(x), c1)
        e2 = self._blocks(self.encoder_level_2, self.down1_2(e1), c2)
        lat = self._blocks(self.latent, self.down2_3(e2), c3)
        d2 = self._blocks(self.decoder_level_2, self.reduce_chans_2(torch.cat([self.up3_2(lat), e2], 1)), c2)
        d1 = self._blocks(self.decoder_level_1, self.reduce_chans_1(torch.cat([self.up2_1(d2), e1], 1)), c1)
        return self.final_layer(self.output_layer(d1), c1)
