"""Attribution patching on the demo's backdoored model, against autograd through plain hooks.

Each estimate is ``(a_source - a_target) . grad``; the reference is the derivative
of the metric along that difference, ``d/d eps metric(a_target + eps * delta)``,
taken by autograd through a plain forward pre-hook, with the activations captured
by plain hooks too. SAE terms are checked against sae_lens' own ``encode`` and
``W_dec``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore.errors import InputError, NotFoundError
from actstore.patching.attribution import attribute, compare_to_grid, load_attribution
from tests.patching.conftest import SAE_HOOK
from tests.patching.helpers import Direct


@pytest.fixture(scope="module")
def attrib(grid_store, patch_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    """The grid store with an attribution over every resid_pre hook and the SAE's hook."""
    st, grid, _ = grid_store
    res = attribute(
        st,
        run="backdoored/pairs",
        hooks=["blocks.*.hook_resid_pre", SAE_HOOK],
        saes=["l2"],
        name="attrib",
    )
    return st, grid, res


def _pairs(rows: list[dict[str, Any]]) -> dict[int, dict[bool, dict[str, Any]]]:
    out: dict[int, dict[bool, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["pair_id"], {})[r["triggered"]] = r
    return out


def test_estimates_are_directional_derivatives(attrib, patch_env) -> None:
    st, _, res = attrib
    direct = Direct(patch_env["family"]["backdoored"])
    pairs = _pairs(patch_env["rows"])
    cells = res.cells().df()
    cells = cells[(cells["counterpart"] == "matched") & cells["hook"].str.endswith("resid_pre")]
    m_t = {
        r["pair"]: r["metric_target"]
        for r in st.sql(
            "SELECT pair, metric_target FROM patch_pairs WHERE analysis_id = ?", [res.analysis_id]
        )
        .arrow()
        .to_pylist()
    }
    good = direct.token("I")
    rng = np.random.default_rng(1)
    for _, c in cells.iloc[rng.choice(len(cells), 12, replace=False)].iterrows():
        clean, trig = pairs[int(c["pair"])][False], pairs[int(c["pair"])][True]
        bad = direct.token(clean["answer"])
        layer, t, s = int(c["layer"]), int(c["position"]), int(c["source_position"])
        delta = (
            direct.resid_pre(trig["prompt"], layer)[s] - direct.resid_pre(clean["prompt"], layer)[t]
        )
        want = direct.directional_derivative(clean["prompt"], good, bad, layer, t, delta)
        assert c["value"] - m_t[c["pair"]] == pytest.approx(want, abs=1e-3, rel=1e-4)


def test_attribution_tracks_exact_patching(attrib) -> None:
    st, grid, _ = attrib
    r = compare_to_grid(st, "attrib", "grid").df()
    overall = r[r["layer"].isna()].iloc[0]
    assert overall["n_cells"] == grid.n_cells
    by_layer = r.dropna(subset=["layer"]).set_index("layer")["pearson_r"]
    # near-linear where the behaviour is read out (the last token, late layers)
    assert by_layer[2] > 0.95 and by_layer[3] > 0.95
    assert overall["pearson_r"] > 0.5
    print("\nattribution vs exact patching, Pearson r:\n", r.to_string())


def test_feature_terms_sum_to_the_hook_effect_and_use_sae_lens_values(attrib, patch_env) -> None:
    from sae_lens import SAE

    st, _, res = attrib
    feats = res.features().df()
    cells = res.cells().df()
    hook_cells = cells[(cells["hook"] == SAE_HOOK) & (cells["counterpart"] == "matched")]
    m_t = dict(
        st.sql(
            "SELECT pair, metric_target FROM patch_pairs WHERE analysis_id = ?", [res.analysis_id]
        ).fetchall()
    )
    total = feats.groupby(["pair", "position"])["effect"].sum()
    for _, c in hook_cells.iterrows():
        assert total[(c["pair"], c["position"])] == pytest.approx(
            c["value"] - m_t[c["pair"]], abs=1e-6
        )
    assert set(feats["term"]) == {"feature", "error"}
    assert feats[feats["term"] == "error"]["feature"].isna().all()
    # the stored feature values are sae_lens' encode of the target's activations
    sae = SAE.load_from_disk(str(patch_env["sae"]))
    direct = Direct(patch_env["family"]["backdoored"])
    pairs = _pairs(patch_env["rows"])
    key = feats["pair"].iloc[0]
    clean = pairs[int(key)][False]
    x_SD = direct.resid_post(clean["prompt"], 2)
    with torch.no_grad():
        f_SF = sae.encode(x_SD)
    mine = feats[(feats["pair"] == key) & (feats["term"] == "feature")]
    for _, f in mine.iterrows():
        assert f["f_target"] == pytest.approx(
            float(f_SF[int(f["position"]), int(f["feature"])]), abs=1e-5
        )
    # and one feature's effect is (f_s - f_t) * (W_dec_i . grad), grad by autograd through hooks
    good, bad = direct.token("I"), direct.token(clean["answer"])
    f = mine.iloc[int(np.argmax(np.abs(mine["effect"].to_numpy())))]
    delta = (f["f_source"] - f["f_target"]) * sae.W_dec[int(f["feature"])].detach()
    want = direct.directional_derivative(clean["prompt"], good, bad, 3, int(f["position"]), delta)
    assert f["effect"] == pytest.approx(want, abs=1e-4, rel=1e-4)


def test_top_features_is_a_query(attrib) -> None:
    st, _, res = attrib
    top = res.top_features(5).df()
    assert len(top) == 5
    assert (top["mean_metric"].abs().diff().dropna() <= 1e-12).all()
    again = st.sql(
        """SELECT feature, sum(metric) / 8 AS m FROM attrib_features
           WHERE name = 'attrib' AND term = 'feature' GROUP BY feature
           ORDER BY abs(m) DESC LIMIT 1"""
    ).fetchall()[0]
    best = top[top["term"] == "feature"].iloc[0]
    assert int(best["feature"]) == again[0] and best["mean_metric"] == pytest.approx(again[1])
    assert load_attribution(st, "attrib").analysis_id == res.analysis_id


def test_attribution_in_chunks_of_pairs_is_the_same(
    store_copy: actstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(
        run="backdoored/pairs",
        hooks=["blocks.1.hook_resid_pre", SAE_HOOK],
        saes=["l2"],
        where="pair_id < 3",
    )
    whole = attribute(store_copy, name="whole", **kw)
    monkeypatch.setattr("actstore.patching.grid.PAIR_CHUNK", 1)
    parts = attribute(store_copy, name="parts", batch_size=2, **kw)
    for a, b in (
        (whole.cells().df(), parts.cells().df()),
        (whole.features().df(), parts.features().df()),
    ):
        assert len(a) == len(b) > 0
        col = "value" if "value" in a else "effect"
        np.testing.assert_allclose(
            a[col].to_numpy(float), b[col].to_numpy(float), atol=1e-5, equal_nan=True
        )


def test_attribution_refuses_bad_saes_before_writing(store_copy: actstore.Store) -> None:
    with pytest.raises(NotFoundError, match="stored SAEs"):
        attribute(store_copy, run="backdoored/pairs", saes=["nope"])
    with pytest.raises(InputError, match="batch_size"):
        attribute(store_copy, run="backdoored/pairs", batch_size=0)
    with pytest.raises(NotFoundError, match="no stored attribution"):
        compare_to_grid(store_copy, "x", "y")
    (n,) = store_copy.sql("SELECT count(*) FROM analyses").fetchall()[0]
    assert n == 0
