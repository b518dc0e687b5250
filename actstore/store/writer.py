"""Atomic, resumable appends of batches to one run.

A batch is the unit of work of an ingest: its array rows (one block per hook),
its sparse feature rows, its tokens and its generations and scores. The commit
protocol makes a batch visible all at once or not at all:

1. array rows are written into the run's Zarr arrays (rows beyond the catalog's
   ``arrays.n_rows`` are invisible to every reader);
2. feature parts are written under a temporary name and renamed into place
   (parts not listed in ``feature_files`` are invisible, and removed on recovery);
3. one catalog transaction inserts the tokens, batches, feature_files,
   generations and scores rows and advances ``arrays.n_rows``.

A process killed before step 3 leaves the store as it was. Arrays are sharded,
and a partial write of a shard re-reads and re-writes it, so the writer streams
each open shard to a temporary file (or buffers it, for compressed arrays) and
writes whole shards (and a batch's feature part once its rows are on disk). A
catalog transaction costs 50-100 ms, so commits are batched too: the writer
commits every ``commit_interval`` seconds (writing the partial last shard then)
and on :meth:`RunWriter.close`, which bounds the work a kill can lose.

Example
-------
>>> import tempfile, numpy as np, actstore
>>> from actstore.store import objects
>>> st = actstore.open(tempfile.mkdtemp(), create=True)
>>> run = objects.create_run(st, name="r", hooks={"blocks.0.hook_resid_post": (0, 4)})
>>> with st.writer(run) as w:
...     w.append(arrays={"blocks.0.hook_resid_post": np.ones((2, 4), np.float32)},
...              tokens={"prompt_idx": [0, 0], "position": [0, 1], "row": [0, 1]},
...              first_prompt=0, n_prompts=1)
>>> st.acts("r", "blocks.0.hook_resid_post").numpy().shape
(2, 4)
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from actstore.errors import InputError, ReadOnlyError
from actstore.store import arrays as _arrays
from actstore.store import features as _features
from actstore.store import hookstats as _hookstats
from actstore.store.heap import HeapBound
from actstore.store.part_check import checksum
from actstore.store.shard_buffer import HookBuffer as _HookBuffer

if TYPE_CHECKING:
    from actstore.store.store import Store

#: Columns of the ``tokens`` table a batch provides (``run_id`` is added).
TOKEN_COLUMNS: dict[str, pa.DataType] = {
    "prompt_idx": pa.int32(),
    "position": pa.int32(),
    "token_id": pa.int32(),
    "token_text": pa.string(),
    "position_role": pa.string(),
    "pos_from_end": pa.int32(),
    "in_span": pa.bool_(),
    "is_completion": pa.bool_(),
    "row": pa.int64(),
}


@dataclass
class _Pending:
    batch_idx: int
    first_prompt: int
    n_prompts: int
    first_row: int
    n_rows: int
    tokens: pa.Table
    features: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
    generations: pa.Table | None
    scores: pa.Table | None
    attention: pa.Table | None = None
    stats: dict[str, _hookstats.HookStats] = field(default_factory=dict)
    other: dict[str, pa.Table] = field(default_factory=dict)


_WRITE_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Threads writing the hooks' open shards at a flush (file writes and crc32c release the GIL)."""


def _write_open_shards(bufs: Sequence[_HookBuffer], partial: bool, final: bool) -> None:
    """``buf.write(partial, final)`` for every hook, several hooks at once when they all write.

    At a commit (every ``commit_interval`` seconds) and at :meth:`RunWriter.close`
    each hook writes its open shard: on the close of a run that is time nothing else
    overlaps, so the hooks' files are written by a few threads at once.
    """
    if not partial or len(bufs) < 2 or _WRITE_THREADS < 2:
        for b in bufs:
            b.write(partial, final)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="actstore-shards") as pool:
        list(pool.map(lambda b: b.write(partial, final), bufs))  # list: raise what a write raised


def _run_state(store: Store, run_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The run's arrays and its last committed batch and row, in one catalog read."""
    got = store.catalog.read(
        """SELECT 'a' AS k, hook, path, n_rows, shard_rows FROM arrays WHERE run_id = $r
           UNION ALL
           SELECT 'b', NULL, NULL, coalesce(max(batch_idx), -1),
                  coalesce(max(first_row + n_rows), 0) FROM batches WHERE run_id = $r
           ORDER BY k, hook""",
        {"r": run_id},
    ).to_pylist()
    b = got.pop()
    return got, {"b": b["n_rows"], "r": b["shard_rows"]}


def _as_table(data: pa.Table | Mapping[str, Any] | None, what: str) -> pa.Table | None:
    if data is None:
        return None
    if isinstance(data, pa.Table):
        return data
    try:
        return pa.table(dict(data))
    except (pa.ArrowInvalid, TypeError, ValueError) as e:
        raise InputError(f"{what}: columns must be equally long arrays ({e})") from e


class RunWriter:
    """Appends batches to one run; see the module docstring for the protocol.

    Obtain one with :meth:`actstore.Store.writer`; use it as a context manager so
    the last partial shard is flushed and committed.

    Parameters
    ----------
    store
        A store opened for writing.
    run_id
        The run to append to (made by :func:`actstore.store.objects.create_run`).
    commit_interval
        Seconds after which buffered batches are flushed and committed even if
        they do not fill a shard.
    """

    def __init__(
        self,
        store: Store,
        run_id: int,
        *,
        commit_interval: float = 30.0,
        lock: WriteLock | None = None,
    ) -> None:
        self.store = store
        self._lock = lock
        self.run_id = run_id
        self.commit_interval = commit_interval
        self._before_commit: Callable[[], None] | None = None  # test hook: kill point
        info, last = _run_state(store, run_id)
        self.next_batch = int(last["b"]) + 1
        self.committed_rows = int(last["r"])
        self._buffers: dict[str, _HookBuffer] = {}
        for a in info:
            if int(a["n_rows"]) != self.committed_rows:
                raise InputError(
                    f"run {run_id}: array {a['hook']} has {a['n_rows']} committed rows but the "
                    f"run's batches cover {self.committed_rows}; the catalog is inconsistent"
                )
            arr = _arrays.open_array(store.location, a["path"])
            shard = int(a["shard_rows"])
            start = (self.committed_rows // shard) * shard
            buf = _HookBuffer(arr, a["hook"], shard, start, disk_rows=self.committed_rows)
            if start < self.committed_rows:  # resume inside a shard: keep its committed head
                buf.add(np.asarray(arr[start : self.committed_rows]))
            self._buffers[a["hook"]] = buf
        self._pending: list[_Pending] = []
        # batches whose rows (and feature parts) are on disk, waiting for the next commit
        self._durable: list[tuple[list[_Pending], list[dict[str, Any]]]] = []
        self._next_row = self.committed_rows
        self._last_commit = time.monotonic()
        self._heap = HeapBound()

    @property
    def hooks(self) -> list[str]:
        """The hooks of the run, in catalog order."""
        return list(self._buffers)

    def append(
        self,
        *,
        arrays: Mapping[str, np.ndarray],
        tokens: pa.Table | Mapping[str, Any],
        first_prompt: int,
        n_prompts: int,
        features: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
        generations: pa.Table | Mapping[str, Any] | None = None,
        scores: pa.Table | Mapping[str, Any] | None = None,
        attention: pa.Table | None = None,
        other: Mapping[str, pa.Table] | None = None,
        stats: Mapping[str, _hookstats.HookStats] | None = None,
    ) -> None:
        """Queue one batch; it is committed by a later flush (automatic) or :meth:`close`.

        Parameters
        ----------
        arrays
            Hook name -> (N, D) rows of the batch, one per hook of the run.
        tokens
            Columns of :data:`TOKEN_COLUMNS` (missing ones are NULL); ``row`` is
            batch-local (0..N-1) or NULL for tokens whose activations are not stored.
        first_prompt, n_prompts
            Which prompts (by ``prompt_idx``) the batch completes.
        features
            SAE id -> (batch-local rows, feature ids, values) of nonzeros.
        generations, scores
            Rows for the ``generations`` and ``scores`` tables (without ``run_id``).
        attention
            Kept attention-pattern entries (``actstore.ingest.heads.attention_rows``)
            with batch-local ``row``, for the ``attention`` table (made by the first commit).
        other
            Table name -> whole rows for other catalog tables (which must exist),
            inserted by column name in the batch's commit (e.g. ``token_diffs``).
        stats
            Hook name -> statistics of exactly these rows as stored (after the cast
            to the store dtype), when the caller has computed them (the ingest does,
            on the model's threads); computed here from the stored rows otherwise.

        Example
        -------
        >>> w.append(arrays={"h": acts_ND}, tokens=tok, first_prompt=0, n_prompts=4)  # doctest: +SKIP
        """
        missing = set(self._buffers) - set(arrays)
        extra = set(arrays) - set(self._buffers)
        if missing or extra:
            raise InputError(
                f"run {self.run_id}: batch arrays must cover exactly the run's hooks "
                f"{sorted(self._buffers)}; missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        sizes = {h: a.shape[0] for h, a in arrays.items()}
        tok = _as_table(tokens, "tokens")
        assert tok is not None
        n_rows = tok.num_rows - tok.column("row").null_count if "row" in tok.column_names else 0
        if sizes and set(sizes.values()) != {n_rows}:
            raise InputError(
                f"run {self.run_id}: each hook needs one row per stored token ({n_rows}); got {sizes}"
            )
        first_row = self._next_row
        if stats is not None and (
            set(stats) != set(arrays) or any(stats[h].n != sizes[h] for h in arrays)
        ):
            got = {h: s.n for h, s in stats.items()}
            raise InputError(
                f"run {self.run_id}: batch statistics must cover each hook's rows "
                f"{sizes}; got {got}"
            )
        # rows go straight to each hook's open shard (on-disk bits, uint16 for bfloat16:
        # streamed to its file, or copied into its buffer); a full shard is written at once
        stored = {h: self._buffers[h].add(a) for h, a in arrays.items()}
        if stats is None:  # of the values as stored (see actstore.store.hookstats)
            stats = _hookstats.batch_stats(
                stored, {h: _arrays.logical_dtype(self._buffers[h].arr) for h in arrays}
            )
        del stored
        self._pending.append(
            _Pending(
                batch_idx=self.next_batch,
                first_prompt=first_prompt,
                n_prompts=n_prompts,
                first_row=first_row,
                n_rows=n_rows,
                tokens=tok,
                features={int(k): v for k, v in (features or {}).items()},
                generations=_as_table(generations, "generations"),
                scores=_as_table(scores, "scores"),
                attention=attention if attention is not None and attention.num_rows else None,
                stats=dict(stats),
                other=dict(other or {}),
            )
        )
        self.next_batch += 1
        self._next_row += n_rows
        self._flush(partial=time.monotonic() - self._last_commit > self.commit_interval)

    def flush(self) -> int:
        """Write everything buffered (partial shards too) and commit it; return batches committed.

        Example
        -------
        >>> w.flush()  # doctest: +SKIP
        3
        """
        return self._flush(partial=True)

    def close(self) -> None:
        """Flush and commit what is buffered.

        Example
        -------
        >>> w.close()  # doctest: +SKIP
        """
        try:
            self._flush(partial=True, final=True)
            self._release_buffers()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def abort(self) -> None:
        """Drop what is buffered and not committed, and release the store (after an error).

        Example
        -------
        >>> w.abort()  # doctest: +SKIP
        """
        self._pending = []
        self._durable = []
        self._release_buffers()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _release_buffers(self) -> None:
        for buf in self._buffers.values():
            buf.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._lock is not None:
            self._lock.release()
            self._lock = None

    def _flush(self, partial: bool, final: bool = False) -> int:
        """Write what fills whole shards (everything if ``partial``); commit if it is time.

        ``final``: the writer's close, after which no rows come (the open shards' files
        are finished rather than written beside their streams).
        """
        if self._pending:
            _write_open_shards(list(self._buffers.values()), partial, final)
            # the shard buffers are in use: not growth for the heap bound (actstore.store.heap)
            self._heap.hold(sum(b.held_nbytes for b in self._buffers.values()))
            if not final:  # (at the close the buffers are dropped next: nothing to bound)
                self._heap.after_batch()  # what the batches freed goes back past the bound
            durable = min((b.disk_rows for b in self._buffers.values()), default=self._next_row)
            ready = [p for p in self._pending if p.first_row + p.n_rows <= durable]
            if ready:
                # feature parts are written as soon as their rows are on disk (bounded memory);
                # they stay invisible until the commit lists them
                self._durable.append((ready, self._write_parts(ready)))
                self._pending = self._pending[len(ready) :]
        due = partial or time.monotonic() - self._last_commit > self.commit_interval
        if not (due and self._durable):
            return 0
        groups, self._durable = self._durable, []
        self._commit(groups)
        self._last_commit = time.monotonic()
        return sum(len(g) for g, _ in groups)

    def _write_parts(self, batches: Sequence[_Pending]) -> list[dict[str, Any]]:
        first_row = batches[0].first_row
        end_row = batches[-1].first_row + batches[-1].n_rows
        parts: list[dict[str, Any]] = []
        for sae_id in sorted({k for b in batches for k in b.features}):
            chunks = [(b.first_row, *b.features[sae_id]) for b in batches if sae_id in b.features]
            rows = np.concatenate([np.asarray(r, np.int64) + off for off, r, _, _ in chunks])
            feats = np.concatenate([f for _, _, f, _ in chunks])
            vals = np.concatenate([v for _, _, _, v in chunks])
            rel, data = _features.encode_part(
                run_id=self.run_id,
                sae_id=sae_id,
                first_row=first_row,
                first_batch=batches[0].batch_idx,
                rows=rows,
                features=feats,
                values=vals,
            )
            with self.store.location.open_output(rel) as f:
                f.write(data)
            parts.append(
                {
                    "sae_id": sae_id,
                    "path": rel,
                    "first_row": first_row,
                    "n_rows": end_row - first_row,
                    "n_nonzero": int(np.count_nonzero(vals)),
                    "n_bytes": len(data),
                    "crc32c": checksum(data),  # verified before the part is read
                }
            )
        return parts

    def _commit(self, groups: Sequence[tuple[Sequence[_Pending], list[dict[str, Any]]]]) -> None:
        batches = [b for g, _ in groups for b in g]
        parts = [p for _, ps in groups for p in ps]
        end_row = batches[-1].first_row + batches[-1].n_rows
        tokens = pa.concat_tables([_token_rows(b, self.run_id) for b in batches])
        gens = [g for b in batches if (g := b.generations) is not None]
        scs = [s for b in batches if (s := b.scores) is not None]
        att = [_attention_rows(b) for b in batches if b.attention is not None]
        if self._before_commit is not None:
            self._before_commit()

        def body(con: duckdb.DuckDBPyConnection) -> None:  # re-runnable (remote retries)
            con.register("_tok", tokens)
            con.execute(f"INSERT INTO tokens ({', '.join(tokens.column_names)}) SELECT * FROM _tok")
            con.unregister("_tok")
            con.executemany(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, now())",
                [
                    [self.run_id, b.batch_idx, b.first_prompt, b.n_prompts, b.first_row, b.n_rows]
                    for b in batches
                ],
            )
            if parts:
                _features.record_parts(
                    con,
                    [
                        (
                            self.run_id,
                            p["sae_id"],
                            p["path"],
                            p["first_row"],
                            p["n_rows"],
                            p["n_nonzero"],
                            p["n_bytes"],
                            p["crc32c"],
                        )
                        for p in parts
                    ],
                )
            for table, extra in (("generations", gens), ("scores", scs)):
                if extra:
                    t = pa.concat_tables(extra, promote_options="permissive")
                    con.register("_t", t)
                    cols = ", ".join(["run_id", *t.column_names])
                    con.execute(f"INSERT INTO {table} ({cols}) SELECT {self.run_id}, * FROM _t")
                    con.unregister("_t")
            if att:
                t = pa.concat_tables(att)
                con.execute(
                    f"CREATE TABLE IF NOT EXISTS attention ({', '.join(ATTENTION_COLUMNS)})"
                )
                con.register("_t", t)
                con.execute(f"INSERT INTO attention SELECT {self.run_id}, * FROM _t")
                con.unregister("_t")
            for b in batches:  # other tables' rows that go with the batch
                for table, t in b.other.items():
                    con.register("_t", t)
                    cols = ", ".join(f'"{c}"' for c in t.column_names)
                    con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _t")
                    con.unregister("_t")
            con.execute("UPDATE arrays SET n_rows = ? WHERE run_id = ?", [end_row, self.run_id])
            _hookstats.commit(con, self.run_id, _hookstats.merged([b.stats for b in batches]))
            bump_commit_seq(con)

        self.store.catalog.transact(body)
        self.committed_rows = end_row


ATTENTION_COLUMNS = (
    "run_id INTEGER",
    '"row" BIGINT',
    "layer INTEGER",
    "head INTEGER",
    "key_position INTEGER",
    "weight REAL",
    "score REAL",
)
"""The ``attention`` table: kept (query row, layer, head, key) entries of attention patterns."""


def _attention_rows(b: _Pending) -> pa.Table:
    t = b.attention
    assert t is not None
    import pyarrow.compute as pc  # on first use: it takes a while to import

    rows = pc.add(t.column("row"), pa.scalar(b.first_row, pa.int64()))
    return t.set_column(t.column_names.index("row"), "row", rows)


def _token_rows(b: _Pending, run_id: int) -> pa.Table:
    tok = b.tokens
    cols: dict[str, pa.Array] = {"run_id": pa.array(np.full(tok.num_rows, run_id, np.int32))}
    for name, typ in TOKEN_COLUMNS.items():
        if name in tok.column_names:
            col = tok.column(name).cast(typ)
            if name == "row":
                import pyarrow.compute as pc  # on first use: it takes a while to import

                col = pc.add(col, pa.scalar(b.first_row, pa.int64()))
            cols[name] = col
        else:
            cols[name] = pa.nulls(tok.num_rows, typ)
    unknown = set(tok.column_names) - set(TOKEN_COLUMNS)
    if unknown:
        raise InputError(f"tokens: unknown columns {sorted(unknown)}; valid: {list(TOKEN_COLUMNS)}")
    return pa.table(cols)


def bump_commit_seq(con: Any) -> None:
    """Advance the catalog's commit counter (readers refresh their views when it moves).

    Example
    -------
    >>> with store.catalog.write() as con:  # doctest: +SKIP
    ...     bump_commit_seq(con)
    """
    con.execute(
        "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS VARCHAR) WHERE key = 'commit_seq'"
    )


class WriteLock:
    """An exclusive, process-held lock on a store's ``.write.lock`` file.

    One writer process at a time appends to a store, so a writer's recovery can
    remove uncommitted files without touching another writer's. The OS drops the
    lock when the process dies, so a killed ingest never leaves a stale lock.

    Example
    -------
    >>> import tempfile, pathlib
    >>> lk = WriteLock(pathlib.Path(tempfile.mkdtemp())); lk.release()
    """

    FILE = ".write.lock"

    def __init__(self, root: Any) -> None:
        self.path = os.path.join(str(root), self.FILE)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise ReadOnlyError(
                f"store {root} is not writable by this user; reading it works "
                "(actstore.open(..., read_only=True), every query), writing needs write access "
                "to the directory: write to a copy, or ask its owner"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise InputError(
                f"another process is writing to store {root}; wait for it to finish "
                "(or write to a separate shard store and merge)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    @classmethod
    def held_elsewhere(cls, root: Any) -> bool:
        """Whether another open lock (another writer) holds the store."""
        path = os.path.join(str(root), cls.FILE)
        if not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
