"""Edits on a subset of prompts: ``where = "NOT triggered"`` in an edit spec.

An edit's ``where`` is a SQL predicate over the prompt labels (the columns of
the prompt file other than the text). It is parsed as exactly one expression by
DuckDB's own parser (:func:`check_predicate`: a second statement, a list, a
dangling parenthesis, a subquery or a table function is refused), then bound against the prompt table, which
must make it a boolean. The edited run holds only the prompts it selects (their
``prompt_idx`` unchanged); :func:`actstore.edits.evaluate` takes the other
prompts' completions and scores from the unedited parent, so rates stay
comparable.

Example
-------
>>> check_predicate("NOT triggered")
'(\\nNOT triggered\\n)'
>>> check_predicate("true; DROP TABLE runs")
Traceback (most recent call last):
...
actstore.errors.SpecError: where 'true; DROP TABLE runs' is not one SQL expression ("true; DROP TABLE runs" is not an expression list: it holds more than one statement); write a predicate over the prompt labels, e.g. "NOT triggered"
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import pyarrow as pa

from actstore.errors import InputError, SpecError
from actstore.store.predicate import expression

__all__ = ["check_predicate", "select_rows"]


def check_predicate(where: str, columns: Sequence[str] | None = None) -> str:
    """``where`` parenthesized, if DuckDB's parser reads it as one SQL expression; else a SpecError.

    Parameters
    ----------
    where
        The predicate text.
    columns
        The label columns, named in the error to help write one.

    Example
    -------
    >>> check_predicate("pair_id < 3 AND NOT triggered")
    '(\\npair_id < 3 AND NOT triggered\\n)'
    """
    hint = f" {list(columns)}" if columns else ""
    if not isinstance(where, str) or not where.strip():
        raise SpecError(f"where must be a non-empty SQL predicate over the prompt labels{hint}")
    try:
        duckdb.SQLExpression(where)
    except duckdb.Error as e:
        first = str(e).splitlines()[0].split("Error: ", 1)[-1]
        raise SpecError(
            f"where {where!r} is not one SQL expression ({first}); write a predicate over the "
            f'prompt labels{hint}, e.g. "NOT triggered"'
        ) from None
    try:  # no subquery, table function or file read inside it either
        return expression(where, what="where")
    except InputError as e:
        raise SpecError(f"{e}; the prompt labels are{hint}" if hint else str(e)) from None


def select_rows(table: pa.Table, where: str, what: str = "prompt set") -> list[int]:
    """Row numbers (``prompt_idx``) of ``table`` where the predicate is true.

    Raises
    ------
    InputError
        If the predicate does not bind over the table's columns or is not boolean.

    Example
    -------
    >>> t = pa.table({"prompt": ["a", "b", "c"], "triggered": [True, False, False]})
    >>> select_rows(t, "NOT triggered")
    [1, 2]
    """
    expr = check_predicate(where, table.column_names[1:])
    con = duckdb.connect()
    try:
        con.register("prompts", table)
        con.register("_indexed", table.append_column("_row", pa.array(range(table.num_rows))))
        try:
            kind = con.execute(f"DESCRIBE SELECT {expr} AS x FROM prompts").fetchall()[0][1]
        except duckdb.Error as e:
            raise InputError(
                f"where {where!r} does not apply to {what}: {str(e).splitlines()[0]}; its label "
                f"columns are {table.column_names[1:]}"
            ) from None
        if str(kind) != "BOOLEAN":
            raise InputError(
                f"where {where!r} is {kind}, not a predicate; compare it, e.g. `{where} = 1`"
            )
        rows = con.execute(f"SELECT _row FROM _indexed WHERE {expr} ORDER BY _row").fetchall()
    finally:
        con.close()
    return [int(r[0]) for r in rows]
