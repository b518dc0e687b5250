"""A per-session cache of SAE feature nonzeros as native DuckDB tables.

Scanning a (run, SAE)'s zstd Parquet parts costs about half of a feature query
(``trigger_diff`` over 50M nonzeros, 2 cores: 0.9 s from the parts, 0.5 s from a
native table, which takes 1.2 s to build; see ``benchmarks/bench_queries.py``).
The named queries therefore read the nonzeros of a (run, SAE) from an in-memory
table ``memory.main._actstore_fc_r{run}_s{sae}`` holding its ``("row", feature,
value)`` columns (16 bytes a nonzero).

The cache is never stale: before every query it is compared with the catalog's
committed ``feature_files`` (under the same attachment as the query, so nothing
can commit in between) and the parts committed since are appended. Committed
parts never change, so appending is enough.

Policies (``cache=`` of :func:`actstore.queries.run_named`):

``"auto"`` (default)
    build the table the second time a session queries a (run, SAE), so a
    one-shot command never pays for it and an interactive session does once;
``True``
    build it now; ``False``: read the Parquet parts.

The cache of a session holds at most :data:`CACHE_BYTES` (default a quarter of
the machine's memory, or ``ACTSTORE_FEATURE_CACHE_BYTES``); the least recently
used tables are dropped to make room, and a (run, SAE) larger than that is
never cached.

Example
-------
>>> import actstore.queries as q
>>> q.clear_feature_cache(st)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb

if TYPE_CHECKING:
    from actstore.store.session import Session
    from actstore.store.store import Store

__all__ = ["BYTES_PER_ROW", "CACHE_BYTES", "FeatureCache", "clear_feature_cache", "feature_cache"]

#: Memory a cached nonzero takes (row BIGINT, feature INTEGER, value FLOAT).
BYTES_PER_ROW = 16


def _default_budget() -> int:
    env = os.environ.get("ACTSTORE_FEATURE_CACHE_BYTES")
    if env:
        return int(env)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


#: Most bytes of feature tables one session keeps.
CACHE_BYTES = _default_budget()
POLICIES = ("auto", True, False)


@dataclass
class _Entry:
    table: str
    parts: set[str] = field(default_factory=set)
    n_rows: int = 0
    last_used: float = 0.0


@dataclass
class FeatureCache:
    """The cached (run, SAE) feature tables of one session.

    Example
    -------
    >>> feature_cache(st).tables()  # doctest: +SKIP
    {(1, 1): '_actstore_fc_r1_s1'}
    """

    budget: int = CACHE_BYTES
    entries: dict[tuple[int, int], _Entry] = field(default_factory=dict)
    uses: dict[tuple[int, int], int] = field(default_factory=dict)

    def tables(self) -> dict[tuple[int, int], str]:
        """(run_id, sae_id) -> cached table name.

        Example
        -------
        >>> FeatureCache().tables()
        {}
        """
        return {k: e.table for k, e in self.entries.items()}

    def source(
        self,
        con: duckdb.DuckDBPyConnection,
        root: str,
        run_id: int,
        sae_id: int,
        policy: bool | str = "auto",
    ) -> str | None:
        """The cached table of (run, SAE), brought up to date; None to read Parquet instead.

        ``con`` must have the catalog attached as ``cat`` (a ``Session.connection()``).

        Example
        -------
        >>> with st.session.connection() as con:  # doctest: +SKIP
        ...     feature_cache(st).source(con, str(st.root), 1, 1, policy=True)
        '_actstore_fc_r1_s1'
        """
        key = (run_id, sae_id)
        self.uses[key] = self.uses.get(key, 0) + 1
        entry = self.entries.get(key)
        if policy is False or (policy == "auto" and entry is None and self.uses[key] < 2):
            return None
        files = con.execute(
            "SELECT path, n_nonzero FROM cat.main.feature_files WHERE run_id = ? AND sae_id = ? "
            "ORDER BY first_row, path",
            [run_id, sae_id],
        ).fetchall()
        total = sum(int(n or 0) for _, n in files)
        if total * BYTES_PER_ROW > self.budget:
            return None
        if entry is None:
            self._make_room(con, total * BYTES_PER_ROW)
            entry = _Entry(table=f"_actstore_fc_r{int(run_id)}_s{int(sae_id)}")
            con.execute(
                f'CREATE OR REPLACE TABLE memory.main.{entry.table} ("row" BIGINT, '
                "feature INTEGER, value FLOAT)"
            )
            self.entries[key] = entry
        new = [p for p, _ in files if p not in entry.parts]
        if new:
            self._make_room(con, (total - entry.n_rows) * BYTES_PER_ROW, keep=key)
            paths = [f"{root}/{p}" for p in new]
            con.execute(
                f'INSERT INTO memory.main.{entry.table} SELECT "row", feature, value '
                "FROM read_parquet(?)",
                [paths],
            )
            entry.parts.update(new)
            entry.n_rows = total
        entry.last_used = time.monotonic()
        return f"memory.main.{entry.table}"

    def _make_room(
        self, con: duckdb.DuckDBPyConnection, need: int, keep: tuple[int, int] | None = None
    ) -> None:
        used = sum(e.n_rows * BYTES_PER_ROW for e in self.entries.values())
        for key, entry in sorted(self.entries.items(), key=lambda kv: kv[1].last_used):
            if used + need <= self.budget:
                break
            if key == keep:
                continue
            self.drop(con, key)
            used -= entry.n_rows * BYTES_PER_ROW

    def drop(self, con: duckdb.DuckDBPyConnection, key: tuple[int, int]) -> None:
        """Drop the cached table of (run_id, sae_id).

        Example
        -------
        >>> with st.session.connection() as con:  # doctest: +SKIP
        ...     feature_cache(st).drop(con, (1, 1))
        """
        entry = self.entries.pop(key, None)
        if entry is not None:
            con.execute(f"DROP TABLE IF EXISTS memory.main.{entry.table}")

    def clear(self, con: duckdb.DuckDBPyConnection) -> None:
        """Drop every cached table.

        Example
        -------
        >>> with st.session.connection() as con:  # doctest: +SKIP
        ...     feature_cache(st).clear(con)
        """
        for key in list(self.entries):
            self.drop(con, key)
        self.uses.clear()


_CACHES: weakref.WeakKeyDictionary[Session, FeatureCache] = weakref.WeakKeyDictionary()


def feature_cache(store: Store) -> FeatureCache:
    """The feature cache of ``store``'s current SQL session.

    Example
    -------
    >>> feature_cache(st).tables()  # doctest: +SKIP
    {}
    """
    session = store.session
    cache = _CACHES.get(session)
    if cache is None:
        cache = _CACHES[session] = FeatureCache(budget=CACHE_BYTES)
    return cache


def clear_feature_cache(store: Store) -> None:
    """Free the memory of every cached feature table of ``store``'s session.

    Example
    -------
    >>> clear_feature_cache(st)  # doctest: +SKIP
    """
    session = store.session
    cache = _CACHES.get(session)
    if cache is not None:
        with session.connection() as con:
            cache.clear(con)
