"""The FCDM model zoo. `FCDM_models[name](**official_kwargs)` builds a model, as in the official code."""
from __future__ import annotations

from .fcdm import FCDM, ConvNeXtBlock

# name -> (C, depths). S/B/L/XL are the paper's; T is a tiny demo config for CPU runs (not in the paper).
FCDM_CONFIGS = {
    "FCDM-T": (32, (1, 1, 2, 1, 1)),
    "FCDM-S": (128, (2, 4, 8, 4, 2)),
    "FCDM-B": (256, (2, 4, 8, 4, 2)),
    "FCDM-L": (512, (2, 4, 8, 4, 2)),
    "FCDM-XL": (512, (3, 6, 12, 6, 3)),
}


def _constructor(name: str):
    hidden_size, depth = FCDM_CONFIGS[name]

    def build(**kwargs) -> FCDM:
        return FCDM(**{"hidden_size": hidden_size, "depth": depth, **kwargs})  # a checkpoint may override both

    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"{name}: C={hidden_size}, depths={list(depth)}, mlp_ratio 3. Takes FCDM's keyword arguments."
    return build


FCDM_models = {name: _constructor(name) for name in FCDM_CONFIGS}
FCDM_T, FCDM_S, FCDM_B, FCDM_L, FCDM_XL = (FCDM_models[n] for n in FCDM_CONFIGS)

__all__ = ["FCDM", "ConvNeXtBlock", "FCDM_models", "FCDM_CONFIGS", "FCDM_T", "FCDM_S", "FCDM_B", "FCDM_L", "FCDM_XL"]
