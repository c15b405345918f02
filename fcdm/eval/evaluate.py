"""Evaluate a sample batch against a reference batch: the ADM evaluator's five numbers from two .npz files."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from fcdm.eval.features import POOL_DIM, SPATIAL_DIM, InceptionActivations, InceptionFeatureExtractor
from fcdm.eval.metrics import FeatureStatistics, feature_statistics, inception_score, precision_recall
from fcdm.eval.npz import IMAGES_KEY, NpzImages, npz_keys, read_statistics

NEAREST_NEIGHBOURS = 3  # ADM's ManifoldEstimator nhood_sizes=(3,)
MIN_IMAGES = NEAREST_NEIGHBOURS + 1


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _activations(images: NpzImages, extractor: InceptionFeatureExtractor, batch_size: int, progress: bool,
                 desc: str) -> InceptionActivations:
    total = -(-len(images) // batch_size)
    return extractor.activations(images.batches(batch_size), progress=progress, total=total, desc=desc)


def _statistics(precomputed: FeatureStatistics | None, features, dim: int, keys: str,
                name: str) -> tuple[FeatureStatistics, str]:
    """Precomputed statistics win over computed ones, as in the ADM evaluator."""
    if precomputed is not None:
        if precomputed.mu.shape != (dim,):
            raise ValueError(f"{name}: precomputed {keys} have dimension {precomputed.mu.shape[0]}; the Inception "
                             f"features here have {dim}")
        return precomputed, "precomputed"
    return feature_statistics(features), "computed"


@dataclass
class EvaluationInputs:
    """Both batches, opened and validated; nothing heavy has been read yet."""

    samples: NpzImages
    sample_stats: dict
    ref_images: NpzImages | None
    ref_stats: dict


def open_inputs(sample_batch, ref_batch) -> EvaluationInputs:
    """Validate the two ADM .npz files before any network is built.

    The sample batch must hold images (`arr_0`). The reference batch needs `arr_0` for precision/recall; with only
    `mu`/`sigma`/`mu_s`/`sigma_s` it still gives FID and sFID, and precision/recall are reported as None.
    """
    samples = NpzImages(sample_batch, "--sample-batch")
    if len(samples) < MIN_IMAGES:
        raise ValueError(f"--sample-batch: {len(samples)} images; the metrics need at least {MIN_IMAGES} "
                         f"(precision/recall use k={NEAREST_NEIGHBOURS} nearest neighbours)")
    ref_stats = read_statistics(ref_batch, "--ref-batch")
    ref_images = NpzImages(ref_batch, "--ref-batch") if IMAGES_KEY in npz_keys(ref_batch, "--ref-batch") else None
    if ref_images is None and (ref_stats["pool"] is None or ref_stats["spatial"] is None):
        raise ValueError(f"--ref-batch: {ref_batch} has neither images ('{IMAGES_KEY}') nor both statistics pairs "
                         f"(mu, sigma) and (mu_s, sigma_s)")
    if ref_images is not None and len(ref_images) < MIN_IMAGES:
        raise ValueError(f"--ref-batch: {len(ref_images)} images; precision/recall need at least {MIN_IMAGES}")
    return EvaluationInputs(samples, read_statistics(sample_batch, "--sample-batch"), ref_images, ref_stats)


def evaluate(inputs: EvaluationInputs, extractor: InceptionFeatureExtractor, batch_size: int = 64,
             fid_method: str = "sqrtm", progress: bool = False) -> dict:
    """IS, FID, sFID, precision and recall of the sample batch against the reference batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples, ref_images, ref_stats, sample_stats = (inputs.samples, inputs.ref_images, inputs.ref_stats,
                                                    inputs.sample_stats)
    ref_acts = None
    if ref_images is not None:
        _log(f"reference batch: {len(ref_images)} images of {ref_images.shape[1:3]}")
        ref_acts = _activations(ref_images, extractor, batch_size, progress, "reference")
    _log(f"sample batch: {len(samples)} images of {samples.shape[1:3]}")
    sample_acts = _activations(samples, extractor, batch_size, progress, "samples")

    stats, sources = {}, {}
    for kind, dim, keys in (("pool", POOL_DIM, "mu/sigma"), ("spatial", SPATIAL_DIM, "mu_s/sigma_s")):
        stats["sample", kind], sources["sample", kind] = _statistics(
            sample_stats[kind], getattr(sample_acts, kind), dim, keys, "--sample-batch")
        stats["ref", kind], sources["ref", kind] = _statistics(
            ref_stats[kind], getattr(ref_acts, kind) if ref_acts is not None else None, dim, keys, "--ref-batch")

    _log("computing metrics")
    result = {
        "inception_score": inception_score(sample_acts.logits),
        "fid": stats["sample", "pool"].frechet_distance(stats["ref", "pool"], method=fid_method),
        "sfid": stats["sample", "spatial"].frechet_distance(stats["ref", "spatial"], method=fid_method),
        "precision": None,
        "recall": None,
    }
    if ref_acts is not None:
        result["precision"], result["recall"] = precision_recall(
            ref_acts.pool, sample_acts.pool, k=NEAREST_NEIGHBOURS, device=extractor.device)
    result.update({
        "num_samples": len(samples),
        "num_reference_images": len(ref_images) if ref_images is not None else 0,
        "statistics_source": {f"{owner}_{kind}": source for (owner, kind), source in sources.items()},
        "fid_method": fid_method,
        "inception_weights": extractor.weights_path,
        "inception_weights_sha256": extractor.weights_sha256,
    })
    return result
