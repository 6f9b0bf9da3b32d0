"""FID, KID and MMD against independent implementations (MONAI, scipy, scikit-learn), the streaming
accumulator against the in-memory statistics, and the bootstrap's determinism."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from med3d_hub.inference import metrics

RTOL = 1e-6


def correlated(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Gaussian features with a full, random covariance (float32, as networks give them)."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return ((rng.standard_normal((n, dim)) @ mixing) * scale + shift + rng.standard_normal(dim) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def sets():
    return correlated(400, 48, seed=1), correlated(350, 48, seed=2, shift=0.3, scale=1.2)


def test_metrics_import_as_documented():
    """`from med3d_hub import metrics` (docs/metrics.md, the module's docstring) is the inference module."""
    from med3d_hub import metrics as documented

    assert documented is metrics and "from med3d_hub import metrics" in metrics.__doc__
    a, b = correlated(60, 4, seed=3), correlated(60, 4, seed=4, shift=1.0)
    assert documented.fid(a, b) == metrics.fid(a, b) > 1.0


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula: scipy's sqrtm of the covariance product."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_fid_equals_monai_and_scipy(sets):
    torch = pytest.importorskip("torch")
    monai_fid = pytest.importorskip("monai.metrics.fid")
    a, b = sets
    ours = metrics.fid(a, b)
    monai = float(monai_fid.FIDMetric()(torch.from_numpy(b), torch.from_numpy(a)))
    assert ours > 1.0
    assert ours == pytest.approx(monai, rel=RTOL)
    assert ours == pytest.approx(scipy_fid(a, b), rel=RTOL)
    assert metrics.fid(b, a) == pytest.approx(ours, rel=1e-9)  # symmetric


def test_fid_of_close_sets_is_small_and_never_negative(sets):
    a, _ = sets
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-9)
    near = correlated(400, 48, seed=1) + np.float32(1e-3)
    assert 0.0 <= metrics.fid(a, near) < 1e-4


def test_streaming_equals_in_memory(sets):
    a, b = sets
    stats = metrics.MeanCovariance()
    for start, stop in [(0, 1), (1, 7), (7, 150), (150, 151), (151, 400)]:  # uneven batches, a batch of one
        stats.update(a[start:stop])
    assert stats.n == len(a)
    np.testing.assert_allclose(stats.mean, a.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    other = metrics.MeanCovariance().update(b[:100]).merge(metrics.MeanCovariance().update(b[100:]))
    assert metrics.fid(stats, other) == pytest.approx(metrics.fid(a, b), rel=1e-10)
    features = b.astype(np.float64)
    kept = features.copy()
    metrics.MeanCovariance.of(features)
    np.testing.assert_array_equal(features, kept)  # the statistics are taken from a copy, never in place


def test_streaming_is_stable_far_from_the_origin():
    """Features with a large common offset: sum(x x^T) - n mu mu^T would cancel to noise; the merge does not."""
    x = correlated(300, 16, seed=3).astype(np.float64) + 1e6
    stats = metrics.MeanCovariance()
    for batch in np.array_split(x, 10):
        stats.update(batch)
    np.testing.assert_allclose(stats.covariance, np.cov(x - 1e6, rowvar=False), rtol=1e-6, atol=1e-8)


def test_singular_covariance_warns_and_bad_input_is_refused():
    few = correlated(20, 48, seed=4)
    more = correlated(200, 48, seed=5)
    with pytest.warns(metrics.SingularCovarianceWarning, match="20 volumes for 48 feature dimensions"):
        value = metrics.fid(few, more)
    assert np.isfinite(value) and value > 0
    constant = more.copy()
    constant[:, 0] = 1.0  # a dead channel: singular, but harmless, so no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.fid(constant, correlated(200, 48, seed=6)) > 0
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fid(few[:1], more)
    bad = more.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.fid(bad, more)
    with pytest.raises(ValueError, match="feature dimension"):
        metrics.fid(more, more[:, :40])


def test_mmd_linear_equals_monai(sets):
    torch = pytest.importorskip("torch")
    monai_mmd = pytest.importorskip("monai.metrics.mmd")
    a, b = sets[0][:300], sets[1][:300]  # MONAI wants equal sizes
    monai = float(monai_mmd.MMDMetric()(torch.from_numpy(a).double(), torch.from_numpy(b).double()))
    assert metrics.mmd(a, b, "linear") == pytest.approx(monai, rel=RTOL)


def unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = len(kxx), len(kyy)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_mmd_rbf_and_median_bandwidth_equal_scikit_learn_and_scipy(sets):
    pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    distance = pytest.importorskip("scipy.spatial.distance")
    a, b = (s.astype(np.float64) for s in sets)
    sigma = metrics.median_bandwidth(a, b)
    assert sigma == pytest.approx(np.median(distance.pdist(np.concatenate([a, b]))), rel=1e-9)
    gamma = 1 / (2 * sigma**2)
    expected = unbiased(pairwise.rbf_kernel(a, a, gamma=gamma), pairwise.rbf_kernel(b, b, gamma=gamma),
                        pairwise.rbf_kernel(a, b, gamma=gamma))
    assert metrics.mmd(a, b, "rbf") == pytest.approx(expected, rel=RTOL)
    assert metrics.mmd(a, b, "rbf", block=7) == pytest.approx(expected, rel=RTOL)  # blocks change nothing
    assert metrics.mmd(a, b, "rbf", bandwidth=2 * sigma) != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="unknown kernel"):
        metrics.mmd(a, b, "laplace")


def test_kid_equals_scikit_learn_and_is_deterministic(sets):
    pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    a, b = (s.astype(np.float64) for s in sets)
    a, b = a[:300], b[:300]
    poly = dict(degree=3, gamma=1 / a.shape[1], coef0=1)
    full = unbiased(pairwise.polynomial_kernel(a, a, **poly), pairwise.polynomial_kernel(b, b, **poly),
                    pairwise.polynomial_kernel(a, b, **poly))
    whole = metrics.kid(a, b, subset_size=300)
    assert whole.mean == pytest.approx(full, rel=RTOL) and whole.std == 0.0 and whole.subsets == 1

    one = metrics.kid(a, b, subsets=20, subset_size=100, seed=3)
    assert one == metrics.kid(a, b, subsets=20, subset_size=100, seed=3)
    assert one != metrics.kid(a, b, subsets=20, subset_size=100, seed=4)
    assert one.std > 0 and abs(one.mean - full) < 4 * one.std
    # each subset is an unbiased MMD^2 of the polynomial kernel: draw the same subsets by hand
    rng = np.random.default_rng(3)
    by_hand = []
    for _ in range(20):
        xs, ys = a[rng.choice(300, 100, replace=False)], b[rng.choice(300, 100, replace=False)]
        by_hand.append(metrics.mmd(xs, ys, "polynomial"))
    assert one.mean == pytest.approx(np.mean(by_hand), rel=1e-12)


def test_bootstrap_is_deterministic_under_a_seed(sets):
    a, b = sets
    first = metrics.bootstrap(metrics.fid, a, b, resamples=30, seed=7)
    assert first == metrics.bootstrap(metrics.fid, a, b, resamples=30, seed=7)
    assert first != metrics.bootstrap(metrics.fid, a, b, resamples=30, seed=8)
    low, high = first
    assert low < high and low <= metrics.fid(a, b) * 1.5
    with pytest.raises(ValueError, match="at least 2"):
        metrics.bootstrap(metrics.fid, a, b, resamples=1)
