"""The DuckDB catalog: every small and medium table of a store, and safe access to it.

DuckDB lets one process write a database file, and no process read it while one
writes. A store must be readable while an ingest writes to it, so nobody holds
the file for long: a writer attaches it for one transaction (one committed batch)
and detaches it; a reader attaches it read-only for one statement and detaches it
(both to one DuckDB per process, :mod:`actstore.store.attach`, not a new one each).
Whoever finds the file locked retries with a short back-off, so readers and
writers never wait for each other longer than one commit or one query.
In one process a lock per path serialises the two (DuckDB's file locks are per
process, so they would not).

The tables are created by :data:`SCHEMA`; ``docs/FORMAT.md`` documents each
column. Prompt label columns are added to ``prompts`` as real, typed columns
when a prompt set brings them.

Example
-------
>>> import tempfile, pathlib
>>> cat = Catalog(pathlib.Path(tempfile.mkdtemp()) / "catalog.duckdb")
>>> cat.create()
>>> with cat.write() as con:
...     _ = con.execute("INSERT INTO meta VALUES ('hello', 'world')")
>>> cat.read("SELECT value FROM meta WHERE key = ?", ["hello"]).to_pylist()
[{'value': 'world'}]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from actstore.errors import CorruptChunkError, StoreLockedError
from actstore.store import attach as _attach

T = TypeVar("T")

#: Catalog schema, format v1. Keys are documented, not declared: DuckDB's index
#: maintenance makes updates slow and one writer at a time enforces them anyway.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR, value VARCHAR);
CREATE TABLE IF NOT EXISTS models (
    model_id INTEGER, name VARCHAR, family VARCHAR, architecture VARCHAR,
    n_layers INTEGER, d_model INTEGER, d_mlp INTEGER, d_vocab INTEGER,
    tokenizer_hash VARCHAR, config JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id INTEGER, model_id INTEGER, label VARCHAR, path VARCHAR,
    revision VARCHAR, weights_hash VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS prompt_sets (
    prompt_set_id INTEGER, name VARCHAR, path VARCHAR, content_hash VARCHAR,
    n_prompts INTEGER, text_column VARCHAR, label_columns JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_set_id INTEGER, prompt_idx INTEGER, text VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER, name VARCHAR, checkpoint_id INTEGER, prompt_set_id INTEGER,
    status VARCHAR, positions VARCHAR, store_dtype VARCHAR, hooks JSON,
    quantization VARCHAR, device VARCHAR, job_hash VARCHAR,
    parent_run_id INTEGER, edit_id INTEGER, n_prompts INTEGER,
    provenance JSON, created_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS tokens (
    run_id INTEGER, prompt_idx INTEGER, position INTEGER, token_id INTEGER,
    token_text VARCHAR, position_role VARCHAR, pos_from_end INTEGER,
    in_span BOOLEAN, is_completion BOOLEAN, "row" BIGINT);
CREATE TABLE IF NOT EXISTS arrays (
    run_id INTEGER, hook VARCHAR, layer INTEGER, path VARCHAR, dtype VARCHAR,
    d INTEGER, n_rows BIGINT, chunk_rows INTEGER, shard_rows INTEGER,
    compression VARCHAR);
CREATE TABLE IF NOT EXISTS batches (
    run_id INTEGER, batch_idx INTEGER, first_prompt INTEGER, n_prompts INTEGER,
    first_row BIGINT, n_rows BIGINT, committed_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS saes (
    sae_id INTEGER, name VARCHAR, source VARCHAR, hook VARCHAR, layer INTEGER,
    d_in INTEGER, d_sae INTEGER, architecture VARCHAR, weights_hash VARCHAR,
    config JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS feature_files (
    run_id INTEGER, sae_id INTEGER, path VARCHAR, first_row BIGINT,
    n_rows BIGINT, n_nonzero BIGINT, n_bytes BIGINT, crc32c BIGINT);
CREATE TABLE IF NOT EXISTS generations (
    run_id INTEGER, prompt_idx INTEGER, sample_idx INTEGER, text VARCHAR,
    token_ids INTEGER[], n_tokens INTEGER);
CREATE TABLE IF NOT EXISTS scores (
    run_id INTEGER, prompt_idx INTEGER, sample_idx INTEGER, scorer VARCHAR,
    value DOUBLE, flag BOOLEAN);
CREATE TABLE IF NOT EXISTS directions (
    direction_id INTEGER, name VARCHAR, hook VARCHAR, d INTEGER, vector DOUBLE[],
    method VARCHAR, run_id INTEGER, analysis_id INTEGER, params JSON,
    created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS analyses (
    analysis_id INTEGER, name VARCHAR, kind VARCHAR, params JSON, result JSON,
    provenance JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS edits (
    edit_id INTEGER, name VARCHAR, spec JSON, created_at TIMESTAMP);
"""

#: The tables of :data:`SCHEMA`, in order.
TABLES = [
    "meta",
    "models",
    "checkpoints",
    "prompt_sets",
    "prompts",
    "runs",
    "tokens",
    "arrays",
    "batches",
    "saes",
    "feature_files",
    "generations",
    "scores",
    "directions",
    "analyses",
    "edits",
]

_process_locks: dict[str, threading.RLock] = {}
_process_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.RLock:
    key = str(path.resolve())
    with _process_locks_guard:
        return _process_locks.setdefault(key, threading.RLock())


def _is_lock_error(e: Exception) -> bool:
    msg = str(e).lower()
    return "lock" in msg and ("conflicting" in msg or "could not set" in msg)


class Catalog:
    """Short-lived, locked access to one store's ``catalog.duckdb``.

    Parameters
    ----------
    path
        The catalog file.
    lock_timeout
        Seconds to keep retrying while another process holds the file.

    Example
    -------
    >>> import tempfile, pathlib
    >>> cat = Catalog(pathlib.Path(tempfile.mkdtemp()) / "c.duckdb"); cat.create()
    >>> cat.read("SELECT count(*) AS n FROM runs").to_pylist()
    [{'n': 0}]
    """

    def __init__(self, path: Path, lock_timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._lock = _lock_for(self.path)

    def _retry(self, what: str, fn: Any) -> Any:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while True:
            try:
                return fn()
            except (duckdb.IOException, duckdb.BinderException) as e:
                if not _is_lock_error(e):
                    raise
                if time.monotonic() > deadline:
                    raise StoreLockedError(
                        f"catalog {self.path} stayed locked for {self.lock_timeout:.0f}s while "
                        f"trying to {what}; another process holds it: wait for it or stop it"
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def create(self) -> None:
        """Create the tables (idempotent).

        Example
        -------
        >>> import tempfile, pathlib
        >>> Catalog(pathlib.Path(tempfile.mkdtemp()) / "c.duckdb").create()
        """
        with self.write() as con:
            con.execute(SCHEMA)

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the catalog for one transaction: commit on success, roll back on error.

        Example
        -------
        >>> import tempfile, pathlib
        >>> cat = Catalog(pathlib.Path(tempfile.mkdtemp()) / "c.duckdb"); cat.create()
        >>> with cat.write() as con:
        ...     _ = con.execute("INSERT INTO meta VALUES ('k', 'v')")
        """
        with self._lock, _attach.attached(self.path, read_only=False, retry=self._retry) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def transact(self, body: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``body(con)`` in one write transaction and return its result.

        Unlike :meth:`write`, the body may be run again: a remote catalog retries it
        when another writer published the same generation first, so ``body`` must
        only touch the connection (no state outside it until it returns).

        Example
        -------
        >>> import tempfile, pathlib
        >>> cat = Catalog(pathlib.Path(tempfile.mkdtemp()) / "c.duckdb"); cat.create()
        >>> cat.transact(lambda con: con.execute("INSERT INTO meta VALUES ('k', 'v')") and 1)
        1
        """
        with self.write() as con:
            return body(con)

    @contextmanager
    def attached(self, con: duckdb.DuckDBPyConnection, alias: str = "cat") -> Iterator[None]:
        """Attach the catalog read-only to ``con`` as ``alias`` for the duration of a block.

        Example
        -------
        >>> import tempfile, pathlib, duckdb
        >>> cat = Catalog(pathlib.Path(tempfile.mkdtemp()) / "c.duckdb"); cat.create()
        >>> mem = duckdb.connect()
        >>> with cat.attached(mem):
        ...     mem.execute("SELECT count(*) FROM cat.runs").fetchall()
        [(0,)]
        """
        with self._lock:
            path = str(self.path).replace("'", "''")
            self._retry("read", lambda: con.execute(f"ATTACH '{path}' AS {alias} (READ_ONLY)"))
            try:
                yield
            finally:
                con.execute(f"DETACH {alias}")

    def _read_path(self) -> Path:
        """The file that reads attach (a remote catalog's newest generation, downloaded)."""
        return self.path

    def read(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run one read-only query against the catalog alone and return it as Arrow.

        Example
        -------
        >>> import tempfile, pathlib
        >>> cat = Catalog(pathlib.Path(tempfile.mkdtemp()) / "c.duckdb"); cat.create()
        >>> cat.read("SELECT 1 AS one").to_pylist()
        [{'one': 1}]
        """
        try:
            with (
                self._lock,
                _attach.attached(self._read_path(), read_only=True, retry=self._retry) as con,
            ):
                return query_arrow(con, query, params)
        except duckdb.Error as e:
            bad = damaged_catalog(self.path, e)
            if bad is None:
                raise
            raise bad from None


_CORRUPT = ("corrupt database", "checksum", "not a valid duckdb database", "failed to read")


def damaged_catalog(path: Any, e: BaseException) -> CorruptChunkError | None:
    """A one-line :class:`CorruptChunkError` if ``e`` is DuckDB finding the catalog damaged.

    Example
    -------
    >>> str(damaged_catalog("s/catalog.duckdb", duckdb.Error("Corrupt database file: x")))[:44]
    'catalog s/catalog.duckdb is damaged (Corrupt'
    """
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not isinstance(e, duckdb.Error) or not any(m in first.lower() for m in _CORRUPT):
        return None
    return CorruptChunkError(
        f"catalog {path} is damaged ({first}); its tables cannot be trusted: restore the store "
        "from a backup"
    )


def query_arrow(
    con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] | dict[str, Any] | None = None
) -> pa.Table:
    """Run ``query`` on ``con`` and return the result as Arrow (empty for statements).

    Example
    -------
    >>> query_arrow(duckdb.connect(), "SELECT 2 AS two").to_pylist()
    [{'two': 2}]
    """
    rel = con.sql(query, params=params)
    return rel.to_arrow_table() if rel is not None else pa.table({})
