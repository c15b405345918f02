"""Parameter and multiply-accumulate counts of an FCDM config, computed from the architecture.

The paper reports GMACs under the name "GFLOPs" (PAPER.md); `count_macs` returns MACs, and one training step costs
about 3x the forward FLOPs (2 FLOPs per MAC). Tests check these closed forms against torch's FlopCounterMode.
"""
from __future__ import annotations


def block_macs(width: int, pixels: int, mlp_ratio: float = 3) -> int:
    """One ConvNeXt block: depthwise 7x7, two pointwise convs, and its adaLN linear (per sample)."""
    hidden = int(width * mlp_ratio)
    return pixels * (49 * width + 2 * width * hidden) + width * 3 * width


def count_macs(hidden_size: int, depth, image_size: int, in_channels: int = 4, learn_sigma: bool = True,
               mlp_ratio: float = 3) -> int:
    """MACs of one forward pass for one sample at an image (latent) of image_size x image_size."""
    C = hidden_size
    out = 2 * in_channels if learn_sigma else in_channels
    p1, p2, p3 = image_size ** 2, (image_size // 2) ** 2, (image_size // 4) ** 2
    macs = sum(256 * w + w * w for w in (C, 2 * C, 4 * C))                    # timestep MLPs
    macs += p1 * 9 * in_channels * C                                          # stem
    macs += (depth[0] + depth[4]) * block_macs(C, p1, mlp_ratio)
    macs += (depth[1] + depth[3]) * block_macs(2 * C, p2, mlp_ratio)
    macs += depth[2] * block_macs(4 * C, p3, mlp_ratio)
    macs += p1 * 9 * C * (2 * C // 4) + p2 * 9 * (2 * C) * (4 * C // 4)      # down1_2, down2_3 (pre-unshuffle)
    macs += p3 * 9 * (4 * C) * (2 * C * 4) + p2 * 9 * (2 * C) * (C * 4)      # up3_2, up2_1 (pre-shuffle)
    macs += p2 * (4 * C) * (2 * C) + p1 * (2 * C) * C                         # reduce_chans_2, reduce_chans_1
    macs += p1 * 9 * C * C                                                    # output_layer
    macs += C * 2 * C + p1 * 9 * C * out                                      # final adaLN and conv
    return macs


def model_macs(model, image_size: int) -> int:
    """count_macs for a built FCDM (or NCHWFCDM) instance."""
    return count_macs(model.hidden_size, model.depth, image_size, model.in_channels,
                      model.out_channels != model.in_channels)


def train_flops_per_image(model, image_size: int) -> float:
    """Forward + backward FLOPs per image: 2 FLOPs per MAC, backward twice the forward."""
    return 3 * 2 * model_macs(model, image_size)
