"""A planned job checked against what its store already holds, before anything is written.

:func:`actstore.ingest.plan.plan` checks a job on its own (files, tokenizer,
hooks, SAEs). What can only be wrong against an existing store is checked here,
reading the catalog only: a model name with another tokenizer, a checkpoint
label with other weights, a prompt set name with other contents, a label
column that clashes with a built-in column or has another SQL type than the
same label of a stored prompt set, an SAE name with other weights, a run name
made by another job. The runner calls :func:`check_job_against_store` before it
takes the write lock and again while holding it, so a refused job leaves every
file of the store byte-identical.

Example
-------
>>> check_job_against_store(st, p, weights={"base": "9d1c..."})  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import duckdb

from actstore.errors import InputError
from actstore.store.objects import RESERVED_LABELS

if TYPE_CHECKING:
    from actstore.ingest.plan import Plan, PromptSet
    from actstore.store.store import Store

__all__ = ["check_job_against_store"]


def _label_types(ps: PromptSet) -> dict[str, str]:
    text = ps.table.column_names[0]
    con = duckdb.connect()
    try:
        con.register("_p", ps.table)
        return {
            str(r[0]): str(r[1])
            for r in con.execute("DESCRIBE SELECT * FROM _p").fetchall()
            if r[0] != text
        }
    finally:
        con.close()


def check_job_against_store(
    st: Store,
    p: Plan,
    *,
    weights: Mapping[str, str],
    model_name: str,
    run_hash: Callable[[str, PromptSet], str] | None = None,
    run_name: Callable[[str, PromptSet], str] | None = None,
) -> None:
    """Raise the error the first write would raise, without writing anything.

    Parameters
    ----------
    weights
        Checkpoint label -> weights hash.
    model_name
        The name the job's model gets in ``models``.
    run_hash, run_name
        (checkpoint label, prompt set) -> the run's job hash and name (runs are
        checked when both are given).

    Example
    -------
    >>> check_job_against_store(st, p, weights={"base": "9d1c"}, model_name="tiny")  # doctest: +SKIP
    """

    def rows(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        return [tuple(r.values()) for r in st.catalog.read(sql, params).to_pylist()]

    other = rows("SELECT tokenizer_hash FROM models WHERE name = ?", [model_name])
    if other and all(o[0] != p.tok_hash for o in other):
        raise InputError(
            f"model {model_name!r} is already in the store with another tokenizer (hash "
            f"{other[0][0]}); checkpoints of one model must share a tokenizer so their rows "
            "align: give this model another name"
        )
    for label, wh in weights.items():
        hit = rows(
            "SELECT c.weights_hash FROM checkpoints c JOIN models m USING (model_id) "
            "WHERE m.name = ? AND m.tokenizer_hash = ? AND c.label = ?",
            [model_name, p.tok_hash, label],
        )
        if hit and hit[0][0] != wh:
            raise InputError(
                f"checkpoint {label!r} is already in the store with other weights (hash "
                f"{hit[0][0]}, now {wh}); give the new weights another label"
            )
    stored_types = {
        str(r[0]): str(r[1])
        for r in rows("SELECT column_name, column_type FROM (DESCRIBE prompts)", [])
    }
    for ps in p.prompt_sets:
        name = ps.spec.name
        types = _label_types(ps)
        clash = sorted(set(types) & RESERVED_LABELS)
        if clash:
            raise InputError(
                f"prompt set {name!r}: label columns {clash} clash with built-in columns "
                f"({sorted(RESERVED_LABELS)}); rename them in the prompt file"
            )
        hit = rows("SELECT content_hash FROM prompt_sets WHERE name = ?", [name])
        if hit:
            if hit[0][0] != ps.hash:
                raise InputError(
                    f"prompt set {name!r} is already in the store with other contents; give the "
                    "changed prompts another name"
                )
            continue
        for col, typ in types.items():
            if col in stored_types and stored_types[col] != typ:
                raise InputError(
                    f"prompt set {name!r}: label {col!r} is {typ} here but {stored_types[col]} "
                    "in prompt sets already stored; convert it or rename it"
                )
    for s in p.saes:
        hit = rows("SELECT weights_hash FROM saes WHERE name = ?", [s.name])
        if hit and hit[0][0] != s.weights_hash:
            raise InputError(
                f"SAE {s.name!r} is already in the store with other weights; give it another name"
            )
    if run_hash is None or run_name is None:
        return
    for label in weights:
        for ps in p.prompt_sets:
            name = run_name(label, ps)
            hit = rows("SELECT job_hash FROM runs WHERE name = ?", [name])
            if hit and hit[0][0] != run_hash(label, ps):
                raise InputError(
                    f"run {name!r} already exists and was made by a different job; choose "
                    "another run name (or another store) for this job"
                )
