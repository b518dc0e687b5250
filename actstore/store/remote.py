"""The catalog and write lock of a store in object storage (S3, GCS, ``memory://``...).

DuckDB cannot open a database file in an object store, and an object cannot be
changed in place, so a remote store's catalog is a sequence of immutable
**generations**: ``catalog/v000000000042.duckdb`` is the whole catalog after
the 42nd commit. A commit

1. brings the writer's local working copy up to the newest generation (listing
   ``catalog/``; downloading it if another writer committed since),
2. runs the transaction on the working copy (arrays and Parquet parts are
   already uploaded: step 1 of the store's append order is unchanged),
3. **publishes** it as the next generation with an exclusive create (S3's
   conditional ``If-None-Match: *`` put). That put is the commit point: of two
   writers racing for one generation exactly one wins; the other gets
   :class:`~actstore.errors.ConcurrentWriteError` and publishes nothing.

A reader lists ``catalog/`` (at most once per ``refresh`` seconds), downloads
the newest generation into its cache once, and attaches that file read-only
for each statement, so every statement sees one whole commit, never part of
one, and never data files a commit has not listed. Old generations are deleted
after :data:`KEEP_GENERATIONS` newer ones exist; a reader that lost the race
for one lists again.

Writers also take a **lease** (``write.lock``, created exclusively, refreshed on
every commit, expired after :data:`LEASE_SECONDS` without one) so that two
ingests into the same store fail fast instead of overwriting each other's array
shards. Parallel ingests write shard stores and ``actstore merge`` them.

Example
-------
>>> from actstore.store.location import Location
>>> cat = RemoteCatalog(Location.parse("memory://remote-doc/store"))
>>> cat.create()
>>> with cat.write() as con:
...     _ = con.execute("INSERT INTO meta VALUES ('k', 'v')")
>>> cat.read("SELECT value FROM meta").to_pylist(), cat.generation()
([{'value': 'v'}], 2)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from actstore.errors import ConcurrentWriteError, StoreLockedError
from actstore.store.catalog import Catalog, T
from actstore.store.location import Location

__all__ = ["KEEP_GENERATIONS", "LEASE_SECONDS", "RemoteCatalog", "RemoteWriteLock", "cache_dir"]

CATALOG_DIR = "catalog"
LOCK_FILE = "write.lock"
#: Generations kept behind the newest one (readers a few commits behind still find theirs).
KEEP_GENERATIONS = 8
#: A writer's lease expires this long after its last commit (a killed writer's lock).
LEASE_SECONDS = 600.0
_GEN = re.compile(r"v(\d{12})\.duckdb$")


def cache_dir(loc: Location, store_id: str = "") -> Path:
    """The local directory caching the catalog generations of remote store ``loc``.

    ``$ACTSTORE_CACHE`` (default ``~/.cache/actstore``) / ``remote`` / a hash of the
    URL and the store's id (from its marker), so another store at the same URL
    (another endpoint, or one deleted and made again) has its own cache.

    Example
    -------
    >>> cache_dir(Location.parse("s3://b/s")).parent.name
    'remote'
    """
    base = Path(os.environ.get("ACTSTORE_CACHE", "~/.cache/actstore")).expanduser()
    key = hashlib.sha256(f"{loc.url}\n{store_id}".encode()).hexdigest()[:16]
    return base / "remote" / key


def _gen_name(g: int) -> str:
    return f"{CATALOG_DIR}/v{g:012d}.duckdb"


class GenerationTakenError(ConcurrentWriteError):
    """Another writer published the catalog generation this commit was to take.

    Example
    -------
    >>> issubclass(GenerationTakenError, ConcurrentWriteError)
    True
    """


class RemoteCatalog(Catalog):
    """The catalog of a store at an fsspec URL: published generations of a DuckDB file.

    Parameters
    ----------
    loc
        The store's location.
    store_id
        The store's id (``actstore.json``): keys the local cache of generations.
    refresh
        Seconds a reader reuses its last listing of the generations before listing
        again (writers always list).

    Example
    -------
    >>> cat = RemoteCatalog(Location.parse("memory://remote-doc/cat2")); cat.create()
    >>> cat.read("SELECT count(*) AS n FROM runs").to_pylist()
    [{'n': 0}]
    """

    def __init__(
        self,
        loc: Location,
        *,
        store_id: str = "",
        refresh: float = 1.0,
        lock_timeout: float = 120.0,
    ):
        self.loc = loc
        self.cache = cache_dir(loc, store_id)
        self.cache.mkdir(parents=True, exist_ok=True)
        work = self.cache / f"work-{os.getpid()}-{uuid.uuid4().hex[:8]}.duckdb"
        super().__init__(work, lock_timeout=lock_timeout)
        self.refresh = refresh
        self._work_gen: int | None = None  # the generation the working copy holds
        self._listed: tuple[float, int] | None = None
        self.lease: RemoteWriteLock | None = None  # set by a writer holding the lease

    def __del__(self) -> None:
        # the working copy is private to this object; at interpreter exit modules may be gone
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:  # noqa: SIM105
                os.unlink(p)
            except Exception:
                pass

    # -- generations --------------------------------------------------------------

    def generations(self) -> list[int]:
        """The published generations, oldest first (one fresh listing).

        Example
        -------
        >>> RemoteCatalog(Location.parse("memory://remote-doc/none")).generations()
        []
        """
        names = [f[len(CATALOG_DIR) + 1 :] for f in self.loc.files(CATALOG_DIR)]
        return sorted(int(m.group(1)) for n in names if (m := _GEN.fullmatch(n)))

    def generation(self, *, fresh: bool = False) -> int:
        """The newest published generation (0: none), listed at most every ``refresh`` s.

        Example
        -------
        >>> RemoteCatalog(Location.parse("memory://remote-doc/g0")).generation()
        0
        """
        now = time.monotonic()
        if not fresh and self._listed is not None and now - self._listed[0] < self.refresh:
            return self._listed[1]
        gens = self.generations()
        g = gens[-1] if gens else 0
        self._listed = (now, g)
        return g

    def _cached(self, g: int) -> Path:
        """The local copy of generation ``g``, downloaded once (immutable, shared)."""
        path = self.cache / f"v{g:012d}.duckdb"
        if not path.exists():
            self._put_cache(g, self.loc.read_bytes(_gen_name(g)))
            self._prune_cache(g)
        return path

    def _put_cache(self, g: int, data: bytes) -> None:
        """Place generation ``g``'s bytes in the cache (temporary name, then rename)."""
        tmp = self.cache / f".v{g:012d}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.cache / f"v{g:012d}.duckdb")

    def _prune_cache(self, newest: int) -> None:
        for p in self.cache.glob("v*.duckdb"):
            m = _GEN.fullmatch(p.name)
            if m and int(m.group(1)) < newest - KEEP_GENERATIONS:
                p.unlink(missing_ok=True)

    def _reader_copy(self) -> Path:
        """The newest generation's local copy, listing again if it was just deleted."""
        for attempt in range(5):
            g = self.generation(fresh=attempt > 0)
            if g == 0:
                raise FileNotFoundError(f"store {self.loc.url} has no catalog generation")
            try:
                return self._cached(g)
            except FileNotFoundError:
                continue
        raise ConcurrentWriteError(
            f"store {self.loc.url}: the catalog generations changed faster than they could be "
            "read; retry, or read while fewer commits are under way"
        )

    # -- Catalog interface --------------------------------------------------------------

    def create(self) -> None:
        """Publish generation 1: the empty tables (idempotent).

        Example
        -------
        >>> RemoteCatalog(Location.parse("memory://remote-doc/c3")).create()
        """
        with self.write() as con:
            from actstore.store.catalog import SCHEMA

            con.execute(SCHEMA)

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction on the working copy, published as the next generation.

        Raises
        ------
        ConcurrentWriteError
            Another writer published the same generation first; this commit is not
            published (its data files stay unreferenced, and are recovered).

        Example
        -------
        >>> cat = RemoteCatalog(Location.parse("memory://remote-doc/w")); cat.create()
        >>> with cat.write() as con:
        ...     _ = con.execute("INSERT INTO meta VALUES ('a', 'b')")
        """
        with self._lock:
            gens = self.generations()
            base = gens[-1] if gens else 0
            if self._work_gen != base:
                self.path.with_name(self.path.name + ".wal").unlink(missing_ok=True)
                if base:
                    shutil.copyfile(self._cached(base), self.path)
                else:
                    self.path.unlink(missing_ok=True)
            self._work_gen = None  # until published, the working copy is ahead of any generation
            with super().write() as con:
                yield con
            wal = self.path.with_name(self.path.name + ".wal")
            if wal.exists():  # fold the log into the file: the file alone is published
                c = duckdb.connect(str(self.path))
                c.execute("CHECKPOINT")
                c.close()
            data = self.path.read_bytes()
            new = base + 1
            if self.lease is not None and self.lease.held:
                self.lease.check()
            try:
                self.loc.write_bytes(_gen_name(new), data, exclusive=True)
            except FileExistsError:
                raise GenerationTakenError(
                    f"store {self.loc.url}: another process committed catalog generation {new} "
                    "at the same time, so this commit was not published; one writer at a time "
                    "per store (write shard stores in parallel and `actstore merge` them), then retry"
                ) from None
            self._work_gen = new
            self._put_cache(new, data)  # this process's readers need not download it
            self._listed = (time.monotonic(), new)
            if self.lease is not None and self.lease.held:
                self.lease.renew()
            for g in gens:  # the listing made for this commit: no second LIST
                if g < new - KEEP_GENERATIONS:
                    self.loc.remove(_gen_name(g))
            self._prune_cache(new)

    def transact(self, body: Callable[[duckdb.DuckDBPyConnection], T], attempts: int = 5) -> T:
        """Run ``body(con)`` in one published transaction, again if another writer won.

        When another process publishes the generation this commit was going to
        take, the body is run again on the new generation (up to ``attempts``
        times), so an ingest does not fail because, say, an analysis saved its
        result at the same moment.

        Example
        -------
        >>> cat = RemoteCatalog(Location.parse("memory://remote-doc/tx")); cat.create()
        >>> cat.transact(lambda con: con.execute("INSERT INTO meta VALUES ('a', 'b')") and 7)
        7
        """
        for attempt in range(attempts):
            try:
                with self.write() as con:
                    return body(con)
            except GenerationTakenError:
                if attempt + 1 == attempts:
                    raise
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    def _read_path(self) -> Path:
        return self._reader_copy()

    @contextmanager
    def attached(self, con: duckdb.DuckDBPyConnection, alias: str = "cat") -> Iterator[None]:
        """Attach the newest generation read-only to ``con`` for the duration of a block.

        Example
        -------
        >>> cat = RemoteCatalog(Location.parse("memory://remote-doc/att")); cat.create()
        >>> mem = duckdb.connect()
        >>> with cat.attached(mem):
        ...     mem.execute("SELECT count(*) FROM cat.runs").fetchall()
        [(0,)]
        """
        with self._lock:
            path = str(self._reader_copy()).replace("'", "''")
            con.execute(f"ATTACH '{path}' AS {alias} (READ_ONLY)")
            try:
                yield
            finally:
                con.execute(f"DETACH {alias}")


class RemoteWriteLock:
    """The writer lease of a remote store: ``write.lock``, created exclusively.

    It names its holder (host, pid, time). A lease is taken over when its
    holder is dead: a process of this host that no longer exists (a killed job
    requeued on the same node resumes at once), or any holder that has not
    renewed it for :data:`LEASE_SECONDS`. :meth:`break_lease` (``actstore unlock``)
    ends the lease of a writer killed on another machine.

    Example
    -------
    >>> loc = Location.parse("memory://remote-doc/lock")
    >>> lk = RemoteWriteLock(loc)
    >>> RemoteWriteLock.held_elsewhere(loc, lk.token)
    False
    >>> lk.release()
    """

    def __init__(self, loc: Location, lease: float = LEASE_SECONDS) -> None:
        self.loc = loc
        self.lease = lease
        self.token = uuid.uuid4().hex
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._guard = threading.Lock()
        self._held = False
        body = self._body()
        try:
            loc.write_bytes(LOCK_FILE, body, exclusive=True)
        except FileExistsError:
            holder = self._holder()
            if holder is not None and _alive(holder, lease):
                raise StoreLockedError(
                    f"another process is writing to store {loc.url} (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, since {holder.get('since')}); wait for it to "
                    "finish (or write to a separate shard store and merge). If that process "
                    f"is dead, `actstore unlock {loc.url}` ends its lease (it also expires "
                    f"{lease:.0f}s after its last commit)."
                ) from None
            loc.remove(LOCK_FILE)  # dead, expired or vanished: take it over
            try:
                loc.write_bytes(LOCK_FILE, body, exclusive=True)
            except FileExistsError:
                raise StoreLockedError(
                    f"another process took the write lease of store {loc.url} just now; wait "
                    "for it to finish"
                ) from None
        self._held = True

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": self.since,
                "renewed": now,
            }
        ).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            body = self.loc.read_json(LOCK_FILE)
        except (FileNotFoundError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    @property
    def held(self) -> bool:
        """Whether this lease is still held (not released).

        Example
        -------
        >>> lk = RemoteWriteLock(Location.parse("memory://remote-doc/held")); lk.held
        True
        >>> lk.release(); lk.held
        False
        """
        return self._held

    def check(self) -> None:
        """Raise if the lease was taken over (this writer stalled past its lease).

        Example
        -------
        >>> lk = RemoteWriteLock(Location.parse("memory://remote-doc/check")); lk.check()
        >>> lk.release()
        """
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            raise ConcurrentWriteError(
                f"store {self.loc.url}: this writer's lease expired and another writer took "
                "the store over; this commit was not published. Re-run the job to resume."
            )

    def renew(self) -> None:
        """Extend the lease (after each commit).

        Example
        -------
        >>> lk = RemoteWriteLock(Location.parse("memory://remote-doc/renew")); lk.renew()
        >>> lk.release()
        """
        with self._guard:
            if self._held:
                self.loc.write_bytes(LOCK_FILE, self._body())

    @classmethod
    def held_elsewhere(cls, loc: Location, token: str | None = None) -> bool:
        """Whether a live lease other than ``token`` holds the store.

        Example
        -------
        >>> RemoteWriteLock.held_elsewhere(Location.parse("memory://remote-doc/none"))
        False
        """
        try:
            holder = loc.read_json(LOCK_FILE)
        except (FileNotFoundError, ValueError):
            return False
        if not isinstance(holder, dict) or holder.get("token") == token:
            return False
        return _alive(holder, LEASE_SECONDS)

    @classmethod
    def break_lease(cls, loc: Location) -> dict[str, Any] | None:
        """End the lease on ``loc`` whoever holds it; return its holder (None: no lease).

        For a writer killed on another machine. A live writer whose lease is broken
        publishes nothing more (its next commit fails with ConcurrentWriteError).

        Example
        -------
        >>> loc = Location.parse("memory://remote-doc/break")
        >>> _ = RemoteWriteLock(loc)  # a writer that never releases
        >>> sorted(RemoteWriteLock.break_lease(loc))[:2], RemoteWriteLock.break_lease(loc)
        (['host', 'pid'], None)
        """
        try:
            holder = loc.read_json(LOCK_FILE)
        except (FileNotFoundError, ValueError):
            return None
        loc.remove(LOCK_FILE)
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        """Give the lease back (idempotent).

        Example
        -------
        >>> lk = RemoteWriteLock(Location.parse("memory://remote-doc/rel"))
        >>> lk.release(); lk.release()
        """
        with self._guard:
            if self._held:
                holder = self._holder()
                if holder is not None and holder.get("token") == self.token:
                    self.loc.remove(LOCK_FILE)
                self._held = False


def _alive(holder: dict[str, Any], lease: float) -> bool:
    """Whether a lease's holder may still be writing."""
    if time.time() - float(holder.get("renewed", 0)) >= lease:
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except ProcessLookupError:
            return False  # a process of this host that is gone
        except (PermissionError, ValueError, OverflowError):
            pass
    return True
