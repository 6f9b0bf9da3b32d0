"""Distances between two sets of feature vectors: FID, KID and MMD, in float64.

    from med3d_hub import metrics
    metrics.fid(real, fake)                      # Frechet distance of two (N, D) arrays
    metrics.kid(real, fake)                      # KID: mean and std over subsets
    metrics.mmd(real, fake, kernel="rbf")        # unbiased MMD^2, median-heuristic bandwidth

    stats = metrics.MeanCovariance()             # one pass over sets that do not fit in memory
    for batch in batches:
        stats.update(batch)
    metrics.fid(stats, other_stats)

Definitions, as in the literature:

* **FID** (Heusel et al. 2017): ``sum((mu1 - mu2)^2) + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)`` with
  unbiased covariances. ``tr((S1 S2)^1/2)`` is the sum of the square roots of the eigenvalues of
  ``F1^T S2 F1`` where ``S1 = F1 F1^T``: a symmetric positive semi-definite matrix, so the square
  root is real and stable (no complex parts, no ``sqrtm`` of a non-symmetric product). The
  published 3D conventions (HA-GAN, MONAI's ``FIDMetric``) instead take ``scipy.linalg.sqrtm`` of
  ``S1 S2``: ``estimator="sqrtm"`` reproduces that (1e-6 added to the diagonals when the root is
  not finite, the real part kept); it needs scipy.
* **KID** (Binkowski et al. 2018): the unbiased MMD^2 with the kernel ``(x.y / D + 1)^3``, averaged
  over random subsets; its std is the spread over the subsets (``np.std``, as torch-fidelity).
* **MMD** (Gretton et al. 2012): the unbiased MMD^2 with an RBF kernel ``exp(-|x-y|^2 / 2 s^2)``
  (``s``: given, or the median pairwise distance of the pooled sets), a linear kernel ``x.y``, or
  the KID polynomial kernel. It can be slightly negative when the sets are alike.

This module imports numpy only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..errors import UsageError

__all__ = [
    "KID",
    "MeanCovariance",
    "SingularCovarianceWarning",
    "bootstrap",
    "fid",
    "frechet_distance",
    "kid",
    "median_bandwidth",
    "mmd",
]

KERNELS = ("rbf", "linear", "polynomial")


class SingularCovarianceWarning(RuntimeWarning):
    """A covariance is singular (fewer volumes than feature dimensions, or constant features)."""


class KID(NamedTuple):
    mean: float
    std: float
    subsets: int
    subset_size: int


def _as_features(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2:
        raise UsageError(f"{name}: expected an (N, D) array of feature vectors, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"{name}: expected numbers, got {array.dtype}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise UsageError(f"{name}: {bad} row(s) hold NaN or infinity; remove or recompute those volumes")
    return array


class MeanCovariance:
    """Mean and unbiased covariance of feature vectors, accumulated batch by batch in float64.

    Batches merge with Chan et al.'s pairwise update (per-batch centred sums), which stays exact
    where ``sum(x x^T) - n mu mu^T`` would cancel. Memory: one batch plus a D x D matrix.
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.dim = dim
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def update(self, batch) -> MeanCovariance:
        """Add the rows of an (N, D) array; returns self."""
        x = _as_features(batch, "batch")
        if self.dim is not None and x.shape[1] != self.dim:
            raise UsageError(f"batch has {x.shape[1]} features, earlier batches had {self.dim}")
        if len(x) == 0:
            return self
        centred = x.astype(np.float64)  # one float64 copy, centred in place: the caller's array is untouched
        mean = centred.mean(axis=0)
        centred -= mean
        self._merge(len(x), mean, centred.T @ centred)  # numpy computes X^T X as one symmetric product
        return self

    def merge(self, other: MeanCovariance) -> MeanCovariance:
        """Add another accumulator's volumes (e.g. from another process); returns self."""
        if other.n:
            if self.dim is not None and other.dim != self.dim:
                raise UsageError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
            self._merge(other.n, other._mean, other._m2)
        return self

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if self.n == 0:
            self.n, self.dim, self._mean, self._m2 = n, len(mean), mean.copy(), m2.copy()
            return
        total = self.n + n
        delta = mean - self._mean
        self._m2 += m2
        self._m2 += np.outer(delta, delta) * (self.n * n / total)
        self._mean += delta * (n / total)
        self.n = total

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased (N - 1) covariance, as ``np.cov(x, rowvar=False)``."""
        self._need(2)
        return self._m2 / (self.n - 1)

    def _need(self, n: int) -> None:
        if self.n < n:
            raise UsageError(f"need at least {n} feature vectors, got {self.n}")

    @classmethod
    def of(cls, features) -> MeanCovariance:
        """The statistics of an (N, D) array (or an accumulator, returned as it is)."""
        if isinstance(features, MeanCovariance):
            return features
        return cls().update(features)


# -- FID ------------------------------------------------------------------------------------------


def _psd_factor(sigma: np.ndarray, name: str, n: int | None) -> np.ndarray:
    """F with F F^T = sigma: Cholesky when positive definite, else from the eigendecomposition."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        pass
    _warn_singular(sigma, name, n, always=True)
    values, vectors = np.linalg.eigh(sigma)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def _warn_singular(sigma: np.ndarray, name: str, n: int | None, *, always: bool) -> None:
    """Warn that the covariance of ``name`` is singular: too few volumes, or constant features."""
    dim = len(sigma)
    constant = int((np.diag(sigma) <= 0).sum())
    if not always and not constant and (n is None or n > dim):
        return
    reasons = []
    if n is not None and n <= dim:
        reasons.append(f"{n} volumes for {dim} feature dimensions (rank at most {n - 1})")
    if constant:
        reasons.append(f"{constant} feature(s) constant across the set")
    why = "; ".join(reasons) or "features linearly dependent"
    if n is None or n <= dim:
        advice = ("the FID is dominated by estimation noise and biased upwards; use more volumes than "
                  "feature dimensions (several times more is better), fewer dimensions (e.g. resnet10: 512), "
                  "or report KID, which has no such requirement")
        warnings.warn(f"the covariance of {name} is singular ({why}): {advice}", SingularCovarianceWarning, stacklevel=5)


ESTIMATORS = ("eigen", "sqrtm")


def frechet_distance(mu1, sigma1, mu2, sigma2, *, n1: int | None = None, n2: int | None = None,
                     estimator: str = "eigen") -> float:
    """The Frechet distance of two Gaussians given their means and covariances (float64).

    ``estimator``: "eigen" (a symmetric product, see the module's docstring) or "sqrtm" (scipy's
    ``sqrtm(S1 @ S2)``, as HA-GAN and MONAI compute it).
    """
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown FID estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UsageError(
            f"the two sets differ in feature dimension or shape: means {mu1.shape} and {mu2.shape}, "
            f"covariances {sigma1.shape} and {sigma2.shape}"
        )
    if estimator == "sqrtm":
        _warn_singular(sigma1, "the first set", n1, always=False)
        _warn_singular(sigma2, "the second set", n2, always=False)
        trace_sqrt = _trace_sqrtm(sigma1, sigma2)
    else:
        f1 = _psd_factor(sigma1, "the first set", n1)
        f2 = _psd_factor(sigma2, "the second set", n2)
        g = f2.T @ f1
        # eig(g^T g) = eig(F1^T S2 F1) = eig(S2 S1): symmetric, so eigvalsh; tiny negatives are rounding.
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(g.T @ g), 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))  # a squared distance: below zero only by rounding


def _trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """tr(sqrtm(S1 S2)) the way HA-GAN's and MONAI's FID take it."""
    try:
        from scipy import linalg
    except ImportError:
        raise UsageError("the sqrtm FID estimator (HA-GAN, MONAI) is computed with scipy: pip install scipy") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's note on a singular product; handled below as upstream does
        root = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            offset = np.eye(len(sigma1)) * eps
            root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise UsageError(f"the sqrtm FID estimator gives an imaginary part of {np.max(np.abs(root.imag)):.3g}: "
                             "the covariances are too singular for it (use more volumes than feature dimensions)")
        root = root.real
    return float(np.trace(root))


def fid(a, b, *, estimator: str = "eigen") -> float:
    """Frechet distance between two sets: (N, D) feature arrays or ``MeanCovariance`` statistics."""
    sa, sb = MeanCovariance.of(a), MeanCovariance.of(b)
    return frechet_distance(sa.mean, sa.covariance, sb.mean, sb.covariance, n1=sa.n, n2=sb.n, estimator=estimator)


# -- kernels and MMD ------------------------------------------------------------------------------


def median_bandwidth(a, b, *, max_points: int = 2000, seed: int = 0) -> float:
    """The median pairwise Euclidean distance of the pooled sets (the median heuristic).

    Above ``max_points`` pooled vectors, the median of a random subset drawn with ``seed``.
    """
    pooled = np.concatenate([_as_features(a, "a"), _as_features(b, "b")]).astype(np.float64)
    if len(pooled) > max_points:
        pooled = pooled[np.random.default_rng(seed).choice(len(pooled), max_points, replace=False)]
    sq = np.einsum("ij,ij->i", pooled, pooled)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * pooled @ pooled.T, 0.0, None)
    median = float(np.sqrt(np.median(d2[np.triu_indices(len(pooled), k=1)])))
    if median <= 0:
        raise UsageError("the median heuristic gives bandwidth 0 (most vectors are identical); pass bandwidth=")
    return median


def _kernel_sum(kernel: str, x: np.ndarray, y: np.ndarray, bandwidth: float | None, *, exclude_diagonal: bool,
                block: int) -> float:
    """The sum of k(x_i, y_j) over all pairs (without i == j when x is y), in row blocks."""
    total = 0.0
    sq_y = np.einsum("ij,ij->i", y, y) if kernel == "rbf" else None
    for start in range(0, len(x), block):
        xb = x[start:start + block]
        k = xb @ y.T
        if kernel == "polynomial":
            k = (k / x.shape[1] + 1.0) ** 3
        elif kernel == "rbf":
            d2 = np.clip(np.einsum("ij,ij->i", xb, xb)[:, None] + sq_y[None, :] - 2.0 * k, 0.0, None)
            k = np.exp(-d2 / (2.0 * bandwidth**2))
        total += float(k.sum())
        if exclude_diagonal:
            rows = np.arange(len(xb))
            total -= float(k[rows, start + rows].sum())
    return total


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, kernel: str, bandwidth: float | None, block: int) -> float:
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise UsageError(f"MMD needs at least 2 vectors per set, got {m} and {n}")
    kxx = _kernel_sum(kernel, x, x, bandwidth, exclude_diagonal=True, block=block)
    kyy = _kernel_sum(kernel, y, y, bandwidth, exclude_diagonal=True, block=block)
    kxy = _kernel_sum(kernel, x, y, bandwidth, exclude_diagonal=False, block=block)
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2.0 * kxy / (m * n)


def mmd(a, b, kernel: str = "rbf", *, bandwidth: float | None = None, block: int = 1024) -> float:
    """The unbiased estimate of MMD^2 between two (N, D) sets.

    ``kernel``: "rbf" (``bandwidth`` given, or ``median_bandwidth(a, b)``), "linear" or
    "polynomial" (the KID kernel). Memory: ``block`` rows of the kernel matrix at a time.
    """
    if kernel not in KERNELS:
        raise UsageError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    x, y = _as_features(a, "a").astype(np.float64), _as_features(b, "b").astype(np.float64)
    _same_dim(x, y)
    if kernel == "rbf":
        bandwidth = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
        if not bandwidth > 0:
            raise UsageError(f"the RBF bandwidth must be > 0, got {bandwidth}")
    return _unbiased_mmd2(x, y, kernel, bandwidth, block)


def kid(a, b, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """Kernel Inception Distance: the polynomial-kernel unbiased MMD^2 over random subsets.

    Each subset draws ``subset_size`` vectors (capped at the smaller set) from each set without
    replacement, with ``np.random.default_rng(seed)``. When the subsets are the whole sets, every
    draw gives the same number, so it is computed once (std 0).
    """
    x, y = _as_features(a, "a").astype(np.float64), _as_features(b, "b").astype(np.float64)
    _same_dim(x, y)
    if subsets < 1 or subset_size < 2:
        raise UsageError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(x), len(y))
    if m == len(x) == len(y):
        return KID(_unbiased_mmd2(x, y, "polynomial", None, 1024), 0.0, 1, m)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        values.append(_unbiased_mmd2(xs, ys, "polynomial", None, 1024))
    return KID(float(np.mean(values)), float(np.std(values)), subsets, m)


def _same_dim(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise UsageError(f"the two sets differ in feature dimension: {x.shape[1]} and {y.shape[1]}")


# -- confidence intervals -------------------------------------------------------------------------

def bootstrap(metric: Callable[[np.ndarray, np.ndarray], float], a, b, *, resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[float, float]:
    """A percentile bootstrap interval of ``metric(a, b)``: both sets resampled with replacement.

    Deterministic under ``seed``. Each resample costs one evaluation of ``metric``.
    """
    x, y = _as_features(a, "a"), _as_features(b, "b")
    if resamples < 2:
        raise UsageError(f"a bootstrap needs at least 2 resamples, got {resamples}")
    if not 0 < level < 1:
        raise UsageError(f"level must be between 0 and 1, got {level}")
    rng = np.random.default_rng(seed)
    values = np.array([
        metric(x[rng.integers(0, len(x), len(x))], y[rng.integers(0, len(y), len(y))]) for _ in range(resamples)
    ], dtype=np.float64)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
