"""FID, Inception Score and precision/recall against closed forms and brute-force definitions (fcdm.eval.metrics)."""
import numpy as np
import pytest

from fcdm.eval.metrics import (FID_METHODS, feature_statistics, frechet_distance, inception_score, manifold_radii,
                               precision_recall)


def random_orthogonal(dim, rng):
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def features_with_moments(mu, sigma, count, rng):
    """`count` rows whose sample mean and (N-1) covariance are exactly mu and sigma."""
    z = rng.standard_normal((count, len(mu)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return mu + z @ np.linalg.cholesky(sigma).T


# ---------------------------------------------------------------------------------------------------------------- FID

@pytest.mark.parametrize("method", FID_METHODS)
def test_fid_of_a_set_against_itself_is_zero(method):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) + 3.0
    stats = feature_statistics(features)
    fid = stats.frechet_distance(stats, method=method)
    assert np.isfinite(fid)
    assert abs(fid) < 1e-9 * np.trace(stats.sigma)


@pytest.mark.parametrize("method", FID_METHODS)
def test_fid_of_gaussian_feature_sets_matches_closed_form(method):
    # Covariances sharing eigenvectors commute, so (sigma1 sigma2)^(1/2) = Q diag(sqrt(a b)) Q^T exactly.
    rng = np.random.default_rng(2)
    dim = 19  # prime, not a power of two
    q = random_orthogonal(dim, rng)
    a, b = rng.uniform(0.1, 4.0, dim), rng.uniform(0.1, 4.0, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    features1 = features_with_moments(mu1, q @ np.diag(a) @ q.T, 97, rng)
    features2 = features_with_moments(mu2, q @ np.diag(b) @ q.T, 61, rng)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))

    fid = feature_statistics(features1).frechet_distance(feature_statistics(features2), method=method)
    np.testing.assert_allclose(fid, expected, rtol=1e-8)


@pytest.mark.parametrize("method", FID_METHODS)
def test_fid_diagonal_covariances_closed_form(method):
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.5, 2.0, 11), rng.uniform(0.5, 2.0, 11)
    mu1, mu2 = rng.standard_normal(11), rng.standard_normal(11)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method), expected, rtol=1e-10)


def test_fid_methods_agree_on_non_commuting_covariances():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((200, 33)), rng.standard_normal((150, 33)) @ rng.standard_normal((33, 33))
    s1, s2 = feature_statistics(x), feature_statistics(y)
    reference = s1.frechet_distance(s2, method="sqrtm")
    assert reference > 1.0
    np.testing.assert_allclose(s1.frechet_distance(s2, method="eigh"), reference, rtol=1e-8)
    np.testing.assert_allclose(s2.frechet_distance(s1, method="sqrtm"), reference, rtol=1e-8)


def test_fid_methods_agree_on_rank_deficient_covariances():
    # Fewer samples than dimensions (as in short in-training evaluations): both covariances are singular.
    rng = np.random.default_rng(16)
    s1 = feature_statistics(rng.standard_normal((10, 40)))
    s2 = feature_statistics(rng.standard_normal((12, 40)) + 0.3)
    reference = s1.frechet_distance(s2, method="sqrtm")
    np.testing.assert_allclose(s1.frechet_distance(s2, method="eigh"), reference, rtol=1e-6)
    np.testing.assert_allclose(s2.frechet_distance(s1, method="eigh"), reference, rtol=1e-6)


def test_fid_singular_product_retries_with_eps_like_the_reference():
    # [[0, 1], [0, 0]] has no square root: scipy returns inf, the reference adds eps to both diagonals and retries.
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
    with pytest.warns(RuntimeWarning, match="singular"):
        fid = frechet_distance(mu1, np.array([[0.0, 1.0], [0.0, 0.0]]), mu2, np.eye(2), eps=1e-6)
    assert np.isfinite(fid)


def test_fid_large_imaginary_component_raises():
    # A "covariance" with a negative eigenvalue makes sqrtm genuinely complex: the reference refuses it.
    rng = np.random.default_rng(6)
    mu = rng.standard_normal(2)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))


@pytest.mark.parametrize("bad, match", [
    (dict(mu2=np.zeros(4), sigma2=np.eye(4)), "different lengths"),
    (dict(mu2=np.zeros(4)), "mu2/sigma2"),
    (dict(sigma1=np.eye(4)), "sigma"),
    (dict(mu1=np.array([np.nan, 0.0, 0.0])), "NaN"),
    (dict(method="svd"), "method"),
])
def test_fid_rejects_bad_input(bad, match):
    args = dict(mu1=np.ones(3), sigma1=np.eye(3), mu2=np.zeros(3), sigma2=2 * np.eye(3))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        frechet_distance(**args)


def test_feature_statistics_rejects_bad_features():
    with pytest.raises(ValueError, match="2-D"):
        feature_statistics(np.ones(5))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.ones((1, 5)))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((3, 2), np.nan))


# ----------------------------------------------------------------------------------------------------- Inception Score

def test_inception_score_of_uniform_classifier_is_one():
    rng = np.random.default_rng(7)
    logits = np.repeat(rng.standard_normal((40, 1)), 13, axis=1)  # a different constant per row: uniform softmax
    np.testing.assert_allclose(inception_score(logits), 1.0, rtol=1e-12)


def test_inception_score_of_confident_balanced_classifier_is_number_of_classes():
    rng = np.random.default_rng(8)
    classes, per_class = 7, 6
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    logits = rng.normal(0, 0.1, (classes * per_class, classes))
    logits[np.arange(len(labels)), labels] += 200.0  # exp(-200) underflows in float32 softmax: must not give NaN
    np.testing.assert_allclose(inception_score(logits), classes, rtol=1e-9)


def test_inception_score_averages_consecutive_chunks_like_adm():
    # Chunk 1: every sample confidently class 0 (IS 1). Chunk 2: balanced over 4 classes (IS 4). Mean: 2.5.
    chunk1 = np.zeros((8, 5))
    chunk1[:, 0] = 100.0
    chunk2 = np.zeros((8, 5))
    chunk2[np.arange(8), np.arange(8) % 4 + 1] = 100.0
    logits = np.concatenate([chunk1, chunk2]) + np.random.default_rng(9).normal(0, 1e-3, (16, 5))
    np.testing.assert_allclose(inception_score(logits, split_size=8), 2.5, rtol=1e-6)
    assert inception_score(logits, split_size=16) > 2.5  # one chunk sees 5 classes


def test_inception_score_matches_probability_formula():
    # Independent restatement of ADM's formula on softmax probabilities, 3 chunks (last one short).
    rng = np.random.default_rng(10)
    logits = rng.normal(0, 2.0, (50, 9))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, 50, 20):
        part = probs[start:start + 20]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(axis=0))), axis=1))))
    np.testing.assert_allclose(inception_score(logits, split_size=20), np.mean(scores), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- precision and recall

def brute_force_radii(features, k):
    dist = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    return np.sort(dist, axis=1)[:, k]


def test_manifold_radii_match_brute_force_across_batches():
    rng = np.random.default_rng(11)
    features = rng.standard_normal((53, 6)).astype(np.float32)
    expected = brute_force_radii(features.astype(np.float64), 3)
    for batch_size in (7, 1000):  # 7: uneven row and column blocks; 1000: a single block
        np.testing.assert_allclose(manifold_radii(features, k=3, batch_size=batch_size), expected, rtol=1e-4)


def rigid_motion(dim, rng):
    """A random rotation and translation from 2-D into `dim` dimensions: distances, so the answers, are unchanged."""
    basis, offset = random_orthogonal(dim, rng)[:, :2], rng.standard_normal(dim)
    return lambda points_2d: (points_2d @ basis.T + offset).astype(np.float32)


def test_precision_recall_on_point_clouds_with_known_overlap():
    # Reference: a 10x10 lattice, spacing 1. Samples: its left half (columns 0-4) shifted by (0.1, 0.13), plus an
    # equally large copy 1000 units away. Every near sample sits inside a reference ball (precision 50/100); the
    # reference columns 0-5 are within a sample's 3-NN radius (1), columns 6-9 are >= 1.9 away (recall 60/100).
    rng = np.random.default_rng(12)
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0), indexing="ij"), -1).reshape(-1, 2)
    left = grid[grid[:, 0] < 5] + np.array([0.1, 0.13])
    samples_2d = np.concatenate([left, left + 1000.0])
    move = rigid_motion(9, rng)
    ref, samples = move(grid), move(samples_2d)
    for batch_size in (17, 10000):
        precision, recall = precision_recall(ref, samples, k=3, batch_size=batch_size)
        assert precision == pytest.approx(0.5, abs=1e-12)
        assert recall == pytest.approx(0.6, abs=1e-12)


def test_precision_recall_of_identical_sets_is_one_and_disjoint_sets_zero():
    rng = np.random.default_rng(13)
    features = rng.standard_normal((40, 8)).astype(np.float32)
    assert precision_recall(features, features, batch_size=9) == (1.0, 1.0)
    assert precision_recall(features, features + 100.0, batch_size=9) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_definition():
    rng = np.random.default_rng(14)
    ref = rng.standard_normal((45, 5)).astype(np.float32)
    samples = (rng.standard_normal((38, 5)) * 1.3 + 0.4).astype(np.float32)
    ref64, samples64 = ref.astype(np.float64), samples.astype(np.float64)
    dist = ((ref64[:, None] - samples64[None]) ** 2).sum(-1)  # (R, S)
    expected_precision = np.mean((dist <= brute_force_radii(ref64, 3)[:, None]).any(axis=0))
    expected_recall = np.mean((dist <= brute_force_radii(samples64, 3)[None, :]).any(axis=1))
    assert 0 < expected_precision < 1 and 0 < expected_recall < 1
    precision, recall = precision_recall(ref, samples, batch_size=11)
    assert precision == pytest.approx(expected_precision)
    assert recall == pytest.approx(expected_recall)


def test_precision_recall_rejects_bad_input():
    rng = np.random.default_rng(15)
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(rng.standard_normal((3, 4)), rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match="different widths"):
        precision_recall(rng.standard_normal((10, 4)), rng.standard_normal((10, 5)))
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(np.full((10, 4), np.nan), rng.standard_normal((10, 4)))
