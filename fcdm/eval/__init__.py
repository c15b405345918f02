"""PyTorch evaluation with the ADM evaluator's definitions: IS, FID, sFID, precision and recall on .npz batches.

Command line: `python -m fcdm.eval --sample-batch samples.npz --ref-batch VIRTUAL_imagenet256_labeled.npz`.
See docs/evaluation.md.
"""
from fcdm.eval.metrics import (FeatureStatistics, feature_statistics, frechet_distance, inception_score,
                               manifold_radii, precision_recall)
from fcdm.eval.npz import NpzImages, read_statistics, save_batch

__all__ = [
    "FeatureStatistics", "feature_statistics", "frechet_distance", "inception_score", "manifold_radii",
    "precision_recall", "NpzImages", "read_statistics", "save_batch",
]
