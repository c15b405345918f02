"""Fixed weights and inputs behind the golden values in tests/data/official_golden.safetensors.

The golden outputs were computed once by the official FCDM code (tests/data/make_official_golden.py, which imports
it from a checkout outside this repository); the tests rebuild the same weights here and compare fcdm's modules.
Weights are not stored: each tensor is a pure function of its state-dict key and shape (a splitmix64 hash of the
key and the element index, mapped to [-1, 1)), so they come out the same on any machine and with any version of
torch or numpy, and every parameter is random and non-zero, including those FCDM initialises to zero (adaLN-Zero,
GRN, the final conv), so every path of the network carries signal.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

GOLDEN_FILE = Path(__file__).resolve().parent / "data" / "official_golden.safetensors"

# The tiny model: every level, block, embedder and the final layer, at widths 8, 16 and 32.
MODEL_CONFIG = dict(in_channels=4, hidden_size=8, depth=(1, 1, 1, 1, 1), mlp_ratio=3, class_dropout_prob=0.1,
                    num_classes=10, learn_sigma=True)
EMBED_WIDTH = 16     # the standalone timestep and label embedders
FINAL_WIDTH = 8      # the standalone final layer: hidden 8 -> 8 output channels
NUM_CLASSES = 10

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def pseudo_uniform(key: str, n: int) -> np.ndarray:
    """n values in [-1, 1), a fixed function of (key, index): splitmix64 with the key's CRC-32 as the stream."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(zlib.crc32(key.encode())) * np.uint64(1 << 32)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 52) - 1.0


def weight(key: str, shape) -> torch.Tensor:
    """An fp32 parameter for state-dict entry `key`: weight matrices and kernels at unit gain (uniform with variance
    1 / fan_in), every other tensor (biases, GRN gamma and beta) uniform in [-0.5, 0.5)."""
    shape = tuple(shape)
    n = int(np.prod(shape))
    u = pseudo_uniform(key, n)
    if key.endswith("weight") and len(shape) >= 2:
        u = u * (3.0 / (n // shape[0])) ** 0.5
    else:
        u = u * 0.5
    return torch.from_numpy(u.reshape(shape)).float()


def state_dict(prefix: str, shapes: dict) -> dict[str, torch.Tensor]:
    """A whole state dict from {key: shape}; `prefix` keeps the standalone modules' weights apart."""
    return {k: weight(prefix + k, s) for k, s in shapes.items()}


def inputs() -> dict[str, torch.Tensor]:
    """The inputs every golden output was computed from (also stored in the file, and checked against these)."""
    def uniform(key, *shape, scale=1.0):
        return torch.from_numpy(pseudo_uniform("input." + key, int(np.prod(shape))).reshape(shape) * scale).float()
    return {
        "t_embedder.t": torch.tensor([0.0, 1.5, 37.25, 999.0]),       # fractional steps too, as samplers use
        "y_embedder.labels": torch.tensor([0, 3, 9, NUM_CLASSES]),     # the last one the null (CFG) label
        "final_layer.x": uniform("final_layer.x", 2, FINAL_WIDTH, 4, 4, scale=2.0),  # NCHW
        "final_layer.c": uniform("final_layer.c", 2, FINAL_WIDTH),
        "model.x": uniform("model.x", 2, MODEL_CONFIG["in_channels"], 8, 8, scale=2.0),
        "model.t": torch.tensor([37.0, 815.5]),
        "model.y": torch.tensor([3, NUM_CLASSES]),                      # one conditional, one null label
    }


def load() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of the golden file; metadata["shapes"] maps module -> {official key: shape}."""
    from safetensors import safe_open
    tensors, metadata = {}, {}
    with safe_open(str(GOLDEN_FILE), framework="pt") as f:
        metadata = dict(f.metadata())
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    metadata["shapes"] = json.loads(metadata["shapes"])
    return tensors, metadata
