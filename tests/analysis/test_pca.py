"""PCA against a float64 SVD of the same rows, streamed in blocks, exact and randomized."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from actstore.analysis import load_direction, pca
from actstore.analysis import rows as rows_mod
from actstore.errors import HookNotFoundError, InputError, SpecError
from tests.analysis.conftest import LOW_RANK_3D

H2 = "blocks.2.hook_resid_post"


def reference(X: np.ndarray, k: int, center: bool = True):
    Xc = X - X.mean(axis=0) if center else X
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    denom = X.shape[0] - 1 if center else X.shape[0]
    total = (Xc**2).sum() / denom
    return Vt[:k], s[:k] ** 2 / denom, s[:k] ** 2 / denom / total


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_matches_float64_svd(synth, method):
    st = synth.store
    X = st.acts("base", H2).numpy(np.float64)
    V, ev, ratio = reference(X, 3)
    res = pca(st, run="base", hooks=H2, k=3, method=method, block_rows=64, save=False)
    fit = res.fit()
    assert fit.method == method
    assert subspace_angles(V.T, fit.components.T).max() < 1e-4
    np.testing.assert_allclose(fit.explained_variance, ev, rtol=1e-6)
    np.testing.assert_allclose(fit.explained_variance_ratio, ratio, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(fit.components * V, axis=1)), 1.0, atol=1e-6)
    # projections: centred rows on the components, aligned with the metadata
    proj = res.projections(columns=["row", "prompt_idx"])
    np.testing.assert_array_equal(proj.column("row").to_numpy(), np.arange(X.shape[0]))
    want = (X - X.mean(0)) @ fit.components.T
    np.testing.assert_allclose(
        np.column_stack([proj.column(f"pc{i}").to_numpy() for i in range(3)]), want, atol=1e-8
    )


def test_recovers_planted_subspace(synth):
    res = pca(synth.store, run="base", hooks=H2, k=3, save=False)
    assert subspace_angles(LOW_RANK_3D.T, res.components.T).max() < 0.3
    assert res.explained_variance_ratio[:3].sum() > 0.7


def test_uncentred_and_where(synth32):
    st = synth32.store
    X = st.acts("base", H2, where="position_role = 'last'").numpy(np.float64)
    V, ev, ratio = reference(X, 2, center=False)
    res = pca(
        st, run="base", hooks=H2, where="position_role = 'last'", k=2, center=False, save=False
    )
    assert res.fit().n == X.shape[0] == 80
    assert subspace_angles(V.T, res.components.T).max() < 1e-6
    np.testing.assert_allclose(res.fit().explained_variance, ev, rtol=1e-8)
    np.testing.assert_allclose(res.explained_variance_ratio, ratio, rtol=1e-8)


def test_concat_and_separate_hooks(synth32):
    st = synth32.store
    hooks = ["blocks.1.hook_resid_post", H2]
    X = np.hstack([st.acts("base", h).numpy(np.float64) for h in hooks])
    V, _, _ = reference(X, 4)
    res = pca(st, run="base", hooks=hooks, k=4, combine="concat", save=False)
    assert list(res.fits) == ["blocks.1.hook_resid_post+blocks.2.hook_resid_post"]
    assert res.components.shape == (4, 32)
    assert subspace_angles(V.T, res.components.T).max() < 1e-6
    sep = pca(st, run="base", hooks="blocks.*.hook_resid_post", k=2, save=False)
    assert list(sep.fits) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    with pytest.raises(SpecError, match="several fits"):
        _ = sep.components


def test_block_size_does_not_change_result_and_bounds_reads(synth32, monkeypatch):
    st = synth32.store
    seen: list[int] = []
    real = rows_mod._arrays.read_rows

    def spy(arr, rows, **kw):
        seen.append(len(rows))
        return real(arr, rows, **kw)

    monkeypatch.setattr(rows_mod._arrays, "read_rows", spy)
    small = pca(st, run="base", hooks=H2, k=3, block_rows=37, save=False)
    assert max(seen) <= 37 and len(seen) > synth32.n_rows // 37
    seen.clear()
    rnd = pca(st, run="base", hooks=H2, k=3, method="randomized", block_rows=50, save=False)
    assert max(seen) <= 50
    big = pca(st, run="base", hooks=H2, k=3, block_rows=10_000, save=False)
    np.testing.assert_allclose(small.components, big.components, atol=1e-10)
    np.testing.assert_allclose(small.fit().explained_variance, big.fit().explained_variance)
    assert subspace_angles(rnd.components.T, big.components.T).max() < 1e-4


def test_auto_switches_to_randomized(synth32):
    res = pca(synth32.store, run="base", hooks=H2, k=2, exact_max_d=8, save=False)
    assert res.fit().method == "randomized"


def test_saves_analysis_and_directions(synth32):
    st = synth32.store
    res = pca(st, run="base", hooks=H2, k=2, name="pca_test")
    assert res.analysis_id is not None
    rec = st.sql("SELECT kind, provenance FROM analyses WHERE analysis_id = ?", [res.analysis_id])
    kind, prov = rec.fetchone()
    assert kind == "pca" and '"n_rows": ' in prov and '"run_ids": [1]' in prov
    d = load_direction(st, f"pca_test/pc0/{H2}")
    np.testing.assert_allclose(d.vector, res.components[0])
    assert d.method == "pca" and d.analysis_id == res.analysis_id and d.hook == H2
    mean = load_direction(st, f"pca_test/mean/{H2}")
    np.testing.assert_allclose(mean.vector, st.acts("base", H2).numpy(np.float64).mean(0))
    with pytest.raises(InputError, match="already exist"):
        pca(st, run="base", hooks=H2, k=2, name="pca_test")
    pca(st, run="base", hooks=H2, k=2, name="pca_test", replace=True)
    s = res.summary().to_pylist()
    assert s[0]["direction"] == f"pca_test/pc0/{H2}" and s[1]["cumulative"] > s[0]["ratio"]


def test_errors(synth32):
    st = synth32.store
    with pytest.raises(HookNotFoundError, match="it has"):
        pca(st, run="base", hooks="blocks.9.hook_resid_post", save=False)
    with pytest.raises(HookNotFoundError, match="matches no hook"):
        pca(st, run="base", hooks="blocks.*.hook_mlp_out", save=False)
    with pytest.raises(InputError, match="selects 0 rows"):
        pca(st, run="base", hooks=H2, where="prompt_idx < 0", save=False)
    with pytest.raises(SpecError, match="exceeds the width"):
        pca(st, run="base", hooks=H2, k=17, save=False)
    with pytest.raises(SpecError, match="combine"):
        pca(st, run="base", hooks=H2, combine="stack", save=False)  # type: ignore[arg-type]
