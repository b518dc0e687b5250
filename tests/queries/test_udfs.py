"""Arrays inside SQL: project(), act_norm() and auroc() against numpy and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from actstore.errors import InputError
from actstore.queries.stats import auroc_lists, t_pvalue
from tests.queries.conftest import HOOK16, HOOK32, Truth


@pytest.mark.parametrize(
    ("run", "hook", "acts"), [("base/p", HOOK16, "acts16"), ("f32/p", HOOK32, "acts32")]
)
def test_project_and_act_norm_match_numpy(truth: Truth, run, hook, acts):
    X = getattr(truth, acts)[run].astype(np.float64)
    df = truth.store.sql(
        """SELECT "row", project(run, $hook, "row", 'dir') AS proj, act_norm(run, $hook, "row") AS norm
           FROM labeled_tokens WHERE run = $run ORDER BY prompt_idx, position""",
        {"hook": hook, "run": run},
    ).df()
    stored = df["row"].notna()
    assert (~stored).sum() == 48  # the first token of each prompt is not stored: NULL
    assert df.loc[~stored, "proj"].isna().all() and df.loc[~stored, "norm"].isna().all()
    rows = df.loc[stored, "row"].astype(int).to_numpy()
    np.testing.assert_allclose(
        df.loc[stored, "proj"], X[rows] @ truth.direction, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(df.loc[stored, "norm"], np.linalg.norm(X[rows], axis=1), rtol=1e-6)


def test_project_groups_rows_of_several_runs_in_one_batch(truth: Truth):
    df = truth.store.sql(
        """SELECT run, "row", project(run, $h, "row", 'dir') AS proj FROM labeled_tokens
           WHERE run IN ('base/p', 'ft/p') AND "row" IS NOT NULL ORDER BY "row" DESC, run""",
        {"h": HOOK16},
    ).df()
    for run in ("base/p", "ft/p"):
        part = df[df.run == run]
        X = truth.acts16[run].astype(np.float64)[part["row"].to_numpy()]
        np.testing.assert_allclose(part["proj"], X @ truth.direction, rtol=1e-5, atol=1e-5)


def test_auroc_of_a_projection_is_one_query(truth: Truth):
    run = "base/p"
    res = truth.store.sql(
        """SELECT position_role, auroc(project(run, $h, "row", 'dir'), triggered) AS auc,
                  list(project(run, $h, "row", 'dir') ORDER BY "row") AS s,
                  list(triggered ORDER BY "row") AS y
           FROM labeled_tokens WHERE run = $run AND "row" IS NOT NULL
           GROUP BY position_role ORDER BY position_role""",
        {"h": HOOK16, "run": run},
    ).fetchall()
    assert [r[0] for r in res] == ["last", "prompt"]
    for _, auc, s, y in res:
        assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_handles_ties_nulls_and_one_class():
    s = [0.1, 0.5, 0.5, 0.9, None, 0.3]
    y = [False, True, False, True, True, None]
    assert auroc_lists(s, y) == pytest.approx(roc_auc_score([0, 1, 0, 1], [0.1, 0.5, 0.5, 0.9]))
    assert auroc_lists([0.1, 0.2], [True, True]) is None


def test_t_pvalue_matches_scipy():
    t = np.array([0.0, 1.5, -2.5, 40.0, np.inf, np.nan])
    df = np.array([3.0, 10.0, 100.5, 7.0, 2.0, 5.0])
    expected = 2 * stats.t.sf(np.abs(t), df)
    expected[4] = 0.0
    np.testing.assert_allclose(t_pvalue(t, df), expected, rtol=1e-10, equal_nan=True)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        (
            "SELECT project('base/p', 'blocks.9.hook_x', 1, 'dir')",
            r"hook 'blocks.9.hook_x' not in run 'base/p'; it has \['blocks.0.hook_resid_post'\]",
        ),
        ("SELECT act_norm('nope', 'h', 1)", r"run 'nope' not in the store; runs: \['base/p'"),
        (
            "SELECT project('base/p', 'blocks.0.hook_resid_post', 1, 'nodir')",
            r"direction 'nodir' not in the store; stored directions: \['dir', 'wide'\]",
        ),
        (
            "SELECT project('base/p', 'blocks.0.hook_resid_post', 1, 'wide')",
            "direction 'wide' has 17 dimensions but hook 'blocks.0.hook_resid_post'",
        ),
        (
            "SELECT act_norm('base/p', 'blocks.0.hook_resid_post', 100000)",
            r"row 100000 is not a committed row of run 'base/p'",
        ),
    ],
)
def test_array_function_errors_list_valid_names(truth: Truth, sql, match):
    with pytest.raises(InputError, match=match):
        truth.store.sql(sql)
