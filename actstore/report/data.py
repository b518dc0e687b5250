"""What the report shows, read from the store: plain values for the index and analysis pages.

Every function here only reads (the report opens the store read-only) and returns
JSON-like values (dicts, lists, numbers, strings), so a page's content can be
hashed to decide whether it changed since the last build (incremental builds).
Feature pages read through :mod:`actstore.report.features`, prompt pages through
:mod:`actstore.report.prompts`.

Example
-------
>>> index_data(st)["runs"][0]["name"]  # doctest: +SKIP
'backdoored/train'
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from actstore.analysis.results import jsonable
from actstore.errors import ActstoreError

if TYPE_CHECKING:
    from actstore.store.store import Store


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``-_.``; others as ``_``).

    Example
    -------
    >>> safe_name("backdoored/pairs+ablate dir")
    'backdoored_pairs+ablate_dir'
    """
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def records(store: Store, query: str, params: Any = None) -> list[dict[str, Any]]:
    """The rows of a query as JSON-safe dicts.

    Example
    -------
    >>> records(st, "SELECT 1 AS one")  # doctest: +SKIP
    [{'one': 1}]
    """
    out: list[dict[str, Any]] = jsonable(store.sql(query, params).arrow().to_pylist())
    return out


def label_columns(store: Store, prompt_set_id: int | None = None) -> list[str]:
    """Label columns of one prompt set (or of all), in their stored order.

    Example
    -------
    >>> label_columns(st)  # doctest: +SKIP
    ['triggered', 'pair_id', 'question', 'answer', 'split', 'reward']
    """
    if prompt_set_id is None:
        rows = store.sql("SELECT label_columns FROM prompt_sets ORDER BY prompt_set_id")
    else:
        rows = store.sql(
            "SELECT label_columns FROM prompt_sets WHERE prompt_set_id = ?", [prompt_set_id]
        )
    out: list[str] = []
    for (cols,) in rows.fetchall():
        for c in json.loads(cols or "[]"):
            if c not in out:
                out.append(str(c))
    return out


def boolean_labels(store: Store) -> list[str]:
    """Prompt label columns of boolean type (``triggered`` first, if present).

    Example
    -------
    >>> boolean_labels(st)  # doctest: +SKIP
    ['triggered']
    """
    labels = set(label_columns(store))
    types = store.sql(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE table_name = 'prompts' AND database_name = 'cat'"
    ).fetchall()
    found = [str(n) for n, t in types if str(t) == "BOOLEAN" and n in labels]
    return sorted(found, key=lambda c: (c != "triggered", c))


def quote(column: str) -> str:
    """A column name as a quoted SQL identifier.

    Example
    -------
    >>> print(quote("my label"))
    "my label"
    """
    return '"' + column.replace('"', '""') + '"'


def index_data(store: Store) -> dict[str, Any]:
    """The index: runs, prompt sets and labels, SAEs, behaviour (``eval``), analyses, directions.

    Example
    -------
    >>> sorted(index_data(st))  # doctest: +SKIP
    ['analyses', 'behaviour', 'behaviour_error', 'directions', 'prompt_sets', 'runs', ...]
    """
    runs = records(
        store,
        """SELECT r.run_id, r.name, c.label AS checkpoint, p.name AS prompt_set, e.name AS edit,
                  pr.name AS parent, r.status, r.positions, r.store_dtype,
                  (SELECT max(n_rows) FROM arrays a WHERE a.run_id = r.run_id) AS n_rows,
                  (SELECT count(*) FROM arrays a WHERE a.run_id = r.run_id) AS n_hooks,
                  (SELECT count(DISTINCT sae_id) FROM feature_files f WHERE f.run_id = r.run_id)
                    AS n_saes
           FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id)
           LEFT JOIN prompt_sets p USING (prompt_set_id) LEFT JOIN edits e USING (edit_id)
           LEFT JOIN runs pr ON pr.run_id = r.parent_run_id ORDER BY r.run_id""",
    )
    sets = records(
        store,
        "SELECT prompt_set_id, name, n_prompts, text_column, label_columns, content_hash "
        "FROM prompt_sets ORDER BY prompt_set_id",
    )
    for s in sets:
        s["label_columns"] = json.loads(s["label_columns"] or "[]")
    saes = records(
        store, "SELECT sae_id, name, hook, layer, d_in, d_sae, architecture FROM saes ORDER BY 1"
    )
    behaviour: list[dict[str, Any]] = []
    behaviour_error = None
    try:
        from actstore.edits.evaluate import evaluate

        trig = boolean_labels(store)
        behaviour = jsonable(
            evaluate(store, trigger_column=trig[0] if trig else "triggered").arrow().to_pylist()
        )
        if all(r["scorer"] is None for r in behaviour):
            behaviour, behaviour_error = [], "no behaviour scores in this store"
    except ActstoreError as e:
        behaviour_error = str(e)
    analyses = records(
        store, "SELECT analysis_id, name, kind, created_at FROM analyses ORDER BY analysis_id"
    )
    directions = records(
        store,
        "SELECT d.direction_id, d.name, d.hook, d.d, d.method, r.name AS run, d.analysis_id "
        "FROM directions d LEFT JOIN runs r USING (run_id) ORDER BY d.direction_id",
    )
    return {
        "runs": runs,
        "prompt_sets": sets,
        "saes": saes,
        "behaviour": behaviour,
        "behaviour_error": behaviour_error,
        "analyses": analyses,
        "directions": directions,
    }


def analysis_record(store: Store, analysis_id: int) -> dict[str, Any]:
    """One stored analysis as plain values (params, result and provenance parsed).

    Example
    -------
    >>> analysis_record(st, 1)["kind"]  # doctest: +SKIP
    'contrast'
    """
    rows = records(store, "SELECT * FROM analyses WHERE analysis_id = ?", [analysis_id])
    rec = rows[0]
    for key in ("params", "result", "provenance"):
        rec[key] = json.loads(rec[key] or "{}")
    return rec


def prompts_labels(
    store: Store, keys: set[tuple[int, int]] | list[tuple[int, int]]
) -> dict[tuple[int, int], dict[str, Any]]:
    """(prompt set id, prompt index) -> the prompt's labels (every label column of its set).

    Example
    -------
    >>> prompts_labels(st, [(2, 1)])[(2, 1)]["triggered"]  # doctest: +SKIP
    True
    """
    by_set: dict[int, list[int]] = {}
    for sid, idx in keys:
        by_set.setdefault(int(sid), []).append(int(idx))
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for sid, idxs in by_set.items():
        cols = label_columns(store, sid)
        sel = "".join(f", {quote(c)}" for c in cols)
        for r in records(
            store,
            f"SELECT prompt_idx{sel} FROM prompts WHERE prompt_set_id = ? "
            "AND list_contains(?, prompt_idx)",
            [sid, sorted(set(idxs))],
        ):
            idx = r.pop("prompt_idx")
            out[(sid, int(idx))] = r
    return out
