"""Where patching results live in the catalog: ``patch_pairs`` and ``patch_cells``.

Each patching run is one row of ``analyses`` (kind ``patch_grid``: its parameters,
a summary and its provenance) and, keyed by that row's ``analysis_id`` and
``name``, one row per pair in ``patch_pairs`` (the unpatched metrics) and one row
per (pair, hook, position, head) cell in ``patch_cells``. The tables are created in
a store's catalog the first time a result is stored, so stores that never patch
are unchanged; ``docs/PATCHING.md`` documents every column.

Example
-------
>>> sorted(c.split()[0] for c in CELL_COLUMNS)[:3]
['analysis_id', 'counterpart', 'head']
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actstore.errors import InputError

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["CELL_COLUMNS", "PAIR_COLUMNS", "check_new_name", "existing_analysis", "write_result"]

PAIR_COLUMNS = (
    "analysis_id INTEGER",
    "name VARCHAR",
    "pair VARCHAR",
    "target_prompt INTEGER",
    "source_prompt INTEGER",
    "target_len INTEGER",
    "source_len INTEGER",
    "good_token INTEGER",
    "bad_token INTEGER",
    "metric_target DOUBLE",
    "metric_source DOUBLE",
)
"""``patch_pairs``: one row per pair, with the unpatched metric of both prompts."""

CELL_COLUMNS = (
    "analysis_id INTEGER",
    "name VARCHAR",
    "run VARCHAR",
    "source_run VARCHAR",
    "pair VARCHAR",
    "hook VARCHAR",
    "layer INTEGER",
    "head INTEGER",
    "position INTEGER",
    "source_position INTEGER",
    "pos_from_end INTEGER",
    "position_role VARCHAR",
    "token VARCHAR",
    "source_token VARCHAR",
    "counterpart VARCHAR",
    "value DOUBLE",
    "metric DOUBLE",
)
"""``patch_cells``: one row per cell; ``metric`` is normalised, ``value`` the raw metric."""


def _schema(columns: tuple[str, ...]) -> pa.Schema:
    types = {"INTEGER": pa.int32(), "VARCHAR": pa.string(), "DOUBLE": pa.float64()}
    return pa.schema([(c.split()[0], types[c.split()[1]]) for c in columns])


PAIR_SCHEMA = _schema(PAIR_COLUMNS)
CELL_SCHEMA = _schema(CELL_COLUMNS)


def _has_table(st: Store, table: str) -> bool:
    rows = st.sql(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'cat' AND table_name = ?",
        [table],
    ).fetchall()
    return bool(rows[0][0])


def existing_analysis(st: Store, name: str, kind: str) -> int | None:
    """The id of the stored ``kind`` analysis called ``name``, or None.

    Example
    -------
    >>> existing_analysis(st, "trigger_grid", "patch_grid")  # doctest: +SKIP
    3
    """
    rows = st.sql(
        "SELECT max(analysis_id) FROM analyses WHERE name = ? AND kind = ?", [name, kind]
    ).fetchall()
    return None if rows[0][0] is None else int(rows[0][0])


def check_new_name(st: Store, name: str, kind: str) -> None:
    """Raise InputError if a ``kind`` result called ``name`` is stored.

    Example
    -------
    >>> check_new_name(st, "trigger_grid", "patch_grid")  # doctest: +SKIP
    """
    aid = existing_analysis(st, name, kind)
    if aid is not None:
        raise InputError(
            f"a {kind} result named {name!r} is already stored (analysis {aid}); "
            "choose another name (--name) or replace it (--replace)"
        )


def write_result(
    st: Store,
    *,
    name: str,
    kind: str,
    params: Mapping[str, Any],
    summary: Mapping[str, Any],
    provenance: Mapping[str, Any],
    tables: Mapping[str, tuple[tuple[str, ...], pa.Table]],
    replace: bool = False,
) -> int:
    """Store one analysis row and its tables (``name -> (columns, rows)``) in one transaction.

    The tables' ``analysis_id`` and ``name`` columns are filled in here. With
    ``replace``, an earlier result of the same name and kind (and its rows) is removed.

    Raises
    ------
    InputError
        If a result of that name exists and ``replace`` is False.

    Example
    -------
    >>> write_result(st, name="g", kind="patch_grid", params={}, summary={},  # doctest: +SKIP
    ...              provenance={}, tables={"patch_cells": (CELL_COLUMNS, cells)})
    4
    """
    from actstore.store.writer import bump_commit_seq

    def body(con: Any) -> int:
        for table, (columns, _) in tables.items():
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(columns)})")
        old = [
            int(r[0])
            for r in con.execute(
                "SELECT analysis_id FROM analyses WHERE name = ? AND kind = ?", [name, kind]
            ).fetchall()
        ]
        if old and not replace:
            raise InputError(
                f"a {kind} result named {name!r} is already stored (analysis {old[-1]}); "
                "choose another name (--name) or replace it (--replace)"
            )
        for aid in old:
            con.execute("DELETE FROM analyses WHERE analysis_id = ?", [aid])
            for table in tables:
                con.execute(f"DELETE FROM {table} WHERE analysis_id = ?", [aid])
        row = con.execute("SELECT coalesce(max(analysis_id), 0) + 1 FROM analyses").fetchall()
        aid = int(row[0][0])
        con.execute(
            "INSERT INTO analyses VALUES (?, ?, ?, ?, ?, ?, now())",
            [
                aid,
                name,
                kind,
                json.dumps(dict(params), default=str),
                json.dumps(dict(summary), default=str),
                json.dumps(dict(provenance), default=str),
            ],
        )
        for table, (columns, rows) in tables.items():
            n = rows.num_rows
            full = rows.append_column("analysis_id", pa.array([aid] * n, pa.int32()))
            full = full.append_column("name", pa.array([name] * n, pa.string()))
            names = [c.split()[0] for c in columns]
            con.register("_patch_rows", full.select(names))
            con.execute(f"INSERT INTO {table} SELECT * FROM _patch_rows")
            con.unregister("_patch_rows")
        bump_commit_seq(con)
        return aid

    if not replace:  # refuse before the catalog is opened for writing
        check_new_name(st, name, kind)
    return int(st.catalog.transact(body))
