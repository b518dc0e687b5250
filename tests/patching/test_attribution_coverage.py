"""Attribution with SAEs encoded after the ingest: subsets of rows, interrupted encodes.

The SAE is the sae_lens SAE the session store captured at ingest (``l2``), encoded
again with ``actstore encode`` (positions-restricted, or killed part-way). A row
that was not encoded has no features, not zero features: attributing it is
refused before any model runs, leaving the store byte-identical. Over the encoded
rows, the terms equal those of the features captured at ingest (sae_lens' encode
of the model's activations).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
from actstore.errors import InputError, NotFoundError
from actstore.ingest.encode import encode
from actstore.patching.attribution import attribute
from tests.patching.conftest import SAE_HOOK

LAST = "position_role = 'last'"
RUN = "backdoored/pairs"


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".write.lock"
    }


def test_attribution_refuses_rows_not_encoded_and_matches_ingest_on_encoded_ones(
    store_copy: actstore.Store, patch_env: dict[str, Any]
) -> None:
    st, root = store_copy, Path(store_copy.root)
    encode(st, str(patch_env["sae"]), name="last", positions=LAST)
    kw: dict[str, Any] = {"run": RUN, "hooks": [SAE_HOOK], "where": "pair_id < 4"}
    before = _digest(root)
    with pytest.raises(
        InputError, match=r"attribute: \d+ of the selected rows of run \d+ have no features of SAE"
    ):
        attribute(st, saes=["last"], **kw)
    assert _digest(root) == before
    got = attribute(st, saes=["last"], positions=LAST, name="enc", **kw).features().df()
    want = attribute(st, saes=["l2"], positions=LAST, name="ing", **kw).features().df()
    key = ["pair", "position", "term", "feature"]
    got = got.sort_values(key, na_position="last").reset_index(drop=True)
    want = want.sort_values(key, na_position="last").reset_index(drop=True)
    assert len(got) == len(want) > 8 and set(got["position"]) == set(want["position"])
    assert (got[key[:3]] == want[key[:3]]).all().all()
    for col in ("f_target", "f_source", "effect"):
        np.testing.assert_allclose(
            got[col].to_numpy(float), want[col].to_numpy(float), atol=1e-5, equal_nan=True
        )


def test_attribution_refuses_an_interrupted_encode(
    store_copy: actstore.Store, patch_env: dict[str, Any]
) -> None:
    st, root = store_copy, Path(store_copy.root)

    def die(row: int) -> None:
        if row >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode(st, str(patch_env["sae"]), name="cut", runs=[RUN], part_rows=16, _before_commit=die)
    before = _digest(root)
    with pytest.raises(
        NotFoundError,
        match=rf"attribute: run '{RUN}' has features of SAE 'cut' for 32 of its \d+ rows .*"
        rf"interrupted\); finish it with `actstore encode .* --sae cut --run {RUN}`",
    ):
        attribute(st, run=RUN, hooks=[SAE_HOOK], saes=["cut"], where="pair_id < 2")
    assert _digest(root) == before
