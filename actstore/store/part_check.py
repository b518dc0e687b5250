"""Checksums of the sparse feature parts, verified before a part's rows are used.

When a batch commits, the writer records each Parquet part's size and crc32c
(of the whole file, as written) in ``feature_files.n_bytes`` and
``feature_files.crc32c``. Before a part's rows are read (the ``features`` view,
the named queries, their native cache, ``top_activations``, a merge), the part
is read once and compared with the record; a mismatch, a truncation or a
missing file raises :class:`~actstore.errors.CorruptChunkError` naming the run,
the SAE and the part. As for array chunks, a part is verified once per process
(locally keyed by its size and modification time, so a file replaced later is
checked again), so warm queries cost a ``stat`` per part.

Parts committed before checksums were recorded (``crc32c`` NULL) are checked
for presence only.

Example
-------
>>> import tempfile, numpy as np
>>> from actstore.store import features
>>> root = tempfile.mkdtemp()
>>> rel, data = features.encode_part(run_id=1, sae_id=1, first_row=0, rows=np.array([0]),
...                                  features=np.array([3]), values=np.array([1.0]))
>>> _ = open(f"{root}/x.parquet", "wb").write(data)
>>> part = Part("x.parquet", len(data), checksum(data), run="r", sae="s")
>>> verify(Location.parse(root), [part])
>>> _ = open(f"{root}/x.parquet", "r+b").write(b"X")
>>> verify(Location.parse(root), [part])
Traceback (most recent call last):
...
actstore.errors.CorruptChunkError: feature part x.parquet of run 'r', SAE 's' is damaged: ...
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import google_crc32c

from actstore.errors import CorruptChunkError
from actstore.store.catalog import TABLES
from actstore.store.location import Location
from actstore.store.predicate import nodes, parse_sql

__all__ = [
    "FEATURE_RELATIONS",
    "Part",
    "checksum",
    "clear_cache",
    "may_read_features",
    "parts_of",
    "verify",
]

#: Session relations and table macros that read feature parts.
FEATURE_RELATIONS = frozenset(
    {
        "features",
        "feature_acts",
        "trigger_diff",
        "trigger_diff_paired",
        "top_activations",
        "feature_reward_corr",
        "checkpoint_diff",
        "feature_density",
    }
)
#: Relations that read no feature part.
_NO_PARTS = frozenset(TABLES) | {"labeled_tokens", "feature_selections"}
_MENTION = re.compile("|".join(sorted(FEATURE_RELATIONS)) + "|feature", re.IGNORECASE)


def may_read_features(sql: str) -> bool:
    """Whether a statement may read feature parts (so they are verified before it runs).

    A ``SELECT`` is parsed by DuckDB: it may if it names a feature relation or
    macro, or a relation that is not one of the catalog's tables (a view of the
    user's own, a registered frame). Any other statement may if it mentions one.

    Example
    -------
    >>> may_read_features("SELECT count(*) FROM runs JOIN tokens USING (run_id)")
    False
    >>> may_read_features("SELECT * FROM my_view")
    True
    >>> may_read_features("SELECT * FROM trigger_diff('r', 's', 'triggered')")
    True
    """
    parsed = parse_sql(sql)
    statements = parsed.get("statements") or []
    if parsed.get("error") or not statements:
        return bool(_MENTION.search(sql))
    for node in nodes(statements):
        kind = node.get("type")
        if kind == "BASE_TABLE" and str(node.get("table_name", "")).lower() not in _NO_PARTS:
            return True
        if kind == "TABLE_FUNCTION" or node.get("class") == "FUNCTION":
            fn = node.get("function", node)
            if str(fn.get("function_name", "")).lower() in FEATURE_RELATIONS:
                return True
    return False


@dataclass(frozen=True, slots=True)
class Part:
    """One committed feature part and what the catalog recorded of it."""

    path: str
    """Relative to the store."""
    n_bytes: int | None
    """Its size when committed (None: not recorded)."""
    crc32c: int | None
    """crc32c of its bytes when committed (None: not recorded)."""
    run: str = "?"
    """The run's name, for messages."""
    sae: str = "?"
    """The SAE's name, for messages."""


def checksum(data: bytes | memoryview) -> int:
    """The crc32c of ``data`` (as ``feature_files.crc32c`` records it).

    Example
    -------
    >>> checksum(b"abc")
    910901175
    """
    return int(google_crc32c.value(bytes(data)))


_lock = threading.Lock()
#: (store url, part path) -> the stat signature it was verified at (() remotely).
_VERIFIED: dict[tuple[str, str], tuple[int, ...]] = {}


def clear_cache() -> None:
    """Forget which parts were verified (the next read verifies them again).

    Example
    -------
    >>> clear_cache()
    """
    with _lock:
        _VERIFIED.clear()


def _signature(loc: Location, part: Part) -> tuple[int, ...] | None:
    """A cheap signature of the file now (None: it is missing)."""
    if not loc.is_local:
        return () if loc.exists(part.path) else None
    try:
        st = os.stat(loc.path(part.path))
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _damaged(loc: Location, part: Part, why: str) -> CorruptChunkError:
    return CorruptChunkError(
        f"feature part {part.path} of run {part.run!r}, SAE {part.sae!r} is damaged: {why}; "
        f"restore the file from a copy of the store {loc.url}, or ingest the run again into a "
        "new store"
    )


def verify(loc: Location, parts: Iterable[Part]) -> None:
    """Verify each part not verified before in this process; raise on the first bad one.

    Example
    -------
    >>> verify(Location.parse(tempfile.mkdtemp()), [])  # doctest: +SKIP
    """
    for part in parts:
        key = (loc.url, part.path)
        sig = _signature(loc, part)
        if sig is None:
            raise _damaged(loc, part, "the file is missing")
        with _lock:
            if _VERIFIED.get(key) == sig:
                continue
        if part.crc32c is None:  # committed before checksums were recorded
            with _lock:
                _VERIFIED[key] = sig
            continue
        try:
            data = loc.read_bytes(part.path)
        except FileNotFoundError:
            raise _damaged(loc, part, "the file is missing") from None
        if part.n_bytes is not None and len(data) != part.n_bytes:
            raise _damaged(
                loc, part, f"it has {len(data)} bytes, {part.n_bytes} were committed (truncated?)"
            )
        got = checksum(data)
        if got != part.crc32c:
            raise _damaged(loc, part, f"crc32c recorded {part.crc32c:#010x}, computed {got:#010x}")
        with _lock:
            _VERIFIED[key] = sig


def parts_of(
    con: duckdb.DuckDBPyConnection,
    *,
    run_id: int | None = None,
    sae_id: int | None = None,
    schema: str = "cat.main.",
) -> list[Part]:
    """The committed parts of a (run, SAE), of a run, of an SAE or of the store.

    ``con`` has the catalog attached (``schema`` ``"cat.main."``, a session
    connection) or is the catalog itself (``schema=""``).

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     parts_of(con, run_id=1, sae_id=1)[0].path
    'features/run000001/sae000001/part-000000000000-b000000.parquet'
    """
    conds, params = ["true"], []
    for col, value in (("run_id", run_id), ("sae_id", sae_id)):
        if value is not None:
            conds.append(f"f.{col} = ?")
            params.append(int(value))
    cols = {
        r[0]
        for r in con.execute(
            f"SELECT column_name FROM (DESCRIBE SELECT * FROM {schema}feature_files)"
        ).fetchall()
    }
    sums = "f.n_bytes, f.crc32c" if "crc32c" in cols else "NULL, NULL"
    rows: Sequence[Any] = con.execute(
        f"""SELECT f.path, {sums}, coalesce(r.name, f.run_id::VARCHAR),
                   coalesce(s.name, f.sae_id::VARCHAR)
            FROM {schema}feature_files f
            LEFT JOIN {schema}runs r ON r.run_id = f.run_id
            LEFT JOIN {schema}saes s ON s.sae_id = f.sae_id
            WHERE {" AND ".join(conds)} ORDER BY f.run_id, f.sae_id, f.first_row, f.path""",
        params,
    ).fetchall()
    return [
        Part(str(p), None if n is None else int(n), None if c is None else int(c), str(r), str(s))
        for p, n, c, r, s in rows
    ]
