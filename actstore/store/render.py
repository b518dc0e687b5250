"""Plain-text rendering of Arrow tables for terminals and reprs.

Example
-------
>>> import pyarrow as pa
>>> print(render_table(pa.table({"run": ["a"], "n": [3]})))
run  n
---  -
a    3
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

#: Longer cells are cut to this many characters, ending in ``...``.
CELL_CHARS = 80


def _fmt(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    # wide enough for a short prompt's whole top_activations context
    return s if len(s) <= CELL_CHARS else s[: CELL_CHARS - 3] + "..."


def render_table(table: pa.Table, max_rows: int | None = None) -> str:
    """Render ``table`` as aligned columns (numbers right-aligned).

    Example
    -------
    >>> print(render_table(pa.table({"x": [1.5, 22.0]})))
      x
    ---
    1.5
     22
    """
    n = table.num_rows
    shown = table if max_rows is None or n <= max_rows else table.slice(0, max_rows)
    cols = shown.column_names
    cells = [[_fmt(v) for v in shown.column(c).to_pylist()] for c in cols]
    numeric = [
        pa.types.is_integer(shown.schema.field(c).type)
        or pa.types.is_floating(shown.schema.field(c).type)
        for c in cols
    ]
    widths = [max([len(c), *(len(v) for v in col)]) for c, col in zip(cols, cells, strict=True)]

    def line(vals: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(vals, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(cols), line(["-" * w for w in widths])]
    out += [line([col[i] for col in cells]) for i in range(shown.num_rows)]
    if shown.num_rows < n:
        out.append(f"... {n - shown.num_rows} more rows")
    return "\n".join(out)
