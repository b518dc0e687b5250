"""The shared statistics against scipy and sklearn, including property tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import roc_auc_score

from actstore.analysis.metrics import (
    auroc,
    auroc_columns,
    bh_adjust,
    dense_correlations,
    linear_cka,
    r_pvalue,
    random_baseline,
    sparse_correlations,
    variance_ratio,
)
from actstore.analysis.splits import random_split
from actstore.errors import InputError, SpecError


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(200) > 0.4
    scores = np.round(rng.normal(size=(200, 5)) + y[:, None] * [0, 0.5, 1, 2, -1], 1)  # ties
    got = auroc_columns(scores, y)
    want = [roc_auc_score(y, scores[:, j]) for j in range(5)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.isnan(auroc(scores[:, 0], np.ones(200, bool)))


def test_random_baseline_is_chance():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 32))
    y = rng.random(400) > 0.5
    b = random_baseline(X, y, n=200, seed=0, q=90)
    assert abs(b.mean - 0.5) < 0.03 and b.percentile <= b.max and b.n == 200 and b.q == 90


def test_bh_matches_scipy():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.random(50), rng.random(10) * 1e-3, [np.nan]])
    q = bh_adjust(p)
    np.testing.assert_allclose(q[:-1], stats.false_discovery_control(p[:-1], method="bh"))
    assert np.isnan(q[-1])


def test_r_pvalue_matches_scipy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=30), rng.normal(size=30)
    r = stats.pearsonr(x, y)
    assert r_pvalue(np.array([r.statistic]), 30)[0] == pytest.approx(r.pvalue, rel=1e-9)
    rho = stats.spearmanr(x, y)
    assert r_pvalue(np.array([rho.statistic]), 30)[0] == pytest.approx(rho.pvalue, rel=1e-9)


def dense_of(n, u, c, v, n_cols):
    X = np.zeros((n, n_cols))
    X[u, c] = v
    return X


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(4, 40),
    n_cols=st.integers(1, 6),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
    negative=st.booleans(),
)
def test_sparse_correlations_equal_dense_scipy(n, n_cols, density, seed, ties, negative):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, n_cols)) < density
    vals = rng.random((n, n_cols)) + 0.1
    if ties:
        vals = np.round(vals * 3) / 3 + 0.1
    if negative:
        vals -= 0.6
    u, c = np.nonzero(mask)
    v = vals[u, c]
    y = rng.normal(size=n)
    if ties:
        y = np.round(y)
    X = dense_of(n, u, c, v, n_cols)
    pearson, spearman = sparse_correlations(n, u, c, v, y, n_cols)
    dp, ds = dense_correlations(X, y)
    for j in range(n_cols):
        col = X[:, j]
        if np.ptp(col) == 0 or np.ptp(y) == 0:
            assert np.isnan(pearson[j]) and np.isnan(spearman[j])
            continue
        assert pearson[j] == pytest.approx(stats.pearsonr(col, y).statistic, abs=1e-9)
        assert spearman[j] == pytest.approx(stats.spearmanr(col, y).statistic, abs=1e-9)
        assert dp[j] == pytest.approx(pearson[j], abs=1e-9)
        assert ds[j] == pytest.approx(spearman[j], abs=1e-9)


def test_linear_cka_properties():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(100, 8))
    Q = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    assert linear_cka(X, 2.5 * X @ Q + 3) == pytest.approx(1.0)
    assert linear_cka(X, rng.normal(size=(100, 5))) < 0.2


def test_variance_ratio():
    X = np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    # between: 4 rows * 2^2 = 16; within: 4 rows * 1^2 = 4
    assert variance_ratio(X, np.array([0, 0, 1, 1])) == pytest.approx(4.0)


def test_random_split_is_stable_per_unit():
    keys = np.repeat(np.arange(40), 3)
    test = random_split(keys, test_fraction=0.25, seed=0)
    assert test.reshape(40, 3).all(1).sum() == 10 and (test.reshape(40, 3).any(1)).sum() == 10
    # units are ranked by a per-unit hash, so the held-out sets of nested selections nest
    sub = random_split(keys[:60], test_fraction=0.5, seed=0)
    full = random_split(keys, test_fraction=0.5, seed=0)
    assert (sub & ~full[:60]).sum() == 0 or (~sub & full[:60]).sum() == 0
    with pytest.raises(InputError, match="at least two units"):
        random_split(np.zeros(5), test_fraction=0.5, seed=0)
    with pytest.raises(SpecError, match="test_fraction"):
        random_split(keys, test_fraction=1.5, seed=0)
