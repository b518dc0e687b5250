"""Contrast directions against numpy / sklearn on rows read independently."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from actstore.analysis import contrast, fit_directions, get_analysis, load_direction
from actstore.analysis.contrast import pair_differences
from actstore.analysis.metrics import variance_ratio
from actstore.errors import InputError, SpecError
from tests.analysis.conftest import TRIGGER_DIR

H0, H1, H2 = (f"blocks.{i}.hook_resid_post" for i in range(3))
LAST = "position_role = 'last'"


def last_rows(st, run, hook):
    a = st.acts(run, hook, where=LAST)
    meta = a.meta.to_pandas()
    return a.numpy(np.float64), meta


def test_planted_direction_separates_held_out_rows(synth):
    """The acceptance check: mean difference AUROC > 0.99, random directions about 0.5."""
    res = contrast(
        synth.store,
        run="base",
        hooks=[H0, H1],
        group="triggered",
        where=LAST,
        split="split",
        n_random=300,
        save=False,
    )
    l0, l1 = res.layers
    assert l1.auroc["mean_diff"] > 0.99 and l1.auroc["logistic"] > 0.99
    assert abs(l1.random.mean - 0.5) < 0.08 and l1.random.percentile < 0.99
    assert l1.auroc["mean_diff"] > l1.random.percentile
    assert (
        l1.random.p_value(l1.auroc["mean_diff"]) < 0.05 < l0.random.p_value(l0.auroc["mean_diff"])
    )
    assert 0.5 <= l1.random.abs_mean < l1.auroc["mean_diff"]
    assert l0.auroc["mean_diff"] < 0.8  # layer 0 carries no signal
    cos = TRIGGER_DIR @ l1.directions["mean_diff"] / np.linalg.norm(l1.directions["mean_diff"])
    assert cos > 0.9
    assert l1.variance_ratio > 10 * l0.variance_ratio
    assert res.best().hook == H1
    assert res.held_out and l1.n_test == (10, 10) and l1.n_train == (30, 30)


def test_matches_numpy_and_sklearn(synth):
    st = synth.store
    X, meta = last_rows(st, "base", H1)
    y = meta["triggered"].to_numpy(bool)
    test = (meta["split"] == "test").to_numpy()
    res = contrast(
        st,
        run="base",
        hooks=H1,
        group="triggered",
        where=LAST,
        split="split",
        n_random=0,
        methods=["mean_diff", "logistic", "pca"],
        C=0.5,
        save=False,
    )
    e = res.layer()
    Xtr, ytr = X[~test], y[~test]
    want = Xtr[ytr].mean(0) - Xtr[~ytr].mean(0)
    np.testing.assert_allclose(e.directions["mean_diff"], want, atol=1e-10)
    for m, v in e.directions.items():
        assert e.auroc[m] == pytest.approx(roc_auc_score(y[test], X[test] @ v), abs=1e-12)
        assert e.train_auroc[m] == pytest.approx(roc_auc_score(ytr, Xtr @ v), abs=1e-12)
    # logistic: same fit as sklearn on the same (isotropically scaled) rows
    mu, s = Xtr.mean(0), Xtr.std()
    clf = LogisticRegression(C=0.5, max_iter=5000).fit((Xtr - mu) / s, ytr)
    np.testing.assert_allclose(e.directions["logistic"], clf.coef_[0] / s, rtol=1e-4, atol=1e-6)
    # first principal component of the pooled training rows, oriented to the positives
    _, _, Vt = np.linalg.svd(Xtr - Xtr.mean(0))
    pc = Vt[0] * np.sign(Vt[0] @ want)
    np.testing.assert_allclose(e.directions["pca"], pc, atol=1e-8)
    assert e.variance_ratio == pytest.approx(variance_ratio(X, y))


def test_pairs(synth32):
    st = synth32.store
    X, meta = last_rows(st, "base", H1)
    y = meta["triggered"].to_numpy(bool)
    pair = meta["pair_id"].to_numpy()
    res = contrast(
        st,
        run="base",
        hooks=H1,
        group="triggered",
        where=LAST,
        pair="pair_id",
        split="none",
        n_random=0,
        save=False,
    )
    e = res.layer()
    assert set(e.directions) == {"mean_diff", "logistic", "pair_pca"}
    order = np.lexsort((y, pair))
    D = X[order][1::2] - X[order][0::2]  # positive minus negative, pair by pair
    np.testing.assert_allclose(e.directions["mean_diff"], D.mean(0), atol=1e-10)
    _, _, Vt = np.linalg.svd(D, full_matrices=False)
    np.testing.assert_allclose(np.abs(e.directions["pair_pca"] @ Vt[0]), 1.0, atol=1e-10)
    assert e.directions["pair_pca"] @ D.mean(0) > 0
    assert not res.held_out and e.extras["pair_pca"]["n_pairs"] == 40


def test_random_split_keeps_pairs_together(synth32):
    from actstore.analysis.groups import labelled_rows

    lab = labelled_rows(
        synth32.store,
        run="base",
        hooks=[H1],
        where=LAST,
        params=None,
        group="triggered",
        positive=None,
        negative=None,
        pair="pair_id",
        split="random",
        test_fraction=0.25,
        seed=3,
    )
    pair = lab.pair
    for p in np.unique(pair):
        assert len(set(lab.test[pair == p])) == 1
    assert lab.test.sum() == 20  # 10 of 40 pairs, two rows each
    again = labelled_rows(
        synth32.store,
        run="base",
        hooks=[H1],
        where=LAST,
        params=None,
        group="triggered",
        positive=None,
        negative=None,
        pair="pair_id",
        split="random",
        test_fraction=0.25,
        seed=3,
    )
    np.testing.assert_array_equal(lab.test, again.test)


def test_predicates_and_bound_params(synth32):
    st = synth32.store
    res = contrast(
        st,
        run="base",
        hooks=H1,
        positive="triggered AND prompt_idx < $n",
        negative="NOT triggered AND prompt_idx < $n",
        where=LAST,
        params={"n": 60},
        split="split = 'test'",
        n_random=10,
        save=False,
    )
    e = res.layer()
    assert sum(e.n_train) + sum(e.n_test) == 60 and res.n_dropped == 20
    assert e.auroc["mean_diff"] > 0.99


def test_stores_directions_with_provenance(synth32):
    st = synth32.store
    res = contrast(
        st,
        run="base",
        hooks=[H1, H2],
        group="triggered",
        where=LAST,
        split="split",
        n_random=20,
        name="trig_test",
    )
    d = load_direction(st, f"trig_test/mean_diff/{H1}")
    np.testing.assert_allclose(d.vector, res.direction("mean_diff", H1))
    assert d.hook == H1 and d.method == "mean_diff" and d.analysis_id == res.analysis_id
    assert (
        d.params["group"] == "triggered" and d.params["auroc"] == res.layer(H1).auroc["mean_diff"]
    )
    rec = get_analysis(st, "trig_test")
    assert rec.kind == "contrast" and rec.params["where"] == LAST
    assert rec.provenance["n_rows"] == {"train": 60, "test": 20, "dropped": 0}
    assert rec.result["layers"][0]["direction_names"]["logistic"] == f"trig_test/logistic/{H1}"
    summary = res.summary().to_pylist()
    assert {r["method"] for r in summary} == {"mean_diff", "logistic"} and len(summary) == 4
    assert "random_p95" in res.summary().column_names
    with pytest.raises(InputError, match="already exist"):
        contrast(st, run="base", hooks=H1, group="triggered", where=LAST, name="trig_test")


def test_fit_directions_helpers():
    X = np.array([[1.0, 0.0], [3.0, 1.0], [0.0, 0.0], [5.0, 2.0]])
    y = np.array([0, 1, 0, 1], bool)
    np.testing.assert_allclose(pair_differences(X, y, np.array([7, 7, 8, 8])), [[2, 1], [5, 2]])
    with pytest.raises(SpecError, match="needs matched pairs"):
        fit_directions(X, y, ["pair_pca"])
    with pytest.raises(InputError, match="both groups"):
        fit_directions(X, np.ones(4, bool), ["mean_diff"])


def test_errors(synth32):
    st = synth32.store
    with pytest.raises(SpecError, match="either group="):
        contrast(st, run="base", hooks=H1, group="triggered", positive="triggered", save=False)
    with pytest.raises(SpecError, match="define the two groups"):
        contrast(st, run="base", hooks=H1, save=False)
    with pytest.raises(InputError, match="not boolean"):
        contrast(st, run="base", hooks=H1, group="split", where=LAST, save=False)
    with pytest.raises(InputError, match="match both"):
        contrast(
            st, run="base", hooks=H1, positive="true", negative="triggered", where=LAST, save=False
        )
    with pytest.raises(InputError, match="'train' or 'test'"):
        contrast(st, run="base", hooks=H1, group="triggered", split="text", where=LAST, save=False)
    with pytest.raises(SpecError, match="unknown contrast method"):
        contrast(st, run="base", hooks=H1, group="triggered", methods=["lda"], save=False)
    with pytest.raises(InputError, match="SQL error"):
        contrast(st, run="base", hooks=H1, group="no_such_label", save=False)
