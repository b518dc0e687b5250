"""Row selections: which activation rows an analysis reads, fixed once, read in blocks.

Every analysis starts the same way: a SQL predicate over ``labeled_tokens``
picks rows of one run, some SQL expressions are evaluated per row (a group
label, a split, a reward, a pair id), and then one or more hooks of those rows
are read. A :class:`Selection` does the first two steps once, so that an
analysis making several passes over the data (randomized PCA, a projection
pass) sees the same rows in every pass even while an ingest appends to the
run. :meth:`Selection.blocks` then reads one or several hooks for those rows in
blocks of at most ``block_rows`` rows, converted to float through torch
(float16 arithmetic in numpy is slow; see ``DESIGN.md``), so memory depends on
the block size and the width, not on the number of rows.

Letters in names: ``N`` rows, ``D`` width, ``K`` components or directions.

Example
-------
>>> sel = select(st, run="r", where="position_role = 'last'", columns={"y": "triggered"})  # doctest: +SKIP
>>> for rows_N, acts_ND in sel.blocks(st, ["blocks.1.hook_resid_post"], block_rows=4096):  # doctest: +SKIP
...     ...
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from actstore.errors import HookNotFoundError, InputError
from actstore.store import arrays as _arrays
from actstore.store.catalog import query_arrow
from actstore.store.ids import as_id
from actstore.store.predicate import expression, predicate_or_true

if TYPE_CHECKING:
    from actstore.store.store import Store

Params = Sequence[Any] | dict[str, Any] | None
"""Bound SQL parameters: positional (``?``) or named (``$name``)."""

#: Bytes of one float64 block that :func:`default_block_rows` aims for.
BLOCK_BYTES = 64 << 20


def default_block_rows(d: int) -> int:
    """Rows per block so that one float64 block of width ``d`` is about 64 MiB.

    Example
    -------
    >>> default_block_rows(768), default_block_rows(4096)
    (10922, 2048)
    """
    return max(256, BLOCK_BYTES // (8 * max(int(d), 1)))


def as_float(values: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """Convert a block of stored activations to ``float32``/``float64``.

    float16 and bfloat16 blocks are converted through torch, which is an order
    of magnitude faster than numpy's float16 casts.

    Example
    -------
    >>> as_float(np.ones((2, 3), np.float16)).dtype
    dtype('float64')
    """
    want = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    if values.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(values)).to(want).numpy()
    if values.dtype.name == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(values).view(np.int16))
        return bits.view(torch.bfloat16).to(want).numpy()
    return np.asarray(values, dtype=dtype)


@dataclass(frozen=True, slots=True, eq=False)
class RunInfo:
    """A run's identity and its arrays, read from the catalog in one query.

    Example
    -------
    >>> info = run_info(st, "base")  # doctest: +SKIP
    >>> info.hooks, info.width("blocks.1.hook_resid_post")  # doctest: +SKIP
    """

    run_id: int
    """The run's id."""
    name: str
    """The run's name."""
    arrays: dict[str, dict[str, Any]]
    """Hook -> its ``arrays`` row (path, d, layer, n_rows...), in layer order."""
    opened: dict[str, Any] = field(default_factory=dict, repr=False)
    """Zarr arrays opened so far (each is opened once)."""

    @property
    def hooks(self) -> list[str]:
        """The run's hooks, by layer."""
        return list(self.arrays)

    @property
    def n_rows(self) -> int:
        """Committed rows (the least over the run's arrays)."""
        return min((int(a["n_rows"]) for a in self.arrays.values()), default=0)

    def row(self, hook: str) -> dict[str, Any]:
        """The ``arrays`` row of a hook (the error lists the run's hooks).

        Example
        -------
        >>> run_info(st, "base").row("blocks.1.hook_resid_post")["d"]  # doctest: +SKIP
        16
        """
        if hook not in self.arrays:
            raise HookNotFoundError(
                f"hook {hook!r} not in run {self.name!r}; it has {self.hooks or 'no hooks'} "
                "(see `actstore info STORE`)"
            )
        return self.arrays[hook]

    def width(self, hook: str) -> int:
        """Columns of a hook."""
        return int(self.row(hook)["d"])

    def layer(self, hook: str) -> int | None:
        """Layer of a hook (None for module hooks)."""
        layer = self.row(hook)["layer"]
        return None if layer is None else int(layer)

    def array(self, store: Store, hook: str) -> Any:
        """The hook's Zarr array, opened read-only (once).

        Example
        -------
        >>> arr = run_info(st, "base").array(st, "blocks.1.hook_resid_post")  # doctest: +SKIP
        """
        if hook not in self.opened:
            self.opened[hook] = _arrays.open_array(store.location, self.row(hook)["path"], mode="r")
        return self.opened[hook]


def run_info(store: Store, run: str | int | RunInfo) -> RunInfo:
    """Resolve a run by name or id and read its arrays (one catalog query).

    Example
    -------
    >>> run_info(st, 1).name  # doctest: +SKIP
    'base'
    """
    if isinstance(run, RunInfo):
        return run
    t = store.sql(
        """SELECT r.run_id, r.name AS run_name, a.* EXCLUDE (run_id) FROM runs r
           LEFT JOIN arrays a USING (run_id)
           WHERE r.name = $name OR r.run_id = $id
           ORDER BY a.layer NULLS LAST, a.hook""",
        {"name": str(run), "id": -1 if as_id(run) is None else as_id(run)},
    ).arrow()
    if t.num_rows == 0:
        store.run_id(run)  # raises the store's own message, listing the runs
    rows = t.to_pylist()
    rid = int(rows[0]["run_id"])
    rows = [r for r in rows if r["run_id"] == rid]
    arrays = {str(r["hook"]): r for r in rows if r["hook"] is not None}
    return RunInfo(rid, str(rows[0]["run_name"]), arrays)


def resolve_hooks(
    store: Store, run: str | int | RunInfo, hooks: str | Sequence[str] | None
) -> list[str]:
    """Expand hook names and glob patterns (``blocks.*.hook_resid_post``) against a run.

    ``None`` means every hook of the run. Order: as given; a pattern expands in
    layer order.

    Example
    -------
    >>> resolve_hooks(st, "r", "blocks.*.hook_resid_post")  # doctest: +SKIP
    ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """
    info = run_info(store, run)
    have = info.hooks
    if hooks is None:
        return have
    wanted = [hooks] if isinstance(hooks, str) else list(hooks)
    out: list[str] = []
    for h in wanted:
        if any(c in h for c in "*?["):
            hits = [x for x in have if fnmatch.fnmatchcase(x, h)]
            if not hits:
                raise HookNotFoundError(
                    f"hook pattern {h!r} matches no hook of run {info.name!r}; it has {have}"
                )
        elif h in have:
            hits = [h]
        else:
            raise HookNotFoundError(
                f"hook {h!r} not in run {info.name!r}; it has {have or 'no hooks'} "
                f"(see `actstore info {store.root}`)"
            )
        out.extend(x for x in hits if x not in out)
    if not out:
        raise InputError(f"no hooks given for run {info.name!r}; pass one or more of {have}")
    return out


@dataclass(frozen=True, slots=True, eq=False)
class Selection:
    """Rows of one run chosen by SQL, with their metadata and computed columns.

    Example
    -------
    >>> sel = select(st, run="r", where="triggered")  # doctest: +SKIP
    >>> sel.n, sel.meta.column_names[:3]  # doctest: +SKIP
    """

    info: RunInfo
    """The run and its arrays."""
    where: str | None
    """The SQL predicate over ``labeled_tokens`` that chose the rows."""
    rows: np.ndarray
    """Array rows (int64), in ascending order."""
    meta: pa.Table
    """One row per selected row: ``labeled_tokens`` columns plus the computed ones."""

    @property
    def run(self) -> str:
        """The run's name."""
        return self.info.name

    @property
    def run_id(self) -> int:
        """The run's id."""
        return self.info.run_id

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.rows.size)

    def column(self, name: str) -> np.ndarray:
        """A metadata column as numpy (NULLs become NaN or None).

        Example
        -------
        >>> sel.column("prompt_idx")[:3]  # doctest: +SKIP
        array([0, 1, 2], dtype=int32)
        """
        return self.meta.column(name).to_numpy(zero_copy_only=False)

    def take(self, mask_or_index: np.ndarray) -> Selection:
        """The sub-selection of the rows a boolean mask or an index picks (order kept).

        Example
        -------
        >>> sel.take(sel.column("triggered")).n  # doctest: +SKIP
        """
        idx = np.asarray(mask_or_index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Selection(self.info, self.where, self.rows[idx], self.meta.take(idx))

    def blocks(
        self,
        store: Store,
        hooks: Sequence[str],
        *,
        block_rows: int | None = None,
        dtype: Any = np.float64,
        rows: np.ndarray | None = None,
        run: RunInfo | None = None,
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(slice into the selection, acts_ND)`` blocks; several hooks are concatenated.

        Parameters
        ----------
        hooks
            Hooks whose columns are placed side by side (one hook: its own columns).
        block_rows
            Rows per block; default :func:`default_block_rows` of the total width.
        dtype
            float dtype of the yielded blocks.
        rows, run
            Read these rows of another run instead (a checkpoint diff reads the
            aligned rows of a second run); ``rows`` is aligned with the selection.

        Example
        -------
        >>> total_D = sum(a.sum(0) for _, a in sel.blocks(st, ["h"]))  # doctest: +SKIP
        """
        src_rows = self.rows if rows is None else np.asarray(rows, np.int64)
        info = self.info if run is None else run
        arrays = [info.array(store, h) for h in hooks]
        names = [f"{info.row(h)['path']} (run {info.name!r}, hook {h!r})" for h in hooks]
        committed = [int(info.row(h)["n_rows"]) for h in hooks]
        step = int(block_rows or default_block_rows(sum(info.width(h) for h in hooks)))
        if step < 1:
            raise InputError(f"block_rows must be a positive number of rows, not {block_rows}")
        for a in range(0, src_rows.size, step):
            part = src_rows[a : a + step]
            cols = [
                as_float(_arrays.read_rows(arr, part, name=nm, committed=n), dtype)
                for arr, nm, n in zip(arrays, names, committed, strict=True)
            ]
            yield slice(a, a + part.size), cols[0] if len(cols) == 1 else np.hstack(cols)

    def read(
        self,
        store: Store,
        hooks: Sequence[str],
        *,
        dtype: Any = np.float64,
        rows: np.ndarray | None = None,
        run: RunInfo | None = None,
    ) -> np.ndarray:
        """All selected rows at once (for analyses on small selections, e.g. last tokens).

        Example
        -------
        >>> sel.read(st, ["h"]).shape  # doctest: +SKIP
        (120, 64)
        """
        info = self.info if run is None else run
        out_ND = np.empty((self.n, sum(info.width(h) for h in hooks)), dtype=dtype)
        for sl, block in self.blocks(store, hooks, dtype=dtype, rows=rows, run=run):
            out_ND[sl] = block
        return out_ND


def select(
    store: Store,
    *,
    run: str | int | RunInfo,
    where: str | None = None,
    params: Params = None,
    columns: Mapping[str, str] | None = None,
    hooks: Sequence[str] = (),
) -> Selection:
    """Choose the rows of ``run`` a predicate selects and evaluate SQL expressions on them.

    Parameters
    ----------
    run
        Run name or id.
    where
        SQL predicate over ``labeled_tokens`` (token columns, prompt text, labels).
    params
        Bound parameters used by ``where`` and ``columns`` (prefer named ``$x``).
    columns
        Name -> SQL expression over ``labeled_tokens``, added to ``meta`` as ``_name``.
    hooks
        Hooks whose committed rows bound the selection (default: all the run's hooks).

    Example
    -------
    >>> sel = select(st, run="r", where="position_role = 'last'", columns={"y": "triggered"})  # doctest: +SKIP
    >>> sel.column("_y")[:4]  # doctest: +SKIP
    """
    info = run_info(store, run)
    hooks = list(hooks) or info.hooks
    n_rows = min((int(info.row(h)["n_rows"]) for h in hooks), default=0)
    extra = "".join(
        f', {expression(expr, what=f"column {name!r}")} AS "_{name}"'
        for name, expr in (columns or {}).items()
    )
    cond = predicate_or_true(where, what="where")
    meta = store.sql(
        f"""SELECT *{extra} FROM labeled_tokens
            WHERE run_id = {info.run_id} AND "row" IS NOT NULL AND "row" < {int(n_rows)} AND {cond}
            ORDER BY "row" """,
        params,
    ).arrow()
    rows = meta.column("row").to_numpy(zero_copy_only=False).astype(np.int64)
    return Selection(info, where, rows, meta)


def sql_with_tables(
    store: Store, query: str, params: Params = None, **tables: pa.Table
) -> pa.Table:
    """Run one query in the store's SQL session with Arrow tables registered by name.

    Used to join the rows a selection fixed (``row``) to the ``features`` view.

    Example
    -------
    >>> sql_with_tables(st, "SELECT count(*) AS n FROM features f JOIN _sel USING (row)",
    ...                 _sel=pa.table({"row": [0, 1]}))  # doctest: +SKIP
    """
    with store.session.connection() as con:
        for name, table in tables.items():
            con.register(name, table)
        try:
            return query_arrow(con, query, params)
        finally:
            for name in tables:
                con.unregister(name)


def require_rows(sel: Selection, what: str, minimum: int = 1) -> None:
    """Raise a helpful error when a selection has fewer than ``minimum`` rows.

    Example
    -------
    >>> require_rows(sel, "PCA", 2)  # doctest: +SKIP
    """
    if sel.n < minimum:
        raise InputError(
            f"{what}: the predicate {sel.where!r} selects {sel.n} rows of run {sel.run!r} "
            f"(at least {minimum} needed); check it with "
            f"`SELECT count(*) FROM labeled_tokens WHERE run = '{sel.run}' AND ({sel.where or 'true'})`"
        )
