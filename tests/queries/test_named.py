"""Named queries against independent numpy/scipy computations on the dense data.

Every query is run through ``run_named`` (with and without the native feature
cache) and through its SQL macro, and compared with the same statistic computed
by numpy/scipy on the dense (N, F) feature matrix with its zeros filled in.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

import actstore.queries as q
from actstore.errors import InputError, NotFoundError, RunNotFoundError
from tests.queries.conftest import F, Truth

RUN = "base/p"
TOL = {"rtol": 1e-9, "atol": 1e-12}


def col(result, name: str) -> np.ndarray:
    """A result column as float64 with NaN for NULL, indexed by feature."""
    df = result.df().sort_values("feature")
    return df[name].to_numpy(dtype=np.float64, na_value=np.nan)


def bh(p: np.ndarray) -> np.ndarray:
    """scipy's BH over the defined p-values; NaN stays NaN."""
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    out[ok] = stats.false_discovery_control(p[ok])
    return out


def close(a: np.ndarray, b: np.ndarray, **kw) -> None:
    np.testing.assert_allclose(a, b, equal_nan=True, **(kw or TOL))


# -- trigger_diff -------------------------------------------------------------------


def welch_reference(X_A: np.ndarray, X_B: np.ndarray) -> dict[str, np.ndarray]:
    n_a, n_b = len(X_A), len(X_B)
    m_a, m_b = X_A.mean(0), X_B.mean(0)
    v_a, v_b = X_A.var(0, ddof=1), X_B.var(0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t, p = stats.ttest_ind(X_A, X_B, equal_var=False, axis=0)
        se2 = v_a / n_a + v_b / n_b
        df = se2**2 / ((v_a / n_a) ** 2 / (n_a - 1) + (v_b / n_b) ** 2 / (n_b - 1))
        pooled = ((n_a - 1) * v_a + (n_b - 1) * v_b) / (n_a + n_b - 2)
        d = (m_a - m_b) / np.sqrt(pooled)
    return {
        "mean_a": m_a,
        "mean_b": m_b,
        "diff": m_a - m_b,
        "freq_a": (X_A != 0).mean(0),
        "freq_b": (X_B != 0).mean(0),
        "t": t,
        "p": p,
        "df": df,
        "cohens_d": d,
        "q": bh(p),
    }


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("positions", [None, "position_role = 'last'"])
def test_trigger_diff_matches_welch_ttest(truth: Truth, cache, positions):
    meta = truth.rows(RUN)
    keep = np.ones(meta["row"].size, bool) if positions is None else meta["role"] == "last"
    g = meta["triggered"].astype(bool)
    X = truth.dense[RUN].astype(np.float64)
    ref = welch_reference(X[keep & g], X[keep & ~g])
    res = q.run_named(
        truth.store,
        "trigger_diff",
        run=RUN,
        sae="sae",
        group_a="triggered",
        positions=positions,
        cache=cache,
    )
    assert len(res) == F
    for name, expected in ref.items():
        # p and q: relative agreement even for p ~ 1e-90 (feature 17)
        atol = 1e-300 if name in ("p", "q") else 1e-12
        close(col(res, name), expected, rtol=1e-7, atol=atol)
    df = res.df()
    assert df["rank"].tolist() == list(range(1, F + 1))
    top = df.iloc[0]
    assert top["feature"] == 17 and top["q"] < 1e-6
    never = df[df.feature == 63].iloc[0]
    assert never["mean_a"] == 0.0 and never["mean_b"] == 0.0 and never["freq_a"] == 0.0
    assert np.isnan(never["t"]) and np.isnan(never["p"]) and np.isnan(never["q"])
    assert never["rank"] == F  # untestable features rank last
    assert (df["n_a"] == (keep & g).sum()).all() and (df["n_b"] == (keep & ~g).sum()).all()


def test_trigger_diff_predicates_and_null_labels(truth: Truth):
    meta = truth.rows(RUN)
    X = truth.dense[RUN].astype(np.float64)
    # `flag` is NULL on some prompts: those tokens are in neither group
    flag = meta["flag"]
    a = np.array([f is True for f in flag])
    b = np.array([f is False for f in flag])
    res = q.run_named(truth.store, "trigger_diff", run=RUN, sae="sae", group_a="flag")
    close(col(res, "t"), welch_reference(X[a], X[b])["t"], rtol=1e-7, atol=1e-12)
    # arbitrary predicates for both groups
    reward = meta["reward"].astype(float)
    res = q.run_named(
        truth.store,
        "trigger_diff",
        run=RUN,
        sae="sae",
        group_a="reward > 0.5 AND position > 1",
        group_b="reward < -0.5",
    )
    ref = welch_reference(X[(reward > 0.5) & (meta["position"] > 1)], X[reward < -0.5])
    close(col(res, "p"), ref["p"], rtol=1e-7, atol=1e-300)
    close(col(res, "q"), ref["q"], rtol=1e-7, atol=1e-300)


def test_trigger_diff_rank_by_p(truth: Truth):
    df = q.run_named(
        truth.store, "trigger_diff", run=RUN, sae="sae", group_a="triggered", rank_by="p"
    ).df()
    p = df["p"].to_numpy(dtype=float, na_value=np.nan)
    defined = p[~np.isnan(p)]
    assert (np.diff(defined) >= 0).all() and np.isnan(p[len(defined) :]).all()


def test_trigger_diff_paired_matches_ttest_rel(truth: Truth):
    meta = truth.rows(RUN)
    X = truth.dense[RUN].astype(np.float64)
    g = meta["triggered"].astype(bool)
    last = meta["role"] == "last"
    pairs = np.unique(meta["pair_id"].astype(int))
    for positions, keep in ((None, np.ones_like(g)), ("position_role = 'last'", last)):
        pid = meta["pair_id"].astype(int)
        A = np.stack([X[keep & g & (pid == p)].mean(0) for p in pairs])
        B = np.stack([X[keep & ~g & (pid == p)].mean(0) for p in pairs])
        with np.errstate(invalid="ignore", divide="ignore"):
            t, p = stats.ttest_rel(A, B, axis=0)
            d = A - B
            d_z = d.mean(0) / d.std(0, ddof=1)
        for cache in (False, True):
            res = q.run_named(
                truth.store,
                "trigger_diff",
                run=RUN,
                sae="sae",
                group_a="triggered",
                pair="pair_id",
                positions=positions,
                cache=cache,
            )
            close(col(res, "t"), t, rtol=1e-7, atol=1e-12)
            close(col(res, "p"), p, rtol=1e-6, atol=1e-300)
            close(col(res, "q"), bh(p), rtol=1e-6, atol=1e-300)
            close(col(res, "mean_a"), A.mean(0))
            close(col(res, "mean_b"), B.mean(0))
            close(col(res, "diff"), d.mean(0), rtol=1e-9, atol=1e-12)
            close(col(res, "cohens_d"), d_z, rtol=1e-7, atol=1e-12)
            close(col(res, "df"), np.where(np.isnan(t), np.nan, len(pairs) - 1))
            df = res.df()
            assert df.iloc[0]["feature"] == 17 and df.iloc[0]["q"] < 1e-6
            assert (df["n_pairs"] == len(pairs)).all()
            assert df[df.feature == 63].iloc[0]["mean_a"] == 0.0


# -- feature_reward_corr --------------------------------------------------------------


def prompt_aggregate(truth: Truth, run: str, keep: np.ndarray, how: str):
    meta = truth.rows(run)
    X = truth.dense[run].astype(np.float64)
    prompts = np.unique(meta["prompt_idx"][keep])
    agg = np.stack([getattr(X[keep & (meta["prompt_idx"] == p)], how)(0) for p in prompts])
    y = np.array(truth.prompts.column("reward").to_pylist())[prompts]
    return agg, y


@pytest.mark.parametrize("aggregate", ["mean", "max"])
@pytest.mark.parametrize("positions", [None, "position > 2"])
def test_feature_reward_corr_matches_scipy(truth: Truth, aggregate, positions):
    meta = truth.rows(RUN)
    keep = np.ones(meta["row"].size, bool) if positions is None else meta["position"] > 2
    agg, y = prompt_aggregate(truth, RUN, keep, aggregate)
    pr = np.full(F, np.nan)
    pp = np.full(F, np.nan)
    sr = np.full(F, np.nan)
    sp = np.full(F, np.nan)
    for f in range(F):
        if np.ptp(agg[:, f]) > 0:
            pr[f], pp[f] = stats.pearsonr(agg[:, f], y)
            sr[f], sp[f] = stats.spearmanr(agg[:, f], y)
    for cache in (False, True):
        res = q.run_named(
            truth.store,
            "feature_reward_corr",
            run=RUN,
            sae="sae",
            label="reward",
            aggregate=aggregate,
            positions=positions,
            cache=cache,
        )
        close(col(res, "pearson_r"), pr, rtol=1e-9, atol=1e-12)
        close(col(res, "spearman_r"), sr, rtol=1e-9, atol=1e-12)
        close(col(res, "pearson_p"), pp, rtol=1e-6, atol=1e-300)
        close(col(res, "spearman_p"), sp, rtol=1e-6, atol=1e-300)
        close(col(res, "pearson_q"), bh(pp), rtol=1e-6, atol=1e-300)
        close(col(res, "spearman_q"), bh(sp), rtol=1e-6, atol=1e-300)
        close(col(res, "mean"), agg.mean(0))
        close(col(res, "prompt_freq"), (agg != 0).mean(0))
        df = res.df()
        # fewer prompts have tokens past position 2, so the planted effect is weaker there
        assert df.iloc[0]["feature"] == 5
        assert df.iloc[0]["spearman_q"] < (1e-6 if positions is None else 1e-3)
        never = df[df.feature == 63].iloc[0]
        assert never["mean"] == 0.0 and np.isnan(never["spearman_r"])


# -- checkpoint_diff and feature_density ------------------------------------------------


@pytest.mark.parametrize("cache", [False, True])
def test_checkpoint_diff_matches_numpy(truth: Truth, cache):
    for positions, pick in ((None, None), ("position_role = 'last'", "last")):
        ka = np.ones(truth.dense["base/p"].shape[0], bool)
        if pick:
            ka = truth.rows("base/p")["role"] == pick
        A = truth.dense["base/p"][ka].astype(np.float64)
        B = truth.dense["ft/p"][ka].astype(np.float64)
        res = q.run_named(
            truth.store,
            "checkpoint_diff",
            run_a="base/p",
            run_b="ft/p",
            sae="sae",
            positions=positions,
            cache=cache,
        )
        close(col(res, "mean_a"), A.mean(0))
        close(col(res, "mean_b"), B.mean(0))
        close(col(res, "diff"), B.mean(0) - A.mean(0), rtol=1e-9, atol=1e-12)
        close(col(res, "freq_diff"), (B != 0).mean(0) - (A != 0).mean(0))
        df = res.df()
        assert df.iloc[0]["feature"] == 40
        assert df[df.feature == 63].iloc[0][["mean_a", "mean_b", "diff"]].tolist() == [0, 0, 0]


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("positions", [None, "position_role = 'last' AND triggered"])
def test_feature_density_matches_numpy(truth: Truth, cache, positions):
    meta = truth.rows(RUN)
    keep = np.ones(meta["row"].size, bool)
    if positions:
        keep = (meta["role"] == "last") & meta["triggered"].astype(bool)
    X = truth.dense[RUN][keep].astype(np.float64)
    res = q.run_named(
        truth.store, "feature_density", run=RUN, sae="sae", positions=positions, cache=cache
    )
    df = res.df()
    assert df["feature"].tolist() == list(range(F))
    assert (df["n_tokens"] == keep.sum()).all()
    np.testing.assert_array_equal(df["n_fired"], (X != 0).sum(0))
    close(col(res, "freq"), (X != 0).mean(0))
    close(col(res, "mean"), X.mean(0))
    close(col(res, "max"), X.max(0))
    with np.errstate(invalid="ignore"):
        close(col(res, "mean_active"), X.sum(0) / (X != 0).sum(0))
    never = df[df.feature == 63].iloc[0]
    assert never["mean"] == 0.0 and never["freq"] == 0.0 and never["max"] == 0.0


# -- top_activations ----------------------------------------------------------------------


def test_top_activations_matches_sorted_values_with_context(truth: Truth):
    entries = []
    for run in ("base/p", "ft/p"):
        meta = truth.rows(run)
        for i, v in enumerate(truth.dense[run][:, 17]):
            if v:
                entries.append(
                    (-float(v), run, int(meta["prompt_idx"][i]), int(meta["position"][i]))
                )
    entries.sort()
    df = q.run_named(truth.store, "top_activations", sae="sae", feature=17, k=7, width=2).df()
    assert df["rank"].tolist() == list(range(1, 8))
    np.testing.assert_allclose(df["value"], [-e[0] for e in entries[:7]], rtol=1e-6)
    assert list(zip(df["run"], df["prompt_idx"], df["position"], strict=True)) == [
        e[1:] for e in entries[:7]
    ]
    tok = truth.tokens["base/p"]
    for _, r in df.iterrows():
        in_prompt = tok["prompt_idx"] == r["prompt_idx"]
        words = {
            int(p): f"w{t}"
            for p, t in zip(tok["position"][in_prompt], tok["token_id"][in_prompt], strict=True)
        }
        pos = int(r["position"])
        assert r["token"] == words[pos]
        assert list(r["left_tokens"]) == [words[p] for p in range(pos - 2, pos) if p in words]
        assert list(r["right_tokens"]) == [words[p] for p in range(pos + 1, pos + 3) if p in words]
        assert f"[[{words[pos]}]]" in r["context"]


def test_top_activations_one_run_and_positions(truth: Truth):
    meta = truth.rows("ft/p")
    vals = np.where(meta["role"] == "last", truth.dense["ft/p"][:, 17], 0)
    order = np.argsort(-vals, kind="stable")[:3]
    for cache in (False, True):
        df = q.run_named(
            truth.store,
            "top_activations",
            sae="sae",
            feature=17,
            k=3,
            run="ft/p",
            positions="position_role = 'last'",
            cache=cache,
        ).df()
        assert set(df["run"]) == {"ft/p"}
        np.testing.assert_allclose(df["value"], vals[order], rtol=1e-6)
        assert df["prompt_idx"].tolist() == meta["prompt_idx"][order].tolist()


# -- the macros --------------------------------------------------------------------------


MACRO_CASES = [
    (
        "trigger_diff",
        "trigger_diff(?, ?, ?, positions := ?)",
        {"run": RUN, "sae": "sae", "group_a": "triggered", "positions": "position > 1"},
    ),
    (
        "trigger_diff",
        "trigger_diff_paired(?, ?, ?, ?, rank_by := 'p')",
        {"run": RUN, "sae": "sae", "group_a": "triggered", "pair": "pair_id", "rank_by": "p"},
    ),
    (
        "feature_reward_corr",
        "feature_reward_corr(?, ?, ?, aggregate := 'max')",
        {"run": RUN, "sae": "sae", "label": "reward", "aggregate": "max"},
    ),
    (
        "checkpoint_diff",
        "checkpoint_diff(?, ?, ?)",
        {"run_a": "base/p", "run_b": "ft/p", "sae": "sae"},
    ),
    (
        "feature_density",
        "feature_density(?, ?, positions := ?)",
        {"run": RUN, "sae": "sae", "positions": "position_role = 'last'"},
    ),
    (
        "top_activations",
        "top_activations(?, ?, k := 4, run := ?)",
        {"sae": "sae", "feature": 17, "k": 4, "run": RUN},
    ),
]


@pytest.mark.parametrize(("name", "call", "params"), MACRO_CASES)
def test_macros_equal_run_named(truth: Truth, name, call, params):
    args = [v for k, v in params.items() if k not in ("rank_by", "aggregate", "k")]
    via_sql = truth.store.sql(f"SELECT * FROM {call}", args).df()
    via_py = q.run_named(truth.store, name, **params).df()
    assert list(via_sql.columns) == list(via_py.columns)
    for c in via_py.columns:
        if via_py[c].dtype.kind == "f":
            np.testing.assert_allclose(via_sql[c], via_py[c], rtol=1e-12, equal_nan=True)
        else:
            assert via_sql[c].astype(str).tolist() == via_py[c].astype(str).tolist()


def test_macro_errors_name_the_valid_choices(truth: Truth):
    with pytest.raises(InputError, match=r"run 'nope' not in the store; runs: base/p, ft/p"):
        truth.store.sql("SELECT * FROM feature_density('nope', 'sae')")
    with pytest.raises(InputError, match=r"SAE 'x' not in the store; SAEs: sae, other"):
        truth.store.sql("SELECT * FROM trigger_diff('base/p', 'x', 'triggered')")
    with pytest.raises(InputError, match="group A selects no stored token"):
        truth.store.sql("SELECT * FROM trigger_diff('base/p', 'sae', 'false')")


# -- registry and errors ---------------------------------------------------------------------


def test_registry_describes_every_query_and_its_macros_exist(truth: Truth):
    named = q.list_named()
    assert [n.name for n in named] == [
        "trigger_diff",
        "top_activations",
        "feature_reward_corr",
        "checkpoint_diff",
        "feature_density",
    ]
    funcs = {
        r[0] for r in truth.store.sql("SELECT function_name FROM duckdb_functions()").fetchall()
    }
    for n in named:
        assert n.description and n.example.startswith("actstore query STORE " + n.name)
        assert all(p.description and p.type in q.named.PARAM_TYPES for p in n.params)
        json.dumps(n.to_dict())
        for m in n.macros:
            assert m.split("(")[0] in funcs
    assert {"project", "act_norm", "auroc", "t_pvalue"} <= funcs


def test_cli_strings_are_converted(truth: Truth):
    a = q.run_named(truth.store, "top_activations", sae="sae", feature="17", k="2").df()
    assert len(a) == 2


@pytest.mark.parametrize(
    ("name", "params", "error", "match"),
    [
        ("nope", {}, NotFoundError, r"no named query 'nope'; named queries: \['trigger_diff'"),
        (
            "feature_density",
            {"run": RUN, "sae": "sae", "colour": 1},
            InputError,
            r"unknown parameter\(s\) \['colour'\]; its parameters are \['run', 'sae', 'positions'\]",
        ),
        ("feature_density", {"run": RUN}, InputError, "parameter 'sae' is required"),
        (
            "top_activations",
            {"sae": "sae", "feature": "x"},
            InputError,
            "parameter 'feature' must be an integer",
        ),
        (
            "trigger_diff",
            {"run": RUN, "sae": "sae", "group_a": "triggered", "rank_by": "q"},
            InputError,
            r"parameter 'rank_by' must be one of \['t', 'p'\]",
        ),
        (
            "feature_density",
            {"run": "nope", "sae": "sae"},
            RunNotFoundError,
            r"run 'nope' not in store .*; runs: \['base/p', 'ft/p', 'f32/p'\]",
        ),
        (
            "feature_density",
            {"run": RUN, "sae": "nope"},
            NotFoundError,
            r"SAE 'nope' not in store .*; SAEs: \['sae', 'other'\]",
        ),
        (
            "feature_density",
            {"run": RUN, "sae": "other"},
            NotFoundError,
            r"run 'base/p' has no features of SAE 'other'; runs with them: none",
        ),
        (
            "feature_density",
            {"run": "f32/p", "sae": "sae"},
            NotFoundError,
            r"runs with them: \['base/p', 'ft/p'\]",
        ),
        (
            "trigger_diff",
            {"run": RUN, "sae": "sae", "group_a": "trigered"},
            NotFoundError,
            r"group_a 'trigered' is not a column of labeled_tokens; columns: \[.*'triggered'",
        ),
        (
            "trigger_diff",
            {"run": RUN, "sae": "sae", "group_a": "reward"},
            InputError,
            r"group_a 'reward' is DOUBLE, expected a boolean predicate",
        ),
        (
            "trigger_diff",
            {"run": RUN, "sae": "sae", "group_a": "triggered AND"},
            InputError,
            r"group_a 'triggered AND' is not one SQL expression",
        ),
        (
            "trigger_diff",
            {"run": RUN, "sae": "sae", "group_a": "triggered", "pair": "pear"},
            NotFoundError,
            r"pair 'pear' is not a column of labeled_tokens",
        ),
        (
            "trigger_diff",
            {"run": RUN, "sae": "sae", "group_a": "position < 0"},
            InputError,
            "trigger_diff: group A selects no stored token",
        ),
        (
            "trigger_diff",
            {"run": RUN, "sae": "sae", "group_a": "triggered", "pair": "prompt_idx"},
            InputError,
            "no pair has selected tokens in both groups",
        ),
        (
            "feature_reward_corr",
            {"run": RUN, "sae": "sae", "label": "text"},
            InputError,
            r"label 'text' is VARCHAR, expected a numeric label",
        ),
        (
            "feature_reward_corr",
            {"run": RUN, "sae": "sae", "label": "reward", "positions": "prompt_idx < 2"},
            InputError,
            "fewer than 3 prompts",
        ),
        (
            "top_activations",
            {"sae": "sae", "feature": 64},
            InputError,
            r"feature 64 is outside SAE 'sae' \(0-63\)",
        ),
        ("top_activations", {"sae": "sae", "feature": 1, "k": 0}, InputError, "k must be >= 1"),
        (
            "checkpoint_diff",
            {"run_a": RUN, "run_b": RUN, "sae": "sae", "positions": "false"},
            InputError,
            "no stored token in one of the runs",
        ),
    ],
)
def test_errors_say_what_is_valid(truth: Truth, name, params, error, match):
    with pytest.raises(error, match=match):
        q.run_named(truth.store, name, **params)


def test_bad_cache_policy(truth: Truth):
    with pytest.raises(InputError, match=r"cache must be one of \['auto', True, False\]"):
        q.run_named(truth.store, "feature_density", run=RUN, sae="sae", cache="yes")


def test_json_typed_cli_values_are_accepted(truth: Truth):
    # `--param group_b=false` and `--param run=1` arrive parsed as JSON
    with pytest.raises(InputError, match="group B selects no stored token"):
        q.run_named(
            truth.store, "trigger_diff", run=1, sae="sae", group_a="triggered", group_b=False
        )
    with pytest.raises(InputError, match=r"parameter 'sae' must be a non-empty string, not \[1\]"):
        q.run_named(truth.store, "feature_density", run=RUN, sae=[1])


def test_query_params_are_validated_on_construction():
    from actstore.errors import SpecError

    with pytest.raises(SpecError, match=r"type 'float' not in \('run'"):
        q.QueryParam("x", "float", "a number")
    with pytest.raises(SpecError, match="a choice needs choices, including its default"):
        q.QueryParam("x", "choice", "pick", default="c", choices=("a", "b"))


def test_a_session_made_before_the_import_gets_the_queries(tmp_path):
    import actstore
    from actstore.store import session as _session

    _session._EXTENSIONS.remove(q.install)
    try:
        st = actstore.open(tmp_path / "s", create=True)
        st.sql("SELECT 1")  # the session exists, without the extension
        with pytest.raises(InputError, match="trigger_diff"):
            st.sql("SELECT * FROM trigger_diff('r', 's', 'true')")
        with pytest.raises(RunNotFoundError, match="runs: none yet"):
            q.run_named(st, "feature_density", run="r", sae="s")
        # installed by run_named; DuckDB may check either name first
        with pytest.raises(InputError, match=r"(run 'r'|SAE 's') not in the store"):
            st.sql("SELECT * FROM feature_density('r', 's')")
    finally:
        _session.register_extension(q.install)
