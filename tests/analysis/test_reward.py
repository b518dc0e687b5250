"""Feature-reward correlation against scipy / sklearn on an independently built matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from actstore.analysis import contrast, get_analysis, reward_correlation
from actstore.analysis.splits import random_split
from actstore.errors import InputError, NotFoundError, SpecError
from tests.analysis.conftest import SAE_F


def token_frame(st, run="base"):
    """Every stored token with its prompt and reward, and the SAE's dense (N, F) matrix."""
    tok = st.sql(
        """SELECT "row", prompt_idx, reward FROM labeled_tokens
           WHERE run = ? AND "row" IS NOT NULL ORDER BY "row" """,
        [run],
    ).df()
    feats = st.sql(
        "SELECT row, feature, value FROM feature_acts WHERE run = ? AND sae = 'sae2'", [run]
    ).df()
    F = np.zeros((len(tok), SAE_F))
    F[feats["row"].to_numpy(), feats["feature"].to_numpy()] = feats["value"].to_numpy()
    return tok, F


def per_prompt(tok, F, how):
    prompts = tok["prompt_idx"].to_numpy()
    keys = np.unique(prompts)
    agg = np.stack([getattr(F[prompts == p], how)(axis=0) for p in keys])
    reward = tok.groupby("prompt_idx")["reward"].first().loc[keys].to_numpy()
    return keys, agg, reward


@pytest.mark.parametrize("how", ["mean", "max"])
def test_prompt_level_matches_scipy(synth32, how):
    st = synth32.store
    tok, F = token_frame(st)
    keys, X, y = per_prompt(tok, F, how)
    res = reward_correlation(st, run="base", reward="reward", sae="sae2", aggregate=how, save=False)
    active = np.flatnonzero((X != 0).any(axis=0))
    assert res.n_units == 80 and res.n_inactive == SAE_F - active.size
    rows = {r["feature"]: r for r in res.table.to_pylist()}
    assert sorted(rows) == active.tolist()
    p_all = []
    for f in active:
        r = rows[f]
        pr, sp = stats.pearsonr(X[:, f], y), stats.spearmanr(X[:, f], y)
        assert r["pearson_r"] == pytest.approx(pr.statistic, abs=1e-9)
        assert r["pearson_p"] == pytest.approx(pr.pvalue, rel=1e-6, abs=1e-300)
        assert r["spearman_r"] == pytest.approx(sp.statistic, abs=1e-9)
        assert r["spearman_p"] == pytest.approx(sp.pvalue, rel=1e-6, abs=1e-300)
        assert r["mean"] == pytest.approx(X[:, f].mean())
        assert r["frac_active"] == pytest.approx((X[:, f] != 0).mean())
        p_all.append(pr.pvalue)
    q = stats.false_discovery_control(np.array(p_all), method="bh")
    np.testing.assert_allclose([rows[f]["pearson_q"] for f in active], q, rtol=1e-6)
    # the planted feature 3 tracks the reward
    assert res.table.column("feature")[0].as_py() == 3
    assert rows[3]["spearman_r"] > 0.85 and rows[7]["spearman_q"] > 0.05

    # ridge: same split (by prompt), same model, same numbers
    test = random_split(keys, test_fraction=0.25, seed=0)
    Xa = X[:, active]
    model = Ridge(alpha=1.0).fit(Xa[~test], y[~test])
    pred = model.predict(Xa[test])
    assert res.ridge is not None and res.ridge.held_out
    assert res.ridge.r2_test == pytest.approx(r2_score(y[test], pred), abs=1e-9)
    assert res.ridge.kendall_tau == pytest.approx(stats.kendalltau(pred, y[test]).statistic)
    np.testing.assert_allclose(
        [rows[f]["ridge_coef"] for f in active], model.coef_, rtol=1e-6, atol=1e-9
    )


def test_token_level_counts_absent_entries_as_zeros(synth32):
    st = synth32.store
    tok, F = token_frame(st)
    y = tok["reward"].to_numpy()
    res = reward_correlation(st, run="base", reward="reward", sae="sae2", level="token", save=False)
    assert res.n_units == len(tok)
    for r in res.table.to_pylist():
        col = F[:, r["feature"]]
        assert r["pearson_r"] == pytest.approx(stats.pearsonr(col, y).statistic, abs=1e-9)
        assert r["spearman_r"] == pytest.approx(stats.spearmanr(col, y).statistic, abs=1e-9)


def test_where_restricts_tokens_before_aggregating(synth32):
    st = synth32.store
    tok, F = token_frame(st)
    last = st.sql(
        """SELECT "row" FROM labeled_tokens WHERE run = 'base' AND position_role = 'last'
           ORDER BY "row" """
    ).numpy()["row"]
    res = reward_correlation(
        st, run="base", reward="reward", sae="sae2", where="position_role = 'last'", save=False
    )
    y = tok.set_index("row").loc[last, "reward"].to_numpy()
    want = stats.spearmanr(F[last, 3], y).statistic
    got = res.table.filter(res.table.column("feature").to_numpy() == 3).to_pylist()[0]
    assert got["spearman_r"] == pytest.approx(want, abs=1e-9) and want == pytest.approx(1.0)


def test_dense_directions(synth32):
    st = synth32.store
    contrast(
        st,
        run="base",
        hooks="blocks.1.hook_resid_post",
        group="triggered",
        where="position_role = 'last'",
        n_random=0,
        name="rw_dir",
    )
    name = "rw_dir/mean_diff/blocks.1.hook_resid_post"
    res = reward_correlation(
        st, run="base", reward="reward", directions=[name], aggregate="max", name="rw_dense"
    )
    a = st.acts("base", "blocks.1.hook_resid_post")
    v = res.params["directions"]
    assert v == [name]
    from actstore.analysis import load_direction

    u = load_direction(st, name).unit
    meta = a.meta.to_pandas()
    meta["proj"] = a.numpy(np.float64) @ u
    agg = meta.groupby("prompt_idx").agg(proj=("proj", "max"), reward=("reward", "first"))
    row = res.table.to_pylist()[0]
    assert row["direction"] == name
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(agg.proj, agg.reward).statistic)
    assert row["mean"] == pytest.approx(agg.proj.mean())
    rec = get_analysis(st, "rw_dense")
    assert rec.kind == "reward_correlation" and rec.result["features"][0]["direction"] == name


def test_scorer_is_averaged_over_samples(synth32):
    st = synth32.store
    by_label = reward_correlation(st, run="base", reward="reward", sae="sae2", save=False)
    by_scorer = reward_correlation(st, run="base", scorer="rm", sae="sae2", save=False)
    np.testing.assert_allclose(
        by_scorer.table.column("spearman_r").to_numpy(),
        by_label.table.column("spearman_r").to_numpy(),
        atol=1e-12,
    )
    assert by_scorer.ridge is not None and by_label.ridge is not None
    assert by_scorer.ridge.r2_test == pytest.approx(by_label.ridge.r2_test)


def test_errors(synth32):
    st = synth32.store
    with pytest.raises(SpecError, match="exactly one of reward="):
        reward_correlation(st, run="base", sae="sae2", save=False)
    with pytest.raises(SpecError, match="exactly one of sae="):
        reward_correlation(st, run="base", reward="reward", save=False)
    with pytest.raises(InputError, match="no scores of scorer"):
        reward_correlation(st, run="base", scorer="judge", sae="sae2", save=False)
    with pytest.raises(NotFoundError, match="SAEs: \\['sae2'\\]"):
        reward_correlation(st, run="base", reward="reward", sae="nope", save=False)
    with pytest.raises(SpecError, match="aggregate"):
        bad: Any = "sum"
        reward_correlation(st, run="base", reward="reward", sae="sae2", aggregate=bad, save=False)
