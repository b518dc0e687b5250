"""Prompt pages: a prompt's text and labels, and in every run its tokens, generations, scores.

Tokens are shaded by a stored direction's projection and by one SAE feature.

Example
-------
>>> prompts_data(st, 2, [0, 1], direction=None, feature=None)[1]["labels"]  # doctest: +SKIP
{'triggered': True, ...}
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import InputError
from actstore.report.data import prompts_labels, records
from actstore.report.features import FeatureRef, coverage, encoded_rows_sql, only_encoded

if TYPE_CHECKING:
    from actstore.store.store import Store


def prompts_data(
    store: Store,
    prompt_set_id: int,
    idxs: list[int],
    *,
    direction: str | None,
    feature: FeatureRef | None,
) -> dict[int, dict[str, Any]]:
    """Prompt pages of one prompt set: text, labels, and per run tokens, generations, scores.

    Tokens carry ``proj`` (the projection of the token's activation on
    ``direction``, at the direction's hook, where the run stores that hook and
    token) and ``feat`` (``feature``'s activation where the run has that SAE's
    features; zeros counted; None for a token a positions-restricted encode left
    out, which has no features). A few statements per prompt set, not per prompt.

    Example
    -------
    >>> prompts_data(st, 2, [0], direction=None, feature=None)[0]["runs"][0]["name"]  # doctest: +SKIP
    'base/pairs'
    """
    name = store.sql("SELECT name FROM prompt_sets WHERE prompt_set_id = ?", [prompt_set_id])
    set_name = str(name.fetchall()[0][0])
    idxs = sorted(set(idxs))
    texts = dict(
        store.sql(
            "SELECT prompt_idx, text FROM prompts WHERE prompt_set_id = ? "
            "AND list_contains(?, prompt_idx)",
            [prompt_set_id, idxs],
        ).fetchall()
    )
    missing = [i for i in idxs if i not in texts]
    if missing:
        raise InputError(f"prompts {missing} not in prompt set {set_name!r}")
    labels = prompts_labels(store, [(prompt_set_id, i) for i in idxs])
    hook = None
    if direction is not None:
        got = store.sql("SELECT hook FROM directions WHERE name = ?", [direction]).fetchall()
        hook = got[0][0] if got else None
    runs = records(
        store,
        "SELECT run_id, name FROM runs WHERE prompt_set_id = ? ORDER BY run_id",
        [prompt_set_id],
    )
    rids = [r["run_id"] for r in runs]
    with_hook = [
        int(r[0])
        for r in store.sql(
            "SELECT run_id FROM arrays WHERE hook = ? AND list_contains(?, run_id)", [hook, rids]
        ).fetchall()
    ]
    params: dict[str, Any] = {"rids": rids, "idxs": idxs}
    feat, feat_join = "NULL::FLOAT", ""
    if feature is not None:
        subsets = coverage(store, feature.sae_id)
        feat = (
            'CASE WHEN t."row" IS NOT NULL AND list_contains($feat_runs, t.run_id) '
            f"AND {only_encoded(subsets, 't')} THEN coalesce(f.value, 0) END"
        )
        feat_join = (
            'LEFT JOIN (SELECT run_id, "row", value FROM features WHERE sae_id = $sid '
            "AND feature = $f AND list_contains($rids, run_id)) f "
            'ON f.run_id = t.run_id AND f."row" = t."row"'
        )
        if subsets:
            feat_join += (
                f" LEFT JOIN ({encoded_rows_sql(subsets)}) enc "
                'ON enc.run_id = t.run_id AND enc."row" = t."row"'
            )
        feat_runs = [
            int(r[0])
            for r in store.sql(
                "SELECT DISTINCT run_id FROM feature_files WHERE sae_id = ?", [feature.sae_id]
            ).fetchall()
        ]
        params.update(sid=feature.sae_id, f=feature.feature, feat_runs=feat_runs)
    tokens = records(
        store,
        f"""SELECT t.run_id, t.prompt_idx, t.position, t.token_text AS token, t.position_role,
                   t.is_completion, t."row", NULL::DOUBLE AS proj, {feat} AS feat
            FROM tokens t JOIN runs r ON r.run_id = t.run_id {feat_join}
            WHERE list_contains($rids, t.run_id) AND list_contains($idxs, t.prompt_idx)
            ORDER BY t.run_id, t.prompt_idx, t.position""",
        params,
    )
    if with_hook and direction is not None and hook is not None:
        _project(store, tokens, runs, set(with_hook), hook, direction)
    gens = records(
        store,
        "SELECT run_id, prompt_idx, sample_idx, text, n_tokens FROM generations "
        "WHERE list_contains(?, run_id) AND list_contains(?, prompt_idx) "
        "ORDER BY run_id, prompt_idx, sample_idx",
        [rids, idxs],
    )
    scores = records(
        store,
        "SELECT run_id, prompt_idx, sample_idx, scorer, value, flag FROM scores "
        "WHERE list_contains(?, run_id) AND list_contains(?, prompt_idx) "
        "ORDER BY run_id, prompt_idx, scorer, sample_idx",
        [rids, idxs],
    )
    per: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for kind, rows in (("tokens", tokens), ("generations", gens), ("scores", scores)):
        for row in rows:
            key = (row.pop("run_id"), row.pop("prompt_idx"))
            per.setdefault(key, {}).setdefault(kind, []).append(row)
    out = {}
    for i in idxs:
        out[i] = {
            "prompt_set": set_name,
            "prompt_set_id": prompt_set_id,
            "prompt_idx": i,
            "text": texts[i],
            "labels": labels.get((prompt_set_id, i), {}),
            "direction": direction if with_hook else None,
            "direction_hook": hook,
            "feature": None
            if feature is None
            else {"sae": feature.sae, "feature": feature.feature},
            "runs": [
                {
                    "run_id": r["run_id"],
                    "name": r["name"],
                    **{
                        k: per.get((r["run_id"], i), {}).get(k, [])
                        for k in ("tokens", "generations", "scores")
                    },
                }
                for r in runs
            ],
        }
    return out


def _project(
    store: Store,
    tokens: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    with_hook: set[int],
    hook: str,
    direction: str,
) -> None:
    """Set each token's ``proj``: its activation at ``hook`` dotted with the unit direction.

    Row by row in float64 (not a BLAS product, whose rounding depends on how many rows
    it is given), so a token's value does not depend on which other prompts are shown.
    """
    from actstore.analysis.results import load_direction

    unit = load_direction(store, direction).unit
    names = {r["run_id"]: r["name"] for r in runs}
    for rid in sorted(with_hook):
        mine = [t for t in tokens if t["run_id"] == rid and t["row"] is not None]
        if not mine:
            continue
        X_ND = store.acts(names[rid], hook, rows=[t["row"] for t in mine]).numpy(np.float64)
        if X_ND.shape[1] != unit.size:
            raise InputError(
                f"direction {direction!r} has {unit.size} dimensions but hook {hook!r} of run "
                f"{names[rid]!r} has {X_ND.shape[1]}; choose a direction of that hook"
            )
        proj_N = (X_ND * unit).sum(axis=1)
        for t, v in zip(mine, proj_N.tolist(), strict=True):
            t["proj"] = v


def default_direction(store: Store) -> str | None:
    """The direction prompt pages shade by default.

    The direction the latest stored edit used (the one a researcher chose to act on),
    else the mean-difference direction with the highest stored AUROC, else the
    first stored direction; None when there are none.

    Example
    -------
    >>> default_direction(st)  # doctest: +SKIP
    'demo_backdoored/mean_diff/blocks.2.hook_resid_post'
    """
    rows = records(store, "SELECT name, method, params FROM directions ORDER BY direction_id")
    if not rows:
        return None
    names = {str(r["name"]) for r in rows}
    for (spec,) in store.sql("SELECT spec FROM edits ORDER BY edit_id DESC").fetchall():
        for op in json.loads(spec or "{}").get("ops") or []:
            if isinstance(op, dict) and op.get("direction") in names:
                return str(op["direction"])
    best: tuple[float, str] | None = None
    for r in rows:
        auroc = json.loads(r["params"] or "{}").get("auroc") if r["method"] == "mean_diff" else None
        if isinstance(auroc, int | float) and (best is None or auroc > best[0]):
            best = (float(auroc), str(r["name"]))
    return best[1] if best else str(rows[0]["name"])
