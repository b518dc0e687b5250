"""Catalog metadata for reads, cached per commit sequence.

Reading rows through :meth:`Store.acts` needs a few catalog facts first: the
run's id and name, the ``arrays`` row of (run, hook) (path, width, committed
``n_rows``) and the opened Zarr array. Looking them up costs a catalog attach
per statement (tens of milliseconds with a fresh DuckDB connection each), more
than reading 10,000 rows. A :class:`ReadCache` keeps them per store instance and
keys them by the catalog's ``commit_seq`` (``meta`` table), which every catalog
transaction advances: a commit by anyone, this process or another, moves it and
the cache is dropped and refilled, so a cached answer is always the answer the
catalog gives at that commit.

Knowing that ``commit_seq`` has not moved normally takes a catalog attach too.
For a local store the cache skips it when ``catalog.duckdb`` and its WAL have
the same inode, size and modification time as when ``commit_seq`` was last
read, *and* that modification time was already :data:`SETTLED_S` seconds old
then. Any later commit writes one of the two files, so it changes the stamp:
the settle time covers file systems whose timestamps are coarser than a commit
(as git does for its "racily clean" index entries). Within that time after a
commit, and for stores on object storage, ``commit_seq`` is read on every call.

While the stamp is trusted, ``where=`` selections and row metadata of a run are
answered from copies of its ``tokens``, ``runs`` row and ``prompts`` in the
session's memory (joined once into one table unless the prompts' text repeated
per token would pass :data:`COPY_MAX_BYTES`; runs over :data:`COPY_MAX_ROWS`
rows are not copied), without attaching the catalog. A predicate that needs the
catalog itself (e.g. ``project()``) is run over the view instead.

The rows' metadata (``labeled_tokens`` columns) is fetched only when asked
(:attr:`Acts.meta` loads it on first use, in row order); committed token rows and
prompt labels never change, so loading it later gives what loading it at the
read would have given.

Example
-------
>>> import tempfile, actstore
>>> st = actstore.open(tempfile.mkdtemp(), create=True)
>>> st.reads.runs()
[]
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from actstore.errors import HookNotFoundError, RunNotFoundError
from actstore.store import arrays as _arrays
from actstore.store import attach as _attach
from actstore.store import mapped as _mapped
from actstore.store.catalog import damaged_catalog, query_arrow
from actstore.store.ids import as_id
from actstore.store.predicate import predicate_or_true

if TYPE_CHECKING:
    from actstore.store.store import Params, Store

__all__ = ["SETTLED_S", "ReadCache", "meta_for_rows", "rows_where", "select_rows"]

SETTLED_S = 3.0
"""Age (s) a catalog file's modification time must have before its stamp is trusted."""
COPY_MAX_ROWS = 2_000_000
"""Most token rows of a run whose tokens (and prompts) a session keeps a copy of."""
COPY_MAX_BYTES = 256 * 2**20
"""Above this (about 64 bytes a token plus its prompt's text), the copy stays unjoined."""

Stamp = tuple[tuple[int, int, int] | None, ...]


class ReadCache:
    """Runs, arrays rows and opened arrays of one store, valid for one ``commit_seq``.

    Parameters
    ----------
    store
        The store whose catalog is cached.

    Example
    -------
    >>> import tempfile, actstore
    >>> st = actstore.open(tempfile.mkdtemp(), create=True)
    >>> st.reads.seq()
    0
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.RLock()
        self._seq: int | None = None
        self._stamp: Stamp | None = None  # trusted stamp of the catalog files, if any
        self._runs: list[dict[str, Any]] = []
        self._arrays: dict[tuple[int, str], dict[str, Any]] = {}
        self._opened: dict[str, Any] = {}
        self._copy: tuple[int, int, str] | None = None  # (seq, run id, table) in the session

    def _file_stamp(self) -> Stamp | None:
        loc = self._store.location
        if not loc.is_local:
            return None
        path = str(self._store.catalog.path)
        out: list[tuple[int, int, int] | None] = []
        for p in (path, path + ".wal"):
            try:
                s = os.stat(p)
            except FileNotFoundError:
                out.append(None)
                continue
            out.append((s.st_ino, s.st_size, s.st_mtime_ns))
        return tuple(out)

    def _fresh(self) -> None:
        """Make the cache that of the catalog's current ``commit_seq`` (under the lock)."""
        stamp = self._file_stamp()
        if stamp is not None and stamp == self._stamp:
            return
        try:  # a cursor of the process's DuckDB: starting one of its own costs 20-50 ms
            with _attach.cursor() as con, self._store.catalog.attached(con, _attach.ALIAS):
                self._load(con)
        except duckdb.Error as e:
            bad = damaged_catalog(self._store.catalog.path, e)
            if bad is None:
                raise
            raise bad from None
        settled = stamp is not None and all(
            s is None or time.time_ns() - s[2] > SETTLED_S * 1e9 for s in stamp
        )
        self._stamp = stamp if settled else None

    def _load(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read ``commit_seq`` from the attached catalog; on a change, the tables too."""
        got = con.execute("SELECT value FROM cat.main.meta WHERE key = 'commit_seq'").fetchall()
        seq = int(got[0][0]) if got else -1
        if seq == self._seq:
            return
        runs = query_arrow(con, "SELECT run_id, name FROM cat.main.runs ORDER BY run_id")
        arrs = query_arrow(con, "SELECT * FROM cat.main.arrays ORDER BY layer NULLS LAST, hook")
        self._runs = runs.to_pylist()
        self._arrays = {(int(a["run_id"]), str(a["hook"])): a for a in arrs.to_pylist()}
        self._opened = {}
        self._seq = seq

    def labeled_copy(self, rid: int) -> str | None:
        """A view of run ``rid``'s ``labeled_tokens`` over in-memory copies, or None.

        Made for one run at a time (at most :data:`COPY_MAX_ROWS` rows) and only while
        the catalog's stamp is trusted (so not again at every commit of a running
        ingest); it is the view's rows at the current ``commit_seq``, so a predicate
        over it selects what it selects over the view.

        Example
        -------
        >>> st.reads.labeled_copy(2)  # doctest: +SKIP
        'memory.main._actstore_labeled_2'
        """
        with self._lock:
            self._fresh()
            if self._stamp is None or self._seq is None:
                return None
            if self._copy is not None and self._copy[:2] == (self._seq, rid):
                return self._copy[2]
            n = max((int(a["n_rows"]) for (r, _), a in self._arrays.items() if r == rid), default=0)
            if n > COPY_MAX_ROWS:
                return None
            seq, table = self._seq, f"memory.main._actstore_labeled_{int(rid)}"
            with self._store.session.connection() as con:
                if self._copy is not None:
                    _drop(con, self._copy[2])
                    self._copy = None
                # the run's tokens, its runs row and its prompts (once each, not per
                # token), joined as the session's labeled_tokens view joins them
                for part, src in (
                    ("tok", f'tokens WHERE run_id = {int(rid)} ORDER BY "row"'),
                    ("run", f"runs WHERE run_id = {int(rid)}"),
                    (
                        "p",
                        f"prompts WHERE prompt_set_id = (SELECT prompt_set_id FROM "
                        f"cat.main.runs WHERE run_id = {int(rid)})",
                    ),
                ):
                    con.execute(
                        f"CREATE OR REPLACE TABLE {table}_{part} AS SELECT * FROM cat.main.{src}"
                    )
                con.execute(
                    f"""CREATE OR REPLACE VIEW {table} AS
                    SELECT t.*, r.name AS run, r.checkpoint_id, r.prompt_set_id,
                           p.* EXCLUDE (prompt_set_id, prompt_idx)
                    FROM {table}_tok t JOIN {table}_run r USING (run_id)
                    LEFT JOIN {table}_p p
                      ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = t.prompt_idx"""
                )
                # joined once, unless its prompts' text repeated per token would be big
                text = con.execute(
                    f"SELECT sum(length(p.text)) FROM {table}_tok t JOIN {table}_p p USING (prompt_idx)"
                ).fetchall()[0][0]
                name = table
                if n * 64 + int(text or 0) <= COPY_MAX_BYTES:
                    name = f"{table}_all"
                    con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM {table}")
                now = con.execute("SELECT value FROM cat.main.meta WHERE key = 'commit_seq'")
                if int(now.fetchall()[0][0]) != seq:  # a commit while copying: do not keep it
                    _drop(con, table)
                    return None
            self._copy = (seq, int(rid), name)
            return name

    def close(self) -> None:
        """Forget the catalog stamp, so the next read checks ``commit_seq`` (nothing is held
        open between reads: each uses a cursor of the process's DuckDB for its attach).

        Example
        -------
        >>> st.reads.close()  # doctest: +SKIP
        """
        with self._lock:
            self._stamp = None

    def seq(self) -> int:
        """The catalog's current ``commit_seq`` (what the cache is valid for).

        Example
        -------
        >>> st.reads.seq()  # doctest: +SKIP
        42
        """
        with self._lock:
            self._fresh()
            assert self._seq is not None
            return self._seq

    def runs(self) -> list[dict[str, Any]]:
        """``[{"run_id": ..., "name": ...}, ...]`` in run id order.

        Example
        -------
        >>> [r["name"] for r in st.reads.runs()]  # doctest: +SKIP
        ['base/pairs', 'backdoored/pairs']
        """
        with self._lock:
            self._fresh()
            return [dict(r) for r in self._runs]

    def run(self, run: str | int) -> tuple[int, str]:
        """``(run_id, name)`` of a run name or id; a miss lists the runs.

        Example
        -------
        >>> st.reads.run("backdoored/pairs")  # doctest: +SKIP
        (2, 'backdoored/pairs')
        """
        with self._lock:
            self._fresh()
            rid = as_id(run)
            for r in self._runs:
                if run == r["name"] or (rid is not None and rid == r["run_id"]):
                    return int(r["run_id"]), str(r["name"])
            names = [r["name"] for r in self._runs]
        root = self._store.root
        raise RunNotFoundError(
            f"run {run if rid is None else rid!r} not in store {root}; "
            f"runs: {names or 'none yet'} (see `actstore info {root}`)"
        )

    def hooks(self, run: str | int) -> list[str]:
        """The hooks stored for a run, by layer (then name).

        Example
        -------
        >>> st.reads.hooks("backdoored/pairs")[:1]  # doctest: +SKIP
        ['blocks.0.hook_resid_post']
        """
        with self._lock:
            rid, _ = self.run(run)
            return [h for (r, h) in self._arrays if r == rid]

    def array_info(self, run: str | int, hook: str) -> dict[str, Any]:
        """A copy of the ``arrays`` row of (run, hook); a miss lists the run's hooks.

        Example
        -------
        >>> st.reads.array_info("backdoored/pairs", "blocks.2.hook_resid_post")["d"]  # doctest: +SKIP
        64
        """
        with self._lock:
            rid, _ = self.run(run)
            info = self._arrays.get((rid, hook))
            if info is not None:
                return dict(info)
            have = self.hooks(rid)
        raise HookNotFoundError(
            f"hook {hook!r} not in run {run!r}; it has {have or 'no hooks'} "
            f"(see `actstore info {self._store.root}`)"
        )

    def array(self, run: str | int, hook: str) -> tuple[Any, dict[str, Any]]:
        """The Zarr array of (run, hook) opened read-only (once per commit) and its row.

        Example
        -------
        >>> arr, info = st.reads.array("backdoored/pairs", "blocks.2.hook_resid_post")  # doctest: +SKIP
        """
        with self._lock:
            info = self.array_info(run, hook)
            path = str(info["path"])
            arr = self._opened.get(path)
            if arr is None:
                arr = _arrays.open_array(self._store.location, path, mode="r")
                self._opened[path] = arr
            return arr, info

    def reader(self, run: str | int, hook: str) -> tuple[Any, dict[str, Any]]:
        """The array of (run, hook) for reading rows, and its row: a raw sharded array on
        the local disk opened from its ``zarr.json`` (no zarr import,
        :mod:`actstore.store.mapped`), any other opened with zarr (:meth:`array`).

        Example
        -------
        >>> arr, info = st.reads.reader("backdoored/pairs", "blocks.2.hook_resid_post")  # doctest: +SKIP
        >>> type(arr).__name__  # doctest: +SKIP
        'MappedArray'
        """
        with self._lock:
            info = self.array_info(run, hook)
            key = "reader:" + str(info["path"])
            arr = self._opened.get(key)
            if arr is None:  # either way once per commit (not zarr.json read again per call)
                arr = _mapped.open_mapped(self._store.location, str(info["path"]))
                if arr is None:
                    arr = self.array(run, hook)[0]
                self._opened[key] = arr
            return arr, info


def _drop(con: duckdb.DuckDBPyConnection, table: str) -> None:
    table = table.removesuffix("_all")
    con.execute(f"DROP TABLE IF EXISTS {table}_all")
    con.execute(f"DROP VIEW IF EXISTS {table}")
    for part in ("tok", "run", "p"):
        con.execute(f"DROP TABLE IF EXISTS {table}_{part}")


def rows_where(
    store: Store, rid: int, n_rows: int, where: str | None, params: Params
) -> np.ndarray:
    """The committed rows of run ``rid`` that the predicate ``where`` selects, ascending.

    Only the ``row`` column is fetched.

    Example
    -------
    >>> rows_where(st, 2, 1440, "triggered AND position_role = 'last'", None)[:3]  # doctest: +SKIP
    array([ 23,  47,  71])
    """
    cond = predicate_or_true(where, what="where")
    tail = f'"row" IS NOT NULL AND "row" < {int(n_rows)} AND {cond} ORDER BY "row"'
    got = _from_copy(store, rid, f'SELECT "row" FROM {{t}} WHERE {tail}', params)
    if got is None:
        got = store.session.execute(
            f'SELECT "row" FROM labeled_tokens WHERE run_id = {int(rid)} AND {tail}', params
        )
    return np.asarray(got.column("row").to_numpy(), dtype=np.int64)


def _from_copy(
    store: Store, rid: int, query: str, params: Params, want: pa.Table | None = None
) -> pa.Table | None:
    """``query`` with ``{t}`` the run's copy of ``labeled_tokens``, or None (use the view).

    Runs without attaching the catalog. Whatever fails here (a predicate calling a
    function that reads the catalog, or a wrong one) returns None, and the caller's
    query over the view raises the error a user should see.
    """
    table = store.reads.labeled_copy(rid)
    if table is None:
        return None
    session = store.session
    with session._lock:
        try:
            if want is not None:
                session.con.register("_want", want)
            return query_arrow(session.con, query.format(t=table), params)
        except duckdb.Error:
            return None
        finally:
            if want is not None:
                session.con.unregister("_want")


def select_rows(
    store: Store, rid: int, n_rows: int, where: str | None, params: Params
) -> tuple[np.ndarray, pa.Table]:
    """The rows ``where`` selects and their ``labeled_tokens`` rows (every column), by row.

    Example
    -------
    >>> rows, meta = select_rows(st, 2, 1440, "triggered", None)  # doctest: +SKIP
    """
    cond = predicate_or_true(where, what="where")
    meta = store.session.execute(
        f"""SELECT * FROM labeled_tokens
            WHERE run_id = {int(rid)} AND "row" IS NOT NULL AND "row" < {int(n_rows)}
              AND {cond} ORDER BY "row" """,
        params,
    )
    return meta.column("row").to_numpy().astype(np.int64), meta


def meta_for_rows(store: Store, rid: int, rows: np.ndarray) -> pa.Table:
    """The ``labeled_tokens`` rows of run ``rid`` for ``rows``, in their order (repeats kept).

    Example
    -------
    >>> meta_for_rows(st, 2, np.array([5, 1])).column("row").to_pylist()  # doctest: +SKIP
    [5, 1]
    """
    order = pa.table({"_row": pa.array(rows, pa.int64()), "_ord": pa.array(np.arange(rows.size))})
    join = 'SELECT lt.* FROM _want w JOIN {t} lt ON lt."row" = w._row ORDER BY w._ord'
    got = _from_copy(store, rid, join, None, want=order)
    if got is not None:
        return got
    with store.session.connection() as con:
        con.register("_want", order)
        try:
            return query_arrow(
                con,
                f"""SELECT lt.* FROM _want w JOIN labeled_tokens lt
                    ON lt.run_id = {int(rid)} AND lt."row" = w._row ORDER BY w._ord""",
            )
        finally:
            con.unregister("_want")
