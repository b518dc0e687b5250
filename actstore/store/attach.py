"""One DuckDB per process to attach catalog files to, for one transaction or one query.

Nobody holds a catalog file for long (see :mod:`actstore.store.catalog`), so a
store's life is many short opens. Starting a DuckDB (``duckdb.connect()``, even
in memory) costs about 18 ms on the benchmark machine; attaching a file to one
that is already running, using it and detaching it again costs 1.4 ms to read
and 2 ms to write. So every catalog read and write of a process attaches its file
to one in-memory DuckDB, on a cursor of its own, and detaches it when done:
detaching a file written to checkpoints it (no ``.wal`` is left behind) and
releases DuckDB's lock on it, exactly as closing a connection to it did.

One file is attached at a time. A second thread, or a catalog operation nested
inside another, does not wait for the first: it starts a DuckDB of its own for
the operation, as every operation did before (so no lock order between
catalogs can deadlock). A child process made by ``fork`` starts its own DuckDB
rather than use its parent's.

Example
-------
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "c.duckdb"
>>> with attached(path, read_only=False, retry=lambda what, fn: fn()) as con:
...     _ = con.execute("CREATE TABLE t AS SELECT 42 AS x")
>>> with attached(path, read_only=True, retry=lambda what, fn: fn()) as con:
...     con.execute("SELECT x FROM t").fetchall()
[(42,)]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb

__all__ = ["ALIAS", "attached", "cursor"]

ALIAS = "cat"
"""The name the attached catalog has (and the one in ``USE``) for the operation."""

_GUARD = threading.Lock()
_shared: tuple[int, duckdb.DuckDBPyConnection] | None = None
_forked: list[duckdb.DuckDBPyConnection] = []  # a parent's DuckDB: never used nor closed


def _instance() -> duckdb.DuckDBPyConnection:
    """This process's DuckDB (under ``_GUARD``); made on first use and after a fork."""
    global _shared
    if _shared is not None and _shared[0] != os.getpid():
        _forked.append(_shared[1])
        _shared = None
    if _shared is None:
        _shared = (os.getpid(), duckdb.connect())
    return _shared[1]


def _drop_instance() -> None:
    """Forget this process's DuckDB after a failed clean-up (the next use starts one)."""
    global _shared
    if _shared is not None:
        con, _shared = _shared[1], None
        with suppress(duckdb.Error):
            con.close()


@contextmanager
def attached(
    path: Path, *, read_only: bool, retry: Callable[[str, Callable[[], Any]], Any]
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection with the catalog file ``path`` attached as :data:`ALIAS` and in use.

    Parameters
    ----------
    path
        The catalog file (created by a read-write attach if missing).
    read_only
        Attach it read-only (a query) or read-write (a transaction).
    retry
        ``retry(what, fn)`` runs the attach, retrying while another process holds
        the file (:meth:`actstore.store.catalog.Catalog._retry`).

    Example
    -------
    >>> with attached(path, read_only=True, retry=cat._retry) as con:  # doctest: +SKIP
    ...     con.execute("SELECT count(*) FROM runs").fetchall()
    [(3,)]
    """
    with cursor() as cur, _attached_to(cur, path, read_only, retry) as con:
        yield con


@contextmanager
def cursor() -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor of this process's DuckDB, for a caller that attaches the file itself.

    As for :func:`attached`: while that DuckDB is in use (another thread, or nested)
    the caller gets a DuckDB of its own. Whatever the caller attaches it must detach
    (as ``Catalog.attached`` does, under the name :data:`ALIAS`); a failure that
    leaves it attached drops this process's DuckDB.

    Example
    -------
    >>> with cursor() as con:
    ...     con.execute("SELECT 42").fetchall()
    [(42,)]
    """
    if not _GUARD.acquire(blocking=False):
        own = duckdb.connect()
        try:
            yield own
        finally:
            own.close()
        return
    try:
        cur = _instance().cursor()
        try:
            yield cur
        except BaseException:
            if _still_attached(cur):
                _drop_instance()
            raise
        finally:
            cur.close()
    finally:
        _GUARD.release()


@contextmanager
def _attached_to(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    read_only: bool,
    retry: Callable[[str, Callable[[], Any]], Any],
) -> Iterator[duckdb.DuckDBPyConnection]:
    quoted = str(path).replace("'", "''")
    mode = " (READ_ONLY)" if read_only else ""
    retry(
        "read" if read_only else "write", lambda: con.execute(f"ATTACH '{quoted}' AS {ALIAS}{mode}")
    )
    try:
        con.execute(f"USE {ALIAS}")
        yield con
    finally:
        con.execute("USE memory")
        con.execute(f"DETACH {ALIAS}")


def _still_attached(con: duckdb.DuckDBPyConnection) -> bool:
    try:
        rows = con.execute(
            "SELECT count(*) FROM duckdb_databases() WHERE database_name = ?", [ALIAS]
        ).fetchall()
    except duckdb.Error:
        return True
    return bool(rows[0][0])
