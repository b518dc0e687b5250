"""Activation arrays inside SQL: ``project(run, hook, row, direction)`` and ``act_norm(run, hook, row)``.

SQL picks the rows; these functions read only those rows of the dense arrays.
DuckDB calls them with a batch of rows at a time (Arrow arrays of ~2048 rows,
never one Python call per row). A batch's rows are grouped by (run, hook) and
each group is read with one gather (:func:`actstore.store.access.read_rows`:
memory-mapped shards for raw arrays, zarr otherwise), then reduced with one
BLAS call:

``project(run, hook, row, direction)``
    the dot product of the activation row with the stored direction of that
    name (``directions`` table), computed in float32;
``act_norm(run, hook, row)``
    the L2 norm of the activation row.

A NULL argument (e.g. a token whose activations were not stored, ``row`` NULL)
gives NULL. Rows at or beyond the run's committed ``n_rows`` are an error, as
are unknown runs, hooks and directions (the message lists the valid ones).

The functions look up the catalog through a cursor of the session's own
connection (DuckDB runs them on its worker threads, while the statement that
calls them holds the catalog attached), and cache what they opened until the
catalog's commit counter moves.

Example
-------
>>> st.sql('''SELECT auroc(project(run, 'blocks.2.hook_resid_post', "row", 'trigger'), triggered)
...           FROM labeled_tokens WHERE run = 'backdoored/pairs' AND position_role = 'last'
...        ''').fetchall()  # doctest: +SKIP
[(0.998,)]
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from actstore.errors import HookNotFoundError, InputError, NotFoundError, RunNotFoundError
from actstore.queries.stats import replace_function
from actstore.store import access
from actstore.store import arrays as _arrays

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["ArrayFunctions", "register"]


def _codes(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Dictionary-encode a column: (codes with -1 for NULL, distinct values)."""
    import pyarrow.compute as pc  # on first use: it takes a while to import

    enc = pc.dictionary_encode(col)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, enc.dictionary.to_pylist()


class ArrayFunctions:
    """What ``project`` and ``act_norm`` keep for one session: a cursor, opened arrays, directions.

    Parameters
    ----------
    con
        The session connection (a cursor of it is used for catalog look-ups).
    store
        The store whose arrays are read.

    Example
    -------
    >>> fns = ArrayFunctions(con, st)  # doctest: +SKIP
    >>> fns.register(con)  # doctest: +SKIP
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, store: Store) -> None:
        self._cur = con.cursor()
        self._root = store.location
        self._lock = threading.Lock()
        self._seq: Any = None
        self._arrays: dict[tuple[str, str], tuple[Any, int, str]] = {}
        self._directions: dict[str, np.ndarray] = {}

    # -- catalog look-ups (under self._lock) -------------------------------------

    def _fresh(self) -> None:
        try:
            seq = self._cur.execute(
                "SELECT value FROM cat.main.meta WHERE key = 'commit_seq'"
            ).fetchall()
        except duckdb.Error as e:
            raise InputError(
                "project()/act_norm() need the store's catalog: call them through Store.sql "
                f"({str(e).splitlines()[0]})"
            ) from e
        if seq != self._seq:
            self._arrays.clear()
            self._directions.clear()
            self._seq = seq

    def _array(self, run: str, hook: str) -> tuple[Any, int, str]:
        hit = self._arrays.get((run, hook))
        if hit is not None:
            return hit
        rows = self._cur.execute(
            "SELECT a.path, a.n_rows FROM cat.main.arrays a JOIN cat.main.runs r "
            "ON a.run_id = r.run_id WHERE r.name = ? AND a.hook = ?",
            [run, hook],
        ).fetchall()
        if not rows:
            runs = [
                r[0]
                for r in self._cur.execute(
                    "SELECT name FROM cat.main.runs ORDER BY run_id"
                ).fetchall()
            ]
            if run not in runs:
                raise RunNotFoundError(f"run {run!r} not in the store; runs: {runs or 'none yet'}")
            hooks = [
                h[0]
                for h in self._cur.execute(
                    "SELECT a.hook FROM cat.main.arrays a JOIN cat.main.runs r ON a.run_id = r.run_id "
                    "WHERE r.name = ? ORDER BY a.layer NULLS LAST, a.hook",
                    [run],
                ).fetchall()
            ]
            raise HookNotFoundError(
                f"hook {hook!r} not in run {run!r}; it has {hooks or 'no hooks'}"
            )
        path, n_rows = rows[0]
        arr = _arrays.open_array(self._root, path, mode="r")
        hit = (arr, int(n_rows), f"{path} (run {run!r}, hook {hook!r})")
        self._arrays[(run, hook)] = hit
        return hit

    def _direction(self, name: str) -> np.ndarray:
        vec = self._directions.get(name)
        if vec is not None:
            return vec
        rows = self._cur.execute(
            "SELECT vector FROM cat.main.directions WHERE name = ?", [name]
        ).fetchall()
        if not rows:
            names = [
                r[0]
                for r in self._cur.execute(
                    "SELECT name FROM cat.main.directions ORDER BY name"
                ).fetchall()
            ]
            raise NotFoundError(
                f"direction {name!r} not in the store; stored directions: {names or 'none yet'}"
            )
        vec = np.asarray(rows[0][0], np.float32)
        self._directions[name] = vec
        return vec

    # -- the functions ---------------------------------------------------------------

    def _apply(
        self,
        run: pa.Array,
        hook: pa.Array,
        row: pa.Array,
        direction: pa.Array | None,
    ) -> pa.Array:
        n = len(row)
        out_N = np.full(n, np.nan)
        rows_N = row.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        run_c, runs = _codes(run)
        hook_c, hooks = _codes(hook)
        key = run_c * (len(hooks) + 1) + hook_c
        valid = (run_c >= 0) & (hook_c >= 0) & (rows_N >= 0)
        if direction is not None:
            dir_c, dirs = _codes(direction)
            key = key * (len(dirs) + 1) + dir_c
            valid &= dir_c >= 0
        with self._lock:
            self._fresh()
            groups, inverse = np.unique(np.where(valid, key, -1), return_inverse=True)
            for g, k in enumerate(groups.tolist()):
                if k < 0:
                    continue
                idx = np.flatnonzero(inverse == g)
                i0 = idx[0]
                r_name, h_name = runs[run_c[i0]], hooks[hook_c[i0]]
                arr, n_rows, label = self._array(r_name, h_name)
                want = rows_N[idx]
                if want.max() >= n_rows:
                    raise InputError(
                        f"row {int(want.max())} is not a committed row of run {r_name!r} hook "
                        f"{h_name!r} (rows 0-{n_rows - 1}); take rows from labeled_tokens"
                    )
                x_ND = access.read_rows(arr, want, name=label, committed=n_rows).astype(
                    np.float32, copy=False
                )
                if direction is None:
                    out_N[idx] = np.sqrt(np.einsum("nd,nd->n", x_ND, x_ND, dtype=np.float64))
                    continue
                d_name = dirs[dir_c[i0]]
                vec = self._direction(d_name)
                if vec.size != x_ND.shape[1]:
                    raise InputError(
                        f"direction {d_name!r} has {vec.size} dimensions but hook {h_name!r} of "
                        f"run {r_name!r} has {x_ND.shape[1]}; project it on a hook of that width"
                    )
                out_N[idx] = x_ND @ vec
        return pa.array(out_N, type=pa.float64(), mask=~valid)

    def project(
        self, run: pa.Array, hook: pa.Array, row: pa.Array, direction: pa.Array
    ) -> pa.Array:
        """Vectorized ``project(run, hook, row, direction)`` (DuckDB arrow UDF).

        Example
        -------
        >>> st.sql("SELECT project('r', 'h', 0, 'dir')").fetchall()  # doctest: +SKIP
        [(1.25,)]
        """
        return self._apply(run, hook, row, direction)

    def act_norm(self, run: pa.Array, hook: pa.Array, row: pa.Array) -> pa.Array:
        """Vectorized ``act_norm(run, hook, row)`` (DuckDB arrow UDF).

        Example
        -------
        >>> st.sql("SELECT act_norm('r', 'h', 0)").fetchall()  # doctest: +SKIP
        [(3.5,)]
        """
        return self._apply(run, hook, row, None)

    def register(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create (or replace) the SQL functions ``project`` and ``act_norm`` on ``con``.

        Example
        -------
        >>> ArrayFunctions(con, st).register(con)  # doctest: +SKIP
        """
        varchar, bigint, double = (duckdb.sqltype(t) for t in ("VARCHAR", "BIGINT", "DOUBLE"))
        for name, fn, args in (
            ("project", self.project, [varchar, varchar, bigint, varchar]),
            ("act_norm", self.act_norm, [varchar, varchar, bigint]),
        ):
            replace_function(
                con,
                name,
                fn,
                args,
                double,
                type="arrow",
                null_handling="special",
                side_effects=False,
            )


def register(con: duckdb.DuckDBPyConnection, store: Store) -> ArrayFunctions:
    """Register ``project`` and ``act_norm`` for ``store`` on its session connection.

    Example
    -------
    >>> register(con, st)  # doctest: +SKIP
    """
    fns = ArrayFunctions(con, store)
    fns.register(con)
    return fns
