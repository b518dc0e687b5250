"""Faithfulness of SAE feature sets on the demo's backdoored model, against plain hooks + sae_lens."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import actstore
from actstore.errors import InputError, NotFoundError
from actstore.patching import attribute
from actstore.patching.faithfulness import faithfulness
from tests.patching.conftest import SAE_HOOK
from tests.patching.helpers import Direct


def _direct_mean(
    direct: Direct,
    sae: Any,
    texts: list[tuple[str, str]],
    keep: torch.Tensor | None,
    with_error: bool,
) -> float:
    """Mean logit_diff(I, answer) with layer 2's output rewritten by sae_lens' encode/decode."""
    good = direct.token("I")
    total = 0.0
    for text, answer in texts:

        def post(_m: Any, _a: Any, out: Any) -> Any:
            x = out[0] if isinstance(out, tuple) else out
            f = sae.encode(x)
            kept = sae.decode(f * keep) if keep is not None else sae.decode(f)
            new = kept + (x - sae.decode(f)) if with_error else kept
            return (new, *out[1:]) if isinstance(out, tuple) else new

        h = direct.model.model.layers[2].register_forward_hook(post) if keep is not None else None
        try:
            with torch.no_grad():
                logits = direct.model(direct.ids(text)).logits[0, -1]
        finally:
            if h is not None:
                h.remove()
        total += float(logits[good] - logits[direct.token(answer)])
    return total / len(texts)


def test_faithfulness_ends_and_a_chosen_set(store_copy: actstore.Store, patch_env) -> None:
    from sae_lens import SAE

    res = faithfulness(
        store_copy,
        run="backdoored/pairs",
        sae="l2",
        features=[3, 7, 11],
        where="triggered AND pair_id < 4",
    ).df()
    by = {(r["feature_set"], r["include_error"]): r for _, r in res.iterrows()}
    assert by[("model", True)]["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert by[("empty", False)]["faithfulness"] == pytest.approx(0.0, abs=1e-9)
    assert set(res["hook"]) == {SAE_HOOK}
    direct = Direct(patch_env["family"]["backdoored"])
    sae = SAE.load_from_disk(str(patch_env["sae"]))
    texts = [
        (r["prompt"], r["answer"]) for r in patch_env["rows"] if r["triggered"] and r["pair_id"] < 4
    ]
    keep = torch.zeros(sae.cfg.d_sae)
    keep[[3, 7, 11]] = 1
    m_model = _direct_mean(direct, sae, texts, None, True)
    m_empty = _direct_mean(direct, sae, texts, torch.zeros(sae.cfg.d_sae), False)
    for with_error in (True, False):
        m = _direct_mean(direct, sae, texts, keep, with_error)
        row = by[("chosen", with_error)]
        assert row["metric"] == pytest.approx(m, abs=1e-4)
        assert row["faithfulness"] == pytest.approx((m - m_empty) / (m_model - m_empty), abs=1e-4)
    assert list(by[("chosen", True)]["features"]) == [3, 7, 11]
    (kind,) = store_copy.sql("SELECT kind FROM analyses").fetchall()[0]
    assert kind == "faithfulness"


def test_faithfulness_of_top_attributed_features(store_copy: actstore.Store) -> None:
    attribute(
        store_copy,
        run="backdoored/pairs",
        hooks=SAE_HOOK,
        saes=["l2"],
        where="pair_id < 3",
        name="a",
    )
    res = faithfulness(
        store_copy,
        run="backdoored/pairs",
        sae="l2",
        from_attribution="a",
        sizes=(1, 4, 1000),
        where="triggered AND pair_id < 3",
    ).df()
    tops = res[res["feature_set"].str.startswith("top")]
    (best,) = store_copy.sql(
        """SELECT feature FROM attrib_features WHERE name = 'a' AND term = 'feature'
           GROUP BY feature ORDER BY abs(sum(metric)) DESC LIMIT 1"""
    ).fetchall()[0]
    top1 = tops[tops["n_features"] == 1]
    assert len(top1) == 2 and all(list(f) == [best] for f in top1["features"])
    assert list(tops["n_features"])[:4] == [1, 1, 4, 4]
    # asked for 1000, given every ranked feature: at most the SAE's 48
    assert 4 < tops["n_features"].max() <= 48


def test_faithfulness_refusals(store_copy: actstore.Store) -> None:
    with pytest.raises(InputError, match="either features= or from_attribution="):
        faithfulness(store_copy, run="backdoored/pairs", sae="l2")
    with pytest.raises(InputError, match="outside 0-47"):
        faithfulness(store_copy, run="backdoored/pairs", sae="l2", features=[48])
    with pytest.raises(NotFoundError, match="no stored attribution"):
        faithfulness(store_copy, run="backdoored/pairs", sae="l2", from_attribution="nope")
    with pytest.raises(NotFoundError, match="stored SAEs"):
        faithfulness(store_copy, run="backdoored/pairs", sae="x", features=[1])
    (n,) = store_copy.sql("SELECT count(*) FROM analyses").fetchall()[0]
    assert n == 0
