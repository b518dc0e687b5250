"""The shared suite every registered edit kind passes.

Each kind has an example op and an independent numpy computation of what it does
to the hook's activations. For every kind and every positions choice, the tiny
model is run over stored prompts (with completions, left-padded) with and without
the edit; the edited hook values must equal the numpy computation at the selected
tokens and be unchanged elsewhere. A kind added to the registry without an
example here fails :func:`test_every_kind_has_an_example`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore.edits import KINDS, EditOp, EditSpec, apply_edit, resolve_edit
from actstore.errors import SpecError
from actstore.ingest.hooks import run_capture
from tests.edits.helpers import HOOK, batch_context

SOURCE = "ft/pairs"
FEATURES = [1, 5, 9, 20]

EXAMPLES: dict[str, dict[str, Any]] = {
    "ablate_direction": {"kind": "ablate_direction", "direction": "dir_a"},
    "steer": {"kind": "steer", "hook": HOOK, "direction": "dir_a", "alpha": -2.5},
    "ablate_subspace": {"kind": "ablate_subspace", "directions": ["dir_a", "dir_b", "dir_c"]},
    "project_subspace": {
        "kind": "project_subspace",
        "hook": HOOK,
        "directions": ["dir_a", "dir_b"],
    },
    "ablate_features": {"kind": "ablate_features", "sae": "sae_l1", "features": FEATURES},
    "clamp_features": {"kind": "clamp_features", "sae": "sae_l1", "features": [3, 7], "value": 2.0},
    "keep_features": {"kind": "keep_features", "sae": "sae_l1", "features": FEATURES},
    "patch": {"kind": "patch", "hook": HOOK, "source_run": SOURCE},
}


def _sae_numpy(sae_dir: Any) -> dict[str, np.ndarray]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir))
    return {k: v.detach().double().numpy() for k, v in sae.state_dict().items()}


def reference(
    kind: str, x_ND: np.ndarray, env: dict[str, Any], sites: dict[str, np.ndarray]
) -> np.ndarray:
    """What each kind should do, computed independently in float64 numpy."""
    vec = env["vectors"]
    op = EXAMPLES[kind]
    if kind == "ablate_direction":
        u = vec["dir_a"] / np.linalg.norm(vec["dir_a"])
        return x_ND - np.outer(x_ND @ u, u)
    if kind == "steer":
        return x_ND + op["alpha"] * vec["dir_a"]
    if kind in ("ablate_subspace", "project_subspace"):
        U = np.stack([vec[n] for n in op["directions"]])  # (K, D)
        P = U.T @ np.linalg.solve(U @ U.T, U)  # projector onto the row space
        return x_ND - x_ND @ P if kind == "ablate_subspace" else x_ND @ P
    if kind.endswith("_features"):
        w = _sae_numpy(env["sae_dir"])
        f = np.maximum((x_ND - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
        g = f.copy()
        if kind == "ablate_features":
            g[:, op["features"]] = 0
        elif kind == "clamp_features":
            g[:, op["features"]] = op["value"]
        else:
            keep = np.zeros(f.shape[1], bool)
            keep[op["features"]] = True
            g[:, ~keep] = 0
        return x_ND + (g - f) @ w["W_dec"]  # decode(f') + (x - decode(f)), decode linear
    if kind == "patch":
        st = actstore.open(env["store"])
        rows = st.sql(
            "SELECT prompt_idx, position, row FROM tokens WHERE run_id = ?", [st.run_id(SOURCE)]
        ).fetchall()
        where = {(i, p): r for i, p, r in rows}
        want = [
            where[(int(i), int(p))] for i, p in zip(sites["prompt"], sites["position"], strict=True)
        ]
        return st.acts(SOURCE, HOOK, rows=want).numpy(np.float64)
    raise AssertionError(f"no reference for {kind}")


def _stored_batch(st: actstore.Store, n: int = 4) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids (prompt + completion), prompt lengths and prompt_idx of the source run."""
    rows = st.sql(
        """SELECT prompt_idx, list(token_id ORDER BY position),
                  count(*) FILTER (WHERE NOT is_completion)
           FROM tokens WHERE run_id = ? AND prompt_idx < ? GROUP BY prompt_idx ORDER BY prompt_idx""",
        [st.run_id(SOURCE), n],
    ).fetchall()
    return [list(r[1]) for r in rows], [int(r[2]) for r in rows], [int(r[0]) for r in rows]


def _run(model: Any, st: Any, spec: EditSpec | None, side: str = "left") -> tuple[Any, ...]:
    ids, n_prompt, prompt_idx = _stored_batch(st)
    ctx = batch_context(ids, side=side, n_prompt=n_prompt)
    ctx.prompt_idx = prompt_idx
    inputs = {
        "input_ids": ctx.input_ids,
        "attention_mask": ctx.attention_mask,
        "position_ids": ctx.position_ids,
    }
    if spec is None:
        return run_capture(model, [HOOK], **inputs)[HOOK], ctx
    with apply_edit(model, st, spec, ctx):
        return run_capture(model, [HOOK], **inputs)[HOOK], ctx


def _selected(ctx: Any, positions: str) -> np.ndarray:
    """(B, S) mask of the tokens ``positions`` names, computed from the context directly."""
    mask = np.zeros(tuple(ctx.input_ids.shape), bool)
    for b, (off, n) in enumerate(zip(ctx.offsets, ctx.n_prompt, strict=True)):
        length = int(ctx.attention_mask[b].sum())
        for j in range(length):
            pick = {
                "all": True,
                "prompt": j < n,
                "completion": j >= n,
                "last": j == n - 1,
            }[positions]
            mask[b, off + j] = pick
    return mask


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(KINDS), "add an example and a numpy reference for new kinds"


@pytest.mark.parametrize("positions", ["all", "prompt", "completion", "last"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_matches_numpy(kind, positions, store, model, edit_env):
    op = EditOp.from_dict({**EXAMPLES[kind], "positions": positions})
    spec = EditSpec(name=f"t_{kind}", ops=[op])
    x_BSD, ctx = _run(model, store, None)
    y_BSD, _ = _run(model, store, spec)
    sel = _selected(ctx, positions)
    assert sel.any()
    x, y = x_BSD.double().numpy(), y_BSD.double().numpy()
    np.testing.assert_array_equal(y[~sel], x[~sel])  # untouched elsewhere, padding included
    b, s = np.nonzero(sel)
    sites = {
        "prompt": np.asarray(ctx.prompt_idx)[b],
        "position": s - np.asarray(ctx.offsets)[b],
    }
    want = reference(kind, x[sel], edit_env, sites)
    np.testing.assert_allclose(y[sel], want, atol=2e-5, rtol=1e-5)
    assert not np.allclose(want, x[sel])  # the edit does something here


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_round_trips_and_rejects_foreign_fields(kind):
    op = EditOp.from_dict(EXAMPLES[kind])
    spec = EditSpec(name="e", ops=[op])
    assert EditSpec.from_dict(spec.to_dict()) == spec
    import tomllib

    assert EditSpec.from_dict(tomllib.loads(spec.to_toml())) == spec
    foreign = "source_run" if kind != "patch" else "features"
    value = "x/y" if foreign == "source_run" else [1]
    with pytest.raises(SpecError, match=f"`{foreign}` does not apply to {kind}; it takes kind"):
        EditOp.from_dict({**EXAMPLES[kind], foreign: value})


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_keeps_the_model_dtype(kind, store, model, edit_env):
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    spec = EditSpec(name="e", ops=[EditOp.from_dict(EXAMPLES[kind])])
    edit = resolve_edit(spec, store)
    y_BSD, ctx = _run(m16, store, None)
    assert y_BSD.dtype == torch.bfloat16
    ctx.prompt_idx = _stored_batch(store)[2]
    inputs = {"input_ids": ctx.input_ids, "attention_mask": ctx.attention_mask}
    with apply_edit(m16, store, edit, ctx):
        z_BSD = run_capture(m16, [HOOK], **inputs, position_ids=ctx.position_ids)[HOOK]
    assert z_BSD.dtype == torch.bfloat16
    sel = _selected(ctx, "all")
    b, s = np.nonzero(sel)
    sites = {"prompt": np.asarray(ctx.prompt_idx)[b], "position": s - np.asarray(ctx.offsets)[b]}
    want = reference(kind, y_BSD.double().numpy()[sel], edit_env, sites)
    np.testing.assert_allclose(z_BSD.double().numpy()[sel], want, atol=0.1, rtol=0.05)
