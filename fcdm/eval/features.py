"""Inception-v3 features with the ADM evaluator's definitions, from torch-fidelity's port of the TF graph.

torch-fidelity's `FeatureExtractorInceptionV3` reproduces the 2015-12-05 TensorFlow Inception graph that ADM loads
(`classify_image_graph_def.pb`): TF1-style bilinear resize to 299, (x - 128) / 128, same weights. From it we read
- pool:    "2048", ADM's `pool_3:0` (FID, precision/recall),                                          (N, 2048)
- logits:  "logits_unbiased" = pool @ W^T without the bias, ADM's `softmax/logits/MatMul` (IS),         (N, 1008)
- spatial: ADM's `mixed_6/conv:0`[..., :7] flattened (sFID). torch-fidelity maps the TF block `mixed_6` to
  `Mixed_6d`, whose 1x1 branch `branch1x1` (conv -> BN -> ReLU, the TF node `mixed_6/conv`) we capture with a
  forward hook: first 7 of 192 channels at 17x17, flattened in TF's (H, W, C) order.          (N, 17*17*7 = 2023)

torch-fidelity's package `__init__` imports torchvision for its CLIP/VGG/DINOv2 extractors, but the Inception module
does not need it; when torchvision is missing or broken we import that one module without running the `__init__`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

POOL_DIM = 2048
LOGITS_DIM = 1008
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
WEIGHTS_URL_FALLBACK = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
_FEATURES = ("2048", "logits_unbiased")


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file is neither given nor in torch-fidelity's (torch.hub) cache."""


def _inception_module():
    """torch_fidelity.feature_extractor_inceptionv3, importable without torchvision."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError("fcdm.eval needs torch-fidelity for its Inception-v3 port: pip install --no-deps "
                          "torch-fidelity (torchvision is not needed for the Inception features)")
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except (ImportError, RuntimeError, OSError):
        pass  # torchvision absent, or built for another torch ("operator torchvision::nms does not exist")
    # Bind the package's directory without executing its __init__, import the torchvision-free submodule, then drop
    # the bare package so a later plain `import torch_fidelity` behaves exactly as before.
    package = importlib.util.module_from_spec(importlib.util.find_spec("torch_fidelity"))
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        if sys.modules.get("torch_fidelity") is package:
            del sys.modules["torch_fidelity"]


def weights_url() -> str:
    """Where torch-fidelity would download the weights from (we never download)."""
    try:
        return _inception_module().URL_INCEPTION_V3
    except ImportError:
        return WEIGHTS_URL_FALLBACK


def weights_filename() -> str:
    return os.path.basename(weights_url())


def default_weights_path() -> str:
    """torch-fidelity's cache location: torch.hub's checkpoint directory ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", weights_filename())


def resolve_weights_path(weights_path=None) -> str:
    """The weights file to load: the given path, else torch-fidelity's cached download; never the network."""
    if weights_path is not None:
        weights_path = os.fspath(weights_path)
        if not os.path.isfile(weights_path):
            raise ValueError(f"inception_weights: no such file: {weights_path}")
        return weights_path
    cached = default_weights_path()
    if os.path.isfile(cached):
        return cached
    raise InceptionWeightsMissing(
        f"Inception-v3 weights not found. fcdm.eval needs torch-fidelity's port of the TF Inception graph used by "
        f"the ADM evaluator: the file '{weights_filename()}' (about 96 MB), which torch-fidelity downloads from "
        f"{weights_url()} . This program never downloads. Fetch that file on a machine with network access and "
        f"either pass it with --inception-weights PATH or put it at {cached} (torch.hub's cache; set TORCH_HOME "
        f"to move it).")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_hash_prefix() -> str | None:
    """torch.hub convention: the file name ends in -<first hex digits of its sha256>.pth."""
    stem = os.path.splitext(weights_filename())[0]
    prefix = stem.rsplit("-", 1)[-1]
    return prefix if all(c in "0123456789abcdef" for c in prefix) and len(prefix) >= 6 else None


def _build_untrained_extractor():
    """torch-fidelity's Inception with its own weight loading skipped, so construction never touches the network."""
    module = _inception_module()

    class UntrainedInception(module.FeatureExtractorInceptionV3):
        """torch-fidelity's Inception-v3 whose constructor keeps the random initialisation."""

        _skip_next_load = True

        def load_state_dict(self, state_dict, *args, **kwargs):
            if UntrainedInception._skip_next_load:
                UntrainedInception._skip_next_load = False
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    # The constructor always loads something: hand it an empty state dict from a temporary file (never a URL).
    with tempfile.TemporaryDirectory() as tmp:
        placeholder = os.path.join(tmp, "empty.pth")
        torch.save({}, placeholder)
        return UntrainedInception("inception-v3-compat", list(_FEATURES), feature_extractor_weights_path=placeholder)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """He-normal convolutions and non-trivial BN statistics so random features neither vanish nor explode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Conv2d):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.copy_(0.1 * torch.randn(layer.running_mean.shape, generator=generator))
                layer.running_var.copy_(1 + 0.1 * torch.rand(layer.running_var.shape, generator=generator))
            elif isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features ** 0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))


@dataclass
class InceptionActivations:
    """Per-image Inception outputs used by the metrics."""

    pool: np.ndarray  # (N, 2048) float32, FID and precision/recall
    spatial: np.ndarray  # (N, 2023) float32, sFID
    logits: np.ndarray  # (N, 1008) float32, Inception Score


@contextmanager
def _no_tf32():
    """TF32 convolutions (cuDNN's default on Ampere+) would shift FID; the TF reference computes in full fp32."""
    try:
        legacy = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        legacy = None  # TF32 was chosen through the newer fp32_precision settings, which forbid reading these flags
    if legacy is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    else:
        settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        saved = [setting.fp32_precision for setting in settings]
        for setting in settings:
            setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy
        else:
            for setting, value in zip(settings, saved):
                setting.fp32_precision = value


class InceptionFeatureExtractor:
    """ADM's pool / spatial / logits features from uint8 NHWC images."""

    def __init__(self, weights_path=None, device=None, random_weights_seed: int | None = None):
        """Loads `weights_path` (else torch-fidelity's cache); `random_weights_seed` builds an untrained net (tests)."""
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if random_weights_seed is not None:
            self.weights_path, self.weights_sha256 = None, None
            self.model = _build_untrained_extractor()
            _randomise(self.model, random_weights_seed)
        else:
            self.weights_path = resolve_weights_path(weights_path)  # fails fast, before building the network
            self.weights_sha256 = sha256_of(self.weights_path)
            self.model = _build_untrained_extractor()
            self._load(self.weights_path)
        self.model.to(self.device).eval().requires_grad_(False)
        self._spatial = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._capture_spatial)

    def _load(self, path: str) -> None:
        expected = _expected_hash_prefix()
        if expected and not self.weights_sha256.startswith(expected):
            warnings.warn(f"{path}: sha256 {self.weights_sha256[:12]}... does not start with {expected}, the hash "
                          f"of torch-fidelity's '{weights_filename()}'; metrics will not match published numbers",
                          RuntimeWarning, stacklevel=3)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state_dict)
        except Exception as err:  # unpickling or key/shape mismatch: the file is not these weights
            raise ValueError(f"inception_weights: {path} is not a torch-fidelity Inception-v3 state dict "
                             f"('{weights_filename()}'): {err}") from err

    def _capture_spatial(self, module, inputs, output):
        # (N, 192, 17, 17) -> first 7 channels in TF's NHWC order, flattened. (N, 2023)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @torch.no_grad()
    def __call__(self, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pool (N, 2048), spatial (N, 2023), logits (N, 1008)) float32 on the extractor's device."""
        if isinstance(images, np.ndarray):
            # Batches streamed from an .npz are read-only views; torch wants writable memory.
            images = torch.from_numpy(images if images.flags.writeable else images.copy())
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        images = images.to(self.device).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W), the layout the port expects
        # Full fp32 even inside a caller's bf16 autocast region (a training step), as the TF reference computes.
        with torch.autocast(self.device.type, enabled=False), _no_tf32():
            pool, logits = self.model(images)
        spatial, self._spatial = self._spatial, None
        return pool, spatial, logits

    def activations(self, batches: Iterable[np.ndarray], progress: bool = False, total: int | None = None,
                    desc: str = "inception") -> InceptionActivations:
        """Run every batch and gather the features on the host."""
        pools, spatials, logits = [], [], []
        if progress:
            batches = tqdm(batches, total=total, desc=desc, unit="batch", file=sys.stderr)
        for batch in batches:
            pool, spatial, logit = self(batch)
            pools.append(pool.cpu().numpy())
            spatials.append(spatial.cpu().numpy())
            logits.append(logit.cpu().numpy())
        if not pools:
            raise ValueError("no images to compute Inception features of")
        return InceptionActivations(np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits))
