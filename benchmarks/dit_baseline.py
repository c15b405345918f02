"""A DiT-XL/2-sized latent diffusion transformer, the baseline users compare FCDM with (Peebles & Xie, 2023).

Written here, from the paper's description, so the comparison runs in the same process as FCDM: patchify (conv with
stride p) -> fixed 2-D sin-cos positions -> N transformer blocks with adaLN-Zero conditioning and
`scaled_dot_product_attention` -> adaLN final layer -> unpatchify. It takes and returns what FCDM does
(x: (N, C, H, W), t, y -> (N, 2C, H, W) with learned sigma), so the benchmark's training step and sampler run both.
It reuses fcdm's timestep and label embedders; they are the same design in both papers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcdm.models.embeddings import LabelEmbedder, TimestepEmbedder

# name -> (depth, width, heads, patch). DiT-XL/2 is the paper's; DiT-T/2 is a CPU smoke config.
DIT_CONFIGS = {"DiT-XL/2": (28, 1152, 16, 2), "DiT-T/2": (2, 64, 4, 2)}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (N, D) conditions broadcast over the tokens of (N, T, D) x."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def sincos_positions(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding: half the channels encode the row, half the column. -> (grid^2, width)"""
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for 2-D sin-cos positions, got {width}")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos):  # (grid, grid) -> (grid^2, width / 2)
        angles = pos.reshape(-1, 1) * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-Zero produces shift, scale and gate for attention and the MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D); c: (N, D)
        N, T, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.qkv(modulate(self.norm1(x), shift1, scale1))
        q, k, v = qkv.view(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # each (N, heads, T, D/heads)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D)
        x = x + gate1[:, None] * self.proj(attn)
        mlp = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), shift2, scale2)), approximate="tanh"))
        return x + gate2[:, None] * mlp


class DiT(nn.Module):
    """Class-conditional latent diffusion transformer with adaLN-Zero blocks; FCDM's call signature."""

    def __init__(self, input_size: int = 32, patch: int = 2, in_channels: int = 4, width: int = 1152,
                 depth: int = 28, heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input_size {input_size} must be divisible by patch {patch}")
        self.input_size, self.patch, self.in_channels, self.width = input_size, patch, in_channels, width
        self.depth, self.heads, self.mlp_ratio = depth, heads, mlp_ratio
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_positions(width, input_size // patch)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width, class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_linear = nn.Linear(width, patch * patch * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier weights, zero biases; every adaLN output layer and the final linear start at zero (adaLN-Zero), so
        each block starts as the identity and the model as a zero predictor."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (*(b.adaLN_modulation[-1] for b in self.blocks), self.final_modulation[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W); t, y: (N,) -> (N, out_channels, H, W)."""
        N, _, H, W = x.shape
        if (H, W) != (self.input_size, self.input_size):
            raise ValueError(f"x must be {self.input_size}x{self.input_size}, got {H}x{W}")
        p, g = self.patch, H // self.patch
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed      # (N, T, D), T = (H/p)(W/p)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)                    # (N, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        out = self.final_linear(modulate(self.final_norm(tokens), shift, scale))      # (N, T, p*p*out)
        out = out.view(N, g, g, p, p, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(N, self.out_channels, H, W)       # unpatchify

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on all channels of eps; the second half of x is ignored (FCDM's convention)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


def build_dit(name: str, input_size: int, **kwargs) -> DiT:
    if name not in DIT_CONFIGS:
        raise ValueError(f"DiT config must be one of {sorted(DIT_CONFIGS)}, got {name!r}")
    depth, width, heads, patch = DIT_CONFIGS[name]
    return DiT(input_size=input_size, patch=patch, width=width, depth=depth, heads=heads, **kwargs)


def dit_macs(model: DiT) -> int:
    """Multiply-accumulates of one forward pass for one sample (linear layers and attention; norms left out)."""
    D, p = model.width, model.patch
    T = (model.input_size // p) ** 2
    hidden = int(D * model.mlp_ratio)
    per_block = T * (3 * D * D + D * D + 2 * D * hidden) + 2 * T * T * D + 6 * D * D  # qkv, proj, MLP, QK^T+AV, adaLN
    embed = T * p * p * model.in_channels * D + 256 * D + D * D                       # patchify, timestep MLP
    final = 2 * D * D + T * D * p * p * model.out_channels
    return model.depth * per_block + embed + final


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    with torch.device("meta"):  # sizes only; no memory
        m = build_dit("DiT-XL/2", 32)
    print(f"DiT-XL/2: {parameter_count(m) / 1e6:.1f} M parameters, {dit_macs(m) / 1e9:.1f} GMACs at 256px "
          f"(paper: 675 M, 118.6 Gflops)")
