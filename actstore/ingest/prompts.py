"""Prompt sets: JSONL, CSV or Parquet files of prompts and their labels.

The text column (or a chat ``messages`` column rendered with the tokenizer's
chat template) becomes the prompt text; every other column becomes a typed
label column in the catalog (``triggered``, ``pair_id``, ``reward``, ``split``...).

Example
-------
>>> import tempfile, json, os
>>> p = os.path.join(tempfile.mkdtemp(), "p.jsonl")
>>> with open(p, "w") as f:
...     _ = f.write(json.dumps({"prompt": "hi", "triggered": True}) + "\\n")
>>> load_prompt_table(p).to_pylist()
[{'prompt': 'hi', 'triggered': True}]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from actstore.errors import InputError
from actstore.ingest.label_types import from_rows, unify_csv

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _check_utf8(path: Path) -> None:
    """Raise naming the line and byte offset of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"{path}:{line}: byte {e.start} (0x{data[e.start]:02x}) is not UTF-8 text ({e.reason});"
            " save the prompt file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_jsonl(path: Path) -> pa.Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            rows.append(obj)
            lines.append(lineno)
    if not rows:
        return pa.table({})
    try:
        return from_rows(rows, lines, str(path))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(
            f"{path}: a column mixes JSON objects or lists with other values ({e}); give each "
            "column one type"
        ) from None


def load_prompt_table(path: str | Path) -> pa.Table:
    """Read a prompt file into an Arrow table (one row per prompt, in file order).

    Raises
    ------
    InputError
        Unknown suffix, unreadable file, or a malformed line (with its number).

    Example
    -------
    >>> load_prompt_table("prompts.csv")  # doctest: +SKIP
    """
    p = Path(path)
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise InputError(
            f"prompt file {p}: unknown format {p.suffix!r}; use .jsonl, .csv or .parquet"
        )
    if not p.is_file():
        raise InputError(f"prompt file {p} does not exist")
    if kind in ("jsonl", "csv"):
        _check_utf8(p)
    if kind == "jsonl":
        return _read_jsonl(p)
    if kind == "csv":
        import pyarrow.csv as pcsv

        try:
            return unify_csv(pcsv.read_csv(p), str(p))
        except pa.ArrowInvalid as e:
            raise InputError(f"{p}: malformed CSV ({e})") from None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{p}: unreadable Parquet ({e})") from None


def prepare_prompts(
    table: pa.Table,
    *,
    name: str,
    text: str,
    messages: str = "",
    tokenizer: Any = None,
    limit: int = 0,
) -> pa.Table:
    """Check a prompt table and render chat messages; return it with the text column first.

    Example
    -------
    >>> prepare_prompts(pa.table({"q": ["a"], "y": [1]}), name="p", text="q").column_names
    ['q', 'y']
    """
    if limit:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise InputError(f"prompt set {name!r} is empty; it needs at least one prompt")
    if messages:
        if messages not in table.column_names:
            raise InputError(
                f"prompt set {name!r}: no messages column {messages!r}; columns: {table.column_names}"
            )
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"prompt set {name!r}: the tokenizer has no chat template to render {messages!r}"
            )
        rendered = [
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m in table.column(messages).to_pylist()
        ]
        table = table.drop_columns([messages]).append_column(text, pa.array(rendered, pa.string()))
    if text not in table.column_names:
        raise InputError(
            f"prompt set {name!r}: no text column {text!r}; columns are {table.column_names} "
            '(set `text = "COLUMN"` in the job\'s [[prompts]])'
        )
    col = table.column(text)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        raise InputError(f"prompt set {name!r}: text column {text!r} holds {col.type}, not text")
    if col.null_count:
        bad = col.to_pylist().index(None)
        raise InputError(f"prompt set {name!r}: prompt {bad} (row {bad + 1}) has no text")
    order = [text, *[c for c in table.column_names if c != text]]
    return table.select(order)
