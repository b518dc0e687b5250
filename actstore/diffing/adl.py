"""The activation-difference lens (ADL): the mean activation change fine-tuning made.

For two runs over the same prompts (base and fine-tuned checkpoints), the rows line
up token by token, so per hook the mean of ``acts_b - acts_a`` over chosen tokens
is a direction: what fine-tuning added to the residual stream there. The diffing
toolkit takes it over the first few tokens of arbitrary text; here any predicate
over ``labeled_tokens`` chooses the tokens (``position < 5``, ``position_role =
'last'``, ``triggered``...). The directions are stored like any other
(``directions``, method ``adl``, named ``{name}/{hook}``), so they can be read
through the logit lens (:meth:`ADLResult.lens`) and used by a steering edit
(``EditOp(kind="steer", direction="{name}/{hook}")``): steering the base model with
them should move its outputs toward the fine-tuned model's (measure with
:func:`actstore.diffing.token_diff`).

Example
-------
>>> r = adl(st, "base/pairs", "backdoored/pairs", where="position_role = 'last'")  # doctest: +SKIP
>>> r.directions["blocks.2.hook_resid_post"]  # doctest: +SKIP
'adl:base/pairs->backdoored/pairs/blocks.2.hook_resid_post'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import InputError

if TYPE_CHECKING:
    from actstore.analysis.lens import LensResult
    from actstore.store.store import Store

KIND = "adl"


@dataclass(frozen=True)
class ADLResult:
    """Stored ADL directions: hook -> direction name, their norms and row count."""

    store: Any
    name: str
    analysis_id: int
    run_a: str
    run_b: str
    where: str | None
    n_rows: int
    directions: dict[str, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)

    def lens(self, hook: str | None = None, *, k: int = 10, model: Any = None) -> LensResult:
        """Top and bottom tokens of the direction(s) through run B's unembedding.

        Example
        -------
        >>> r.lens("blocks.3.hook_resid_post", k=5).top(0)  # doctest: +SKIP
        """
        from actstore.analysis.lens import unembed
        from actstore.diffing.models import load_checkpoint_model

        names = list(self.directions.values()) if hook is None else [self.directions[hook]]
        if model is None:
            cid = self.store.sql(
                "SELECT checkpoint_id FROM runs WHERE name = ?", [self.run_b]
            ).fetchall()[0][0]
            model = load_checkpoint_model(self.store, int(cid))
        tok = _tokenizer(self.store, self.run_b)
        return unembed(
            self.store,
            direction=names,
            model=model,
            tokenizer=tok,
            k=k,
            name=f"unembed:{self.name}",
            save=False,
        )


def _tokenizer(store: Store, run: str) -> Any:
    """The tokenizer of a run's checkpoint, or of a derived checkpoint's first source."""
    import json

    from transformers import AutoTokenizer

    rows = store.sql(
        "SELECT c.path, r.provenance FROM runs r JOIN checkpoints c USING (checkpoint_id) "
        "WHERE r.name = ?",
        [run],
    ).fetchall()
    path, prov = rows[0]
    if not path:
        recipe: dict[str, Any] = json.loads(prov or "{}").get("model", {}).get("recipe") or {}
        first: dict[str, Any] = next(iter(recipe.get("sources", {}).values()), {})
        path = first.get("path")
    try:
        return AutoTokenizer.from_pretrained(path) if path else None
    except (OSError, ValueError):
        return None


def adl(
    store: Store,
    run_a: str | int,
    run_b: str | int,
    *,
    hooks: Sequence[str] | None = None,
    where: str | None = None,
    params: Sequence[Any] | None = None,
    name: str | None = None,
    replace: bool = False,
) -> ADLResult:
    """Mean activation difference ``run_b - run_a`` per hook at chosen tokens, stored as directions.

    Parameters
    ----------
    store
        The store.
    run_a, run_b
        The base and the fine-tuned run, over the same prompt set (rows align).
    hooks
        Hooks to use (default: every hook both runs stored).
    where
        A predicate over ``labeled_tokens`` choosing the tokens (default: all stored).
    params
        Bound parameters for ``where``.
    name
        Prefix of the directions' names and the analysis name (default
        ``adl:{run_a}->{run_b}``); directions are ``{name}/{hook}``.
    replace
        Overwrite stored directions of the same names.

    Returns
    -------
    ADLResult

    Example
    -------
    >>> r = adl(st, "base/pairs", "backdoored/pairs", where="position < 5")  # doctest: +SKIP
    >>> r.norms  # doctest: +SKIP
    """
    from actstore.analysis.results import (
        check_names_free,
        provenance,
        save_analysis,
        save_direction,
    )

    rid_a, rid_b = store.run_id(run_a), store.run_id(run_b)
    rows = {
        int(r[0]): (str(r[1]), int(r[2]))
        for r in store.sql(
            "SELECT run_id, name, prompt_set_id FROM runs WHERE run_id IN (?, ?)", [rid_a, rid_b]
        ).fetchall()
    }
    if rid_a == rid_b:
        raise InputError(f"run_a and run_b are the same run {run_a!r}; name two runs")
    (name_a, ps_a), (name_b, ps_b) = rows[rid_a], rows[rid_b]
    if ps_a != ps_b:
        raise InputError(
            f"runs {name_a!r} and {name_b!r} are over different prompt sets; the activation "
            "difference needs the same prompts through both models"
        )
    common = [h for h in store.hooks(name_a) if h in set(store.hooks(name_b))]
    use = list(hooks) if hooks is not None else common
    missing = [h for h in use if h not in common]
    if missing or not use:
        raise InputError(
            f"hook {missing[0] if missing else '(none)'!r} is not stored in both runs; "
            f"hooks of both: {common}"
        )
    name = name or f"adl:{name_a}->{name_b}"
    check_names_free(store, [f"{name}/{h}" for h in use], replace=replace)
    vectors, norms, n_rows = {}, {}, 0
    for h in use:
        a = store.acts(name_a, h, where=where, params=params)
        b = store.acts(name_b, h, where=where, params=params)
        keys = ("prompt_idx", "position")
        if not a.meta.select(list(keys)).equals(b.meta.select(list(keys))):
            raise InputError(
                f"runs {name_a!r} and {name_b!r} store different tokens at {h!r} for where="
                f"{where!r}; rows must align (same positions policy) to take differences"
            )
        if len(a.rows) == 0:
            raise InputError(f"where={where!r} selects no stored rows of {name_a!r} at {h!r}")
        diff_D = (b.numpy(np.float64) - a.numpy(np.float64)).mean(0)
        vectors[h], norms[h], n_rows = diff_D, float(np.linalg.norm(diff_D)), len(a.rows)
    prov = provenance(
        store, runs={name_a: rid_a, name_b: rid_b}, where=where, params=params, n_rows=n_rows
    )
    aid = save_analysis(
        store,
        name=name,
        kind=KIND,
        params={"run_a": name_a, "run_b": name_b, "hooks": use, "where": where},
        result={"norms": norms, "n_rows": n_rows},
        provenance=prov,
    )
    names = {}
    for h, v in vectors.items():
        names[h] = f"{name}/{h}"
        save_direction(
            store,
            name=names[h],
            vector=v,
            hook=h,
            method=KIND,
            run_id=rid_b,
            analysis_id=aid,
            params={"run_a": name_a, "run_b": name_b, "where": where, "n_rows": n_rows},
            replace=replace,
        )
    return ADLResult(store, name, aid, name_a, name_b, where, n_rows, names, norms)
