"""Checkpoint diff against direct numpy formulas on aligned rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from actstore.analysis import checkpoint_diff, get_analysis
from actstore.analysis.metrics import linear_cka
from actstore.errors import HookNotFoundError, InputError

HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(3)]
LAST = "position_role = 'last'"


def cka_direct(X, Y):
    """Linear CKA through the centred Gram matrices (the sample-space formula)."""
    n = X.shape[0]
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L))


def test_cosine_and_cka_match_numpy(synth):
    st = synth.store
    res = checkpoint_diff(st, run_a="base", run_b="ft", block_rows=50, save=False)
    assert [e.hook for e in res.layers] == HOOKS and res.n_unmatched == 0
    for e in res.layers:
        A = st.acts("base", e.hook).numpy(np.float64)
        B = st.acts("ft", e.hook).numpy(np.float64)
        cos = np.sum(A * B, 1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))
        assert e.n == A.shape[0]
        assert e.mean_cosine == pytest.approx(cos.mean(), abs=1e-12)
        rel = np.linalg.norm(B - A, axis=1) / np.linalg.norm(A, axis=1)
        assert e.mean_rel_change == pytest.approx(rel.mean(), abs=1e-12)
        assert e.cka == pytest.approx(cka_direct(A, B), abs=1e-9)
        assert e.cka == pytest.approx(linear_cka(A, B), abs=1e-9)
    assert res.summary().num_rows == 3


def test_blocks_and_row_order_do_not_matter(synth32):
    st = synth32.store
    small = checkpoint_diff(st, run_a="base", run_b="ft", hooks=HOOKS[2], block_rows=7, save=False)
    big = checkpoint_diff(st, run_a="base", run_b="ft", hooks=HOOKS[2], save=False)
    assert small.layers[0].cka == pytest.approx(big.layers[0].cka, abs=1e-12)
    assert small.layers[0].mean_cosine == pytest.approx(big.layers[0].mean_cosine, abs=1e-12)
    # swapping the runs gives the same symmetric measures
    swap = checkpoint_diff(st, run_a="ft", run_b="base", hooks=HOOKS[2], save=False)
    assert swap.layers[0].cka == pytest.approx(big.layers[0].cka, abs=1e-9)


def test_direction_transfer(synth32):
    """The trigger direction exists at layer 2 of `base` but not of `ft`."""
    st = synth32.store
    res = checkpoint_diff(
        st,
        run_a="base",
        run_b="ft",
        hooks=HOOKS[1:],
        where=LAST,
        group="triggered",
        split="split",
        methods=["mean_diff"],
        save=False,
    )
    l1, l2 = res.layers
    t1, t2 = l1.transfer["mean_diff"], l2.transfer["mean_diff"]
    assert t1.a_on_a > 0.99 and t1.a_on_b > 0.99 and t1.cosine > 0.95
    assert t2.b_on_b < 0.8 and t2.cosine < 0.8
    # recompute a -> b at layer 1 directly
    A = st.acts("base", HOOKS[1], where=LAST)
    B = st.acts("ft", HOOKS[1], where=LAST).numpy(np.float64)
    meta = A.meta.to_pandas()
    y, test = meta["triggered"].to_numpy(bool), (meta["split"] == "test").to_numpy()
    Xa = A.numpy(np.float64)
    v = Xa[~test & y].mean(0) - Xa[~test & ~y].mean(0)
    assert t1.a_on_b == pytest.approx(roc_auc_score(y[test], B[test] @ v))
    assert "mean_diff:a->b" in res.summary().column_names


def test_feature_changes(synth32):
    st = synth32.store
    res = checkpoint_diff(st, run_a="base", run_b="ft", hooks=HOOKS[0], sae="sae2", name="dtest")
    top = res.feature_summary(3).to_pylist()
    assert top[0]["feature"] == 9 and top[0]["mean_a"] == 0.0
    n = res.n_rows
    for run, suffix in (("base", "a"), ("ft", "b")):
        got = st.sql(
            "SELECT feature, sum(value) AS s, count(*) AS c FROM feature_acts "
            "WHERE run = ? GROUP BY feature",
            [run],
        ).df()
        for r in top:
            hit = got[got.feature == r["feature"]]
            s = float(hit.s.sum()) if len(hit) else 0.0
            c = float(hit.c.sum()) if len(hit) else 0.0
            assert r[f"mean_{suffix}"] == pytest.approx(s / n)
            assert r[f"freq_{suffix}"] == pytest.approx(c / n)
    rec = get_analysis(st, "dtest")
    assert rec.kind == "checkpoint_diff" and rec.result["features"][0]["feature"] == 9
    assert rec.provenance["run_ids"] == [1, 2]


def test_errors(synth32):
    st = synth32.store
    with pytest.raises(HookNotFoundError, match="not in run 'base'; it has"):
        checkpoint_diff(st, run_a="base", run_b="ft", hooks="blocks.7.hook_resid_post", save=False)
    with pytest.raises(InputError, match="no selected row"):
        checkpoint_diff(st, run_a="base", run_b="ft", where="prompt_idx < 0", save=False)
