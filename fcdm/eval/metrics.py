"""Sample-quality metrics with the definitions of the ADM evaluator (guided-diffusion `evaluations/evaluator.py`).

Pure maths on feature arrays; nothing here knows about Inception or files. Definitions followed:
- FID / sFID: Frechet distance between Gaussians fitted to features (mean and `np.cov` with N-1), with the
  reference's treatment of a near-singular covariance product and of imaginary round-off in `sqrtm`.
- Inception Score: exp(E[KL(p(y|x) || p(y))]) per consecutive chunk of 5000 samples, averaged over chunks
  (10 chunks for the usual 50k samples).
- Precision / recall (Kynkaanniemi et al. 2019): a point is covered when its squared distance to some point of the
  other set is at most that point's squared distance to its k-th nearest neighbour (k=3, the point itself excluded).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

FID_METHODS = ("sqrtm", "eigh")


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of a feature set: everything FID compares."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)

    def frechet_distance(self, other: "FeatureStatistics", **kwargs) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, **kwargs)


def _check_features(features, name: str, min_rows: int = 1) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array, got shape {features.shape}")
    if features.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {features.shape[0]}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {features.dtype}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def feature_statistics(features) -> FeatureStatistics:
    """Mean and unbiased (N-1) covariance in float64, as `np.cov(rowvar=False)` in the reference."""
    features = _check_features(features, "features", min_rows=2).astype(np.float64)
    return FeatureStatistics(mu=features.mean(axis=0), sigma=np.cov(features, rowvar=False))


def _check_statistics(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    for name, mu, sigma in (("mu1/sigma1", mu1, sigma1), ("mu2/sigma2", mu2, sigma2)):
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{name}: expected mu of shape (D,) and sigma of shape (D, D), got {mu.shape} "
                             f"and {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 have different lengths: {mu1.shape} vs {mu2.shape}")
    return mu1, sigma1, mu2, sigma2


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr(sqrtm(sigma1 @ sigma2)) exactly as the reference computes it (general Schur-based sqrtm)."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # The product is (nearly) singular: the reference retries with eps on both diagonals.
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonal of both covariances",
                      RuntimeWarning, stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives a small imaginary part; a large one on the diagonal means the inputs are not covariances.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm(sigma1 @ sigma2) has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; are sigma1 and sigma2 covariance matrices?")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr(sqrtm(sigma1 @ sigma2)) = Tr(sqrtm(K)), K = B^T sigma2 B with sigma1 = V D V^T and B = V D^(1/2).

    K is similar to the nonzero block of sigma1^(1/2) sigma2 sigma1^(1/2), so two symmetric eigensolves give the exact
    value for symmetric PSD inputs, ~20x faster than a general sqrtm at D=2048; B keeps only the nonzero eigenvalues,
    so K is small when sigma1 has low rank (N < D). Eigenvalues below the round-off level (largest * D * machine
    epsilon) count as 0: the square root would otherwise turn noise around a zero eigenvalue into a visible error.
    """
    eigvals, eigvecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    eigvals = _drop_round_off(eigvals)
    keep = eigvals > 0
    basis = eigvecs[:, keep] * np.sqrt(eigvals[keep])  # (D, r)
    middle = basis.T @ sigma2 @ basis  # (r, r)
    return float(np.sqrt(_drop_round_off(np.linalg.eigvalsh((middle + middle.T) / 2))).sum())


def _drop_round_off(eigvals: np.ndarray) -> np.ndarray:
    floor = max(float(eigvals.max()), 0.0) * len(eigvals) * np.finfo(eigvals.dtype).eps
    return np.where(eigvals > floor, eigvals, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    method="sqrtm" is the reference computation (scipy.linalg.sqrtm, eps retry, imaginary-part check);
    method="eigh" is the same quantity via symmetric eigendecompositions (fast; for in-training FID).
    """
    if method not in FID_METHODS:
        raise ValueError(f"method must be one of {FID_METHODS}, got {method!r}")
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size: int = 5000) -> float:
    """Mean over consecutive chunks of `split_size` rows of exp(mean_x KL(p(y|x) || mean_x p(y|x))).

    `logits` (N, C) are the classifier's pre-softmax outputs (ADM: pool_3 @ W without the bias); log-probabilities
    work as well, since softmax ignores a per-row constant. Computed in float64 from log-softmax, so a confident
    prediction cannot turn 0 * log(0) into NaN.
    """
    logits = _check_features(logits, "logits")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    log_probs = torch.log_softmax(torch.from_numpy(logits.astype(np.float64)), dim=1)
    scores = []
    for start in range(0, log_probs.shape[0], split_size):
        part = log_probs[start:start + split_size]  # (n, C)
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log mean_x p(y|x), (C,)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))


def _pairwise_sq_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances via |u|^2 - 2 u.v + |v|^2, clamped at 0 like the reference. (R, C)"""
    row_norms = (rows * rows).sum(dim=1, keepdim=True)  # (R, 1)
    col_norms = (cols * cols).sum(dim=1).unsqueeze(0)  # (1, C)
    return (row_norms - 2 * rows @ cols.T + col_norms).clamp_min_(0)


def _to_device(features: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)


def manifold_radii(features, k: int = 3, batch_size: int = 10000, device="cpu") -> np.ndarray:
    """Squared distance of each row to its k-th nearest neighbour in the same set (itself excluded). (N,)"""
    features = _check_features(features, "features")
    if features.shape[0] < k + 1:
        raise ValueError(f"k={k} nearest neighbours need at least {k + 1} feature rows, got {features.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    points = _to_device(features, device)
    radii = []
    for row_start in range(0, len(points), batch_size):
        rows = points[row_start:row_start + batch_size]
        # Running k+1 smallest distances per row over column blocks; slot 0 is the row's distance to itself.
        nearest = torch.full((len(rows), 0), float("inf"), device=points.device)
        for col_start in range(0, len(points), batch_size):
            block = _pairwise_sq_distances(rows, points[col_start:col_start + batch_size])
            candidates = torch.cat([nearest, block], dim=1)
            nearest = torch.topk(candidates, min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii).cpu().numpy()


def precision_recall(ref_features, sample_features, k: int = 3, batch_size: int = 10000,
                     device="cpu") -> tuple[float, float]:
    """(precision, recall): the fraction of samples inside the reference manifold, and of references inside the
    sample manifold, each manifold being the union of balls reaching every point's k-th nearest neighbour."""
    ref_features = _check_features(ref_features, "ref_features")
    sample_features = _check_features(sample_features, "sample_features")
    if ref_features.shape[1] != sample_features.shape[1]:
        raise ValueError(f"ref_features and sample_features have different widths: {ref_features.shape[1]} vs "
                         f"{sample_features.shape[1]}")
    ref_radii = torch.from_numpy(manifold_radii(ref_features, k, batch_size, device)).to(device)
    sample_radii = torch.from_numpy(manifold_radii(sample_features, k, batch_size, device)).to(device)
    ref, samples = _to_device(ref_features, device), _to_device(sample_features, device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    for ref_start in range(0, len(ref), batch_size):
        ref_stop = ref_start + batch_size
        for sample_start in range(0, len(samples), batch_size):
            sample_stop = sample_start + batch_size
            dist = _pairwise_sq_distances(ref[ref_start:ref_stop], samples[sample_start:sample_stop])  # (R, S)
            sample_covered[sample_start:sample_stop] |= (dist <= ref_radii[ref_start:ref_stop, None]).any(dim=0)
            ref_covered[ref_start:ref_stop] |= (dist <= sample_radii[None, sample_start:sample_stop]).any(dim=1)
    return float(sample_covered.double().mean()), float(ref_covered.double().mean())
