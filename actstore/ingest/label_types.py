"""One rule for a label column whose values mix numbers and text, in every prompt format.

A prompt file's label columns become typed SQL columns of ``prompts``. A column
whose values are all numbers (or all booleans) gets a numeric (boolean) type; a
column that mixes numbers or booleans with words (``3``, ``"high"``) is stored
as ``VARCHAR``, as pandas and polars infer such a column (object / ``str``),
with each value's text (``3`` -> ``'3'``, ``true`` -> ``'true'``). The same rule
holds for JSONL (which Arrow alone refuses) and CSV (which Arrow reads as text
silently); a Parquet column has one type already. Either way the decision is
reported: :func:`mixed_notes` gives one line per such column (with a line of
each kind), which ``actstore ingest`` prints under its summary.

Example
-------
>>> t = from_rows([{"y": 3}, {"y": "high"}], [1, 2], "p.jsonl")
>>> t.column("y").to_pylist(), mixed_notes(t)
(['3', 'high'], ["p.jsonl: label 'y' mixes numbers (line 1: 3) and text (line 2: 'high'); stored as VARCHAR"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

__all__ = ["KEY", "from_rows", "mixed_notes", "unify_csv"]

#: Schema metadata key holding the notes (JSON list).
KEY = b"actstore_mixed_labels"


def _note(where: str, col: str, num: tuple[int, Any], txt: tuple[int, Any]) -> str:
    return (
        f"{where}: label {col!r} mixes numbers (line {num[0]}: {num[1]!r}) and text "
        f"(line {txt[0]}: {txt[1]!r}); stored as VARCHAR"
    )


def _with_notes(table: pa.Table, notes: dict[str, str]) -> pa.Table:
    if not notes:
        return table
    return table.replace_schema_metadata({KEY: json.dumps(notes).encode()})


def mixed_notes(table: pa.Table, *, text: str | None = None) -> list[str]:
    """The notes :func:`from_rows` / :func:`unify_csv` left on ``table`` (none: ``[]``).

    ``text`` is the prompt text column, which is no label (and is text anyway).

    Example
    -------
    >>> mixed_notes(pa.table({"y": [1]}))
    []
    """
    meta = table.schema.metadata or {}
    notes = dict(json.loads(meta[KEY])) if KEY in meta else {}
    return [n for col, n in notes.items() if col != text]


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def from_rows(rows: Sequence[dict[str, Any]], lines: Sequence[int], where: str) -> pa.Table:
    """A table of JSON rows; a column mixing scalars Arrow cannot unify becomes text.

    Raises Arrow's error for anything else (a column mixing objects and numbers).

    Example
    -------
    >>> from_rows([{"y": 1}, {"y": 2.5}], [1, 2], "p").column("y").type
    DataType(double)
    """
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    cols: dict[str, pa.Array] = {}
    notes: dict[str, str] = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        try:
            cols[k] = pa.array(values)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if not all(v is None or isinstance(v, str | int | float | bool) for v in values):
                raise
        num = next((i, v) for i, v in enumerate(values) if v is not None and not isinstance(v, str))
        txt: tuple[int, Any] | None = next(
            ((i, v) for i, v in enumerate(values) if isinstance(v, str)), None
        )
        if txt is None:  # booleans mixed with numbers, no words: still text, as pandas keeps it
            txt = next((i, v) for i, v in enumerate(values) if isinstance(v, bool))
        notes[k] = _note(where, k, (lines[num[0]], num[1]), (lines[txt[0]], txt[1]))
        cols[k] = pa.array([None if v is None else _text(v) for v in values], pa.string())
    return _with_notes(pa.table(cols), notes)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def unify_csv(table: pa.Table, where: str) -> pa.Table:
    """Note the text columns of a CSV that mix numbers with words (Arrow made them text).

    Example
    -------
    >>> mixed_notes(unify_csv(pa.table({"y": ["3", "x"]}), "p.csv"))[0][:32]
    "p.csv: label 'y' mixes numbers ("
    """
    notes: dict[str, str] = {}
    for name in table.column_names:
        col = table.column(name)
        if not pa.types.is_string(col.type):
            continue
        values = col.to_pylist()
        num = next(((i, v) for i, v in enumerate(values) if v and _is_number(v)), None)
        txt = next(((i, v) for i, v in enumerate(values) if v and not _is_number(v)), None)
        if num and txt:  # line numbers count the header line
            notes[name] = _note(where, name, (num[0] + 2, num[1]), (txt[0] + 2, txt[1]))
            # an empty cell is a missing value, as JSON's null (Arrow keeps it as '')
            blank = pa.array([None if v == "" else v for v in values], pa.string())
            table = table.set_column(table.column_names.index(name), name, blank)
    return _with_notes(table, notes)
