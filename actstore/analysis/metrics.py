"""Statistics the analyses share: AUROC, correlations with p-values, FDR, CKA, variance ratios.

Each function here is small and checked against scipy / sklearn in the tests.
The correlations come in two forms: dense (a few directions, every row has a
value) and sparse (SAE features, where a missing entry is a zero that still
counts). The sparse Spearman correlation ranks each feature's column with its
implicit zeros (tied, at their average rank) without ever materialising it.

Example
-------
>>> y = np.array([0, 0, 1, 1], bool)
>>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), y)
0.75
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats


def auroc_columns(scores_NK: np.ndarray, y_N: np.ndarray) -> np.ndarray:
    """AUROC of every column of scores for boolean labels (ties count one half).

    This is the Mann-Whitney U statistic divided by ``n_pos * n_neg``, the same
    number as ``sklearn.metrics.roc_auc_score``. NaN when a class is empty.

    Example
    -------
    >>> auroc_columns(np.array([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0]]), np.array([0, 1, 1], bool))
    array([1., 0.])
    """
    y = np.asarray(y_N, bool)
    scores = np.asarray(scores_NK, np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return np.full(scores.shape[1], np.nan)
    ranks = stats.rankdata(scores, axis=0)
    u = ranks[y].sum(axis=0) - n1 * (n1 + 1) / 2.0
    return np.asarray(u / (n1 * n0), np.float64)


def auroc(scores_N: np.ndarray, y_N: np.ndarray) -> float:
    """AUROC of one score vector for boolean labels.

    Example
    -------
    >>> auroc(np.array([3.0, 1.0]), np.array([True, False]))
    1.0
    """
    return float(auroc_columns(np.asarray(scores_N).reshape(-1, 1), y_N)[0])


@dataclass(frozen=True, slots=True, eq=False)
class RandomBaseline:
    """The AUROC of random directions: its distribution's mean, spread, maximum and a percentile.

    A random direction's sign is random, so its raw AUROC is spread around 0.5
    in both directions; when the groups are far apart (a salient trigger in a
    narrow model) many random directions separate them with one sign or the
    other. ``abs_mean`` (the mean of ``max(auc, 1 - auc)``) measures that, and
    :meth:`p_value` says how often a random direction does at least as well as
    a fitted one.
    """

    n: int
    """Number of random directions."""
    mean: float
    """Mean AUROC."""
    std: float
    """Standard deviation of the AUROC."""
    max: float
    """Best AUROC among them."""
    percentile: float
    """The ``q``-th percentile of the AUROC."""
    q: float
    """Which percentile."""
    abs_mean: float = float("nan")
    """Mean of ``max(auc, 1 - auc)``: separation regardless of sign."""
    aucs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The (n,) AUROCs themselves."""

    def p_value(self, auroc: float) -> float:
        """Share of random directions with an AUROC at least ``auroc`` (add-one smoothed).

        Example
        -------
        >>> b = RandomBaseline(3, 0.5, 0.1, 0.7, 0.7, 95.0, aucs=np.array([0.4, 0.5, 0.7]))
        >>> b.p_value(0.6)
        0.5
        """
        if self.n == 0 or not np.isfinite(auroc):
            return float("nan")
        return float((1 + np.sum(self.aucs >= auroc)) / (self.n + 1))

    def to_dict(self) -> dict[str, float]:
        """Plain values (without the AUROCs themselves).

        Example
        -------
        >>> RandomBaseline(10, 0.5, 0.1, 0.7, 0.65, 95.0).to_dict()["max"]
        0.7
        """
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "max": self.max,
            "percentile": self.percentile,
            "q": self.q,
            "abs_mean": self.abs_mean,
        }


def random_baseline(
    X_ND: np.ndarray, y_N: np.ndarray, *, n: int, seed: int, q: float = 95.0
) -> RandomBaseline:
    """AUROC of ``n`` isotropic Gaussian random directions scoring the rows of ``X_ND``.

    Example
    -------
    >>> rng = np.random.default_rng(0)
    >>> b = random_baseline(rng.normal(size=(200, 16)), rng.random(200) > 0.5, n=50, seed=0)
    >>> 0.4 < b.mean < 0.6
    True
    """
    if n <= 0:
        nan = float("nan")
        return RandomBaseline(0, nan, nan, nan, nan, q)
    R_KD = np.random.default_rng(seed).standard_normal((n, X_ND.shape[1]))
    # score the directions in chunks so the (rows, chunk) score matrix stays small
    step = max(1, (1 << 21) // max(X_ND.shape[0], 1))
    aucs = np.concatenate(
        [auroc_columns(X_ND @ R_KD[a : a + step].T, y_N) for a in range(0, n, step)]
    )
    return RandomBaseline(
        n=n,
        mean=float(np.mean(aucs)),
        std=float(np.std(aucs)),
        max=float(np.max(aucs)),
        percentile=float(np.percentile(aucs, q)),
        q=float(q),
        abs_mean=float(np.mean(np.maximum(aucs, 1.0 - aucs))),
        aucs=aucs,
    )


def variance_ratio(X_ND: np.ndarray, y_N: np.ndarray) -> float:
    """Between-class over within-class variance (traces of the scatter matrices).

    ``sum_c n_c |mu_c - mu|^2 / sum_i |x_i - mu_{c(i)}|^2`` for the classes of ``y``.

    Example
    -------
    >>> variance_ratio(np.array([[0.0], [1.0], [10.0], [11.0]]), np.array([0, 0, 1, 1]))
    100.0
    """
    X = np.asarray(X_ND, np.float64)
    mu = X.mean(axis=0)
    between = within = 0.0
    for c in np.unique(y_N):
        Xc = X[y_N == c]
        mc = Xc.mean(axis=0)
        between += Xc.shape[0] * float(np.sum((mc - mu) ** 2))
        within += float(np.sum((Xc - mc) ** 2))
    return between / within if within > 0 else float("inf")


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaNs stay NaN and are not counted.

    Equal to ``scipy.stats.false_discovery_control(p, method="bh")`` on the finite values.

    Example
    -------
    >>> bh_adjust(np.array([0.01, 0.04, 0.03, np.nan])).round(3).tolist()
    [0.03, 0.04, 0.04, nan]
    """
    p = np.asarray(p, np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def r_pvalue(r: np.ndarray, n: int) -> np.ndarray:
    """Two-sided p-value of correlation coefficients from ``n`` pairs (t with n-2 df).

    This is the test ``scipy.stats.pearsonr`` and ``spearmanr`` report.

    Example
    -------
    >>> float(r_pvalue(np.array([0.0]), 10)[0])
    1.0
    """
    r = np.clip(np.asarray(r, np.float64), -1.0, 1.0)
    df = n - 2
    if df <= 0:
        return np.full(r.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(df / ((1.0 - r) * (1.0 + r)))
    return np.asarray(2.0 * stats.t.sf(np.abs(t), df), np.float64)


def dense_correlations(X_NK: np.ndarray, y_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Pearson r, Spearman rho) of each column of ``X_NK`` with ``y_N``; NaN for constant columns.

    Example
    -------
    >>> r, rho = dense_correlations(np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 2.0, 3.0]))
    >>> round(float(r[0]), 4), float(rho[0])
    (0.982, 1.0)
    """
    X = np.asarray(X_NK, np.float64)
    y = np.asarray(y_N, np.float64)
    return _pearson_dense(X, y), _pearson_dense(stats.rankdata(X, axis=0), stats.rankdata(y))


def _pearson_dense(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(axis=0)
    yc = y - y.mean()
    den = np.sqrt((Xc**2).sum(axis=0) * (yc**2).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (Xc * yc[:, None]).sum(axis=0) / den
    return np.where(den > 0, r, np.nan)


def sparse_correlations(
    n: int,
    unit_idx: np.ndarray,
    col_idx: np.ndarray,
    values: np.ndarray,
    y_N: np.ndarray,
    n_cols: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(Pearson r, Spearman rho) of sparse columns with ``y``; absent entries are zeros.

    Parameters
    ----------
    n
        Number of units (rows), including those without any entry.
    unit_idx, col_idx, values
        The nonzero entries (one per (unit, column)).
    y_N
        The target, one value per unit.
    n_cols
        Number of columns.

    Notes
    -----
    Pearson uses the columns' sums, sums of squares and cross sums. For
    Spearman, a column with ``z`` zeros and ``m`` negative entries ranks its
    zeros together at ``m + (z + 1) / 2`` and its nonzeros around them (equal
    values share their average rank), so the rank correlation is a sum over the
    nonzero entries only.

    Example
    -------
    >>> r, rho = sparse_correlations(4, np.array([2, 3]), np.array([0, 0]), np.array([1.0, 2.0]),
    ...                              np.array([0.0, 0.1, 0.5, 0.9]), 1)
    >>> round(float(rho[0]), 4)
    0.9487
    """
    keep = values != 0
    u = np.asarray(unit_idx, np.int64)[keep]
    c = np.asarray(col_idx, np.int64)[keep]
    v = np.asarray(values, np.float64)[keep]
    y = np.asarray(y_N, np.float64)

    # Pearson from sums (zeros add nothing to any sum)
    yc = y - y.mean()
    syy = float((yc**2).sum())
    sx = np.bincount(c, v, minlength=n_cols)
    sxx = np.bincount(c, v * v, minlength=n_cols)
    sxy = np.bincount(c, v * yc[u], minlength=n_cols)
    varx = sxx - sx * sx / n
    den = np.sqrt(np.clip(varx, 0.0, None) * syy)
    with np.errstate(divide="ignore", invalid="ignore"):
        pearson = np.where(den > 0, sxy / den, np.nan)

    # Spearman: ranks of the nonzeros within their column, zeros tied in between
    order = np.lexsort((v, c))
    c, v, u = c[order], v[order], u[order]
    nnz = np.bincount(c, minlength=n_cols)
    starts = np.concatenate([[0], np.cumsum(nnz)[:-1]])
    n_zero = n - nnz
    raw = (np.arange(c.size) - starts[c] + 1 + np.where(v > 0, n_zero[c], 0)).astype(np.float64)
    new_group = np.ones(c.size, dtype=bool)
    new_group[1:] = (c[1:] != c[:-1]) | (v[1:] != v[:-1])
    gid = np.cumsum(new_group) - 1
    r = (np.bincount(gid, raw) / np.bincount(gid))[gid]
    n_neg = np.bincount(c[v < 0], minlength=n_cols)
    r0 = n_neg + (n_zero + 1) / 2.0
    ry = stats.rankdata(y)
    ryc = ry - ry.mean()
    rbar = (n + 1) / 2.0
    cov = np.bincount(c, (r - r0[c]) * ryc[u], minlength=n_cols)
    var_r = np.bincount(c, (r - rbar) ** 2, minlength=n_cols) + n_zero * (r0 - rbar) ** 2
    den_s = np.sqrt(var_r * float((ryc**2).sum()))
    varies = var_r > 1e-9 * float(n) ** 3  # a constant column's rank variance is 0 up to rounding
    with np.errstate(divide="ignore", invalid="ignore"):
        spearman = np.where(varies & (den_s > 0), cov / den_s, np.nan)
    return np.asarray(pearson, np.float64), np.asarray(spearman, np.float64)


def linear_cka(X_ND: np.ndarray, Y_NE: np.ndarray) -> float:
    """Linear CKA of two representations of the same rows (in memory).

    ``|Yc^T Xc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F)`` with column-centred ``Xc``, ``Yc``
    (Kornblith et al., 2019). :mod:`actstore.analysis.diff` streams the same formula.

    Example
    -------
    >>> X = np.random.default_rng(0).normal(size=(50, 4))
    >>> round(linear_cka(X, 3 * X + 1), 6)
    1.0
    """
    Xc = np.asarray(X_ND, np.float64) - np.mean(X_ND, axis=0)
    Yc = np.asarray(Y_NE, np.float64) - np.mean(Y_NE, axis=0)
    num = float(np.sum((Yc.T @ Xc) ** 2))
    return num / float(np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
