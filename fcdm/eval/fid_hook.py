"""In-training FID: generate N images with a callback, compare their Inception pool features to a reference .npz.

The trainer builds one `InTrainingFID` and calls it every `--eval-every` steps; with several processes each one
generates its share of the chunks (`chunks`, `chunk_features`) and the features are gathered for `distance`:

    fid_eval = InTrainingFID("VIRTUAL_imagenet256_labeled.npz", num_images=10_000, batch_size=125)
    fid = fid_eval(lambda n: sample_uint8_nhwc(ema_model, n))   # -> float

The constructor checks the Inception weights file and the reference file at once; the reference statistics
(precomputed mu/sigma, else computed once from arr_0) and the Inception network are loaded on the first call and kept.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fcdm.eval.features import InceptionFeatureExtractor, resolve_weights_path
from fcdm.eval.metrics import FeatureStatistics, feature_statistics, frechet_distance
from fcdm.eval.npz import IMAGES_KEY, NpzImages, npz_keys, read_statistics

GenerateFn = Callable[[int], "np.ndarray | torch.Tensor"]


class InTrainingFID:
    """FID of freshly generated images against a fixed reference batch, for periodic evaluation in training."""

    def __init__(self, ref_batch, num_images: int = 10_000, batch_size: int = 100, device=None,
                 inception_weights=None, fid_method: str = "eigh",
                 extractor: InceptionFeatureExtractor | None = None, name: str = "ref_batch"):
        """`fid_method="eigh"` is the exact FID via symmetric eigensolves (seconds instead of a minute at D=2048);
        `name` is how error messages call the reference file (e.g. a CLI flag)."""
        if num_images < 2:
            raise ValueError(f"num_images must be >= 2 (a covariance needs two samples), got {num_images}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.ref_batch, self.name = ref_batch, name
        self.num_images = num_images
        self.batch_size = batch_size
        self.fid_method = fid_method
        self._device = device
        self._inception_weights = inception_weights
        self._extractor = extractor
        self._reference: FeatureStatistics | None = None
        # Fail now, not hours into training, on missing weights or a reference file that cannot work.
        if extractor is None:
            resolve_weights_path(inception_weights)
        keys = npz_keys(ref_batch, name)
        if read_statistics(ref_batch, name)["pool"] is None and IMAGES_KEY not in keys:
            raise ValueError(f"{name}: {ref_batch} has neither mu/sigma nor images ('{IMAGES_KEY}')")

    @property
    def extractor(self) -> InceptionFeatureExtractor:
        if self._extractor is None:
            self._extractor = InceptionFeatureExtractor(self._inception_weights, device=self._device)
        return self._extractor

    @property
    def reference(self) -> FeatureStatistics:
        """Pool-feature statistics of the reference batch: precomputed if stored, else from its images."""
        if self._reference is None:
            stats = read_statistics(self.ref_batch, self.name)["pool"]
            if stats is None:
                images = NpzImages(self.ref_batch, self.name)
                stats = feature_statistics(self.extractor.activations(images.batches(self.batch_size)).pool)
            self._reference = stats
        return self._reference

    def chunks(self) -> list[tuple[int, int]]:
        """(first image index, count) of each generation call: num_images in batch_size pieces."""
        return [(start, min(self.batch_size, self.num_images - start))
                for start in range(0, self.num_images, self.batch_size)]

    def chunk_features(self, chunks, generate_fn: Callable[[int, int], "np.ndarray | torch.Tensor"]) -> np.ndarray:
        """Pool features of the images `generate_fn(start, count) -> uint8 (count, H, W, 3)` makes for each chunk,
        in order: a process's share of a split evaluation. (sum of counts, 2048)"""
        pools = []
        for start, count in chunks:
            images = generate_fn(start, count)
            if tuple(images.shape[:1]) != (count,):
                raise ValueError(f"generate_fn({count}) returned {tuple(images.shape)}: expected {count} images of "
                                 f"shape (H, W, 3), dtype uint8")
            pools.append(self.extractor(images)[0].cpu().numpy())
        return np.concatenate(pools) if pools else np.zeros((0, 2048), dtype=np.float32)

    def generated_features(self, generate_fn: GenerateFn) -> np.ndarray:
        """Pool features of `num_images` images from `generate_fn(n) -> uint8 (n, H, W, 3)`. (num_images, 2048)"""
        return self.chunk_features(self.chunks(), lambda start, count: generate_fn(count))

    def distance(self, features: np.ndarray) -> float:
        """FID of generated pool features (num_images, D) against the reference statistics."""
        reference = self.reference
        sample = feature_statistics(features)
        if sample.mu.shape != reference.mu.shape:
            raise ValueError(f"{self.name}: mu has dimension {reference.mu.shape[0]}, the Inception pool features "
                             f"{sample.mu.shape[0]}")
        return frechet_distance(sample.mu, sample.sigma, reference.mu, reference.sigma, method=self.fid_method)

    def __call__(self, generate_fn: GenerateFn) -> float:
        self.reference  # a broken reference file fails before any image is generated
        return self.distance(self.generated_features(generate_fn))
