"""Per-hook statistics of stored rows: count, mean and variance vectors, row norms.

Every commit of a run's writer adds the statistics of the committed batches to
the catalog's ``hook_stats`` table (one row per run and hook), so they are
always those of the committed rows, as stored (after the cast to the store
dtype). Each batch's statistics (mean, sum of squared deviations ``M2``, sum
and maximum of the row norms) are float64 sums of exact squares (see
:meth:`HookStats.of`); batches are merged with Chan et al.'s pairwise update of
Welford's method, which is exact in real arithmetic and stable in floating point. A sharded ingest merged by ``actstore merge`` appends
the same batches in the same order, so it gets the same numbers (up to the
rounding of a different grouping); :func:`compute` recomputes them from the
arrays, batch by batch, for runs ingested before the table existed
(``actstore stats STORE``).

Example
-------
>>> import numpy as np
>>> a = HookStats.of(np.arange(6.0).reshape(3, 2))
>>> b = HookStats.of(np.arange(6.0, 10.0).reshape(2, 2))
>>> both = a.merge(b)
>>> both.n, both.mean_D.tolist(), np.allclose(both.var_D, np.arange(10.0).reshape(5, 2).var(0))
(5, [4.0, 5.0], True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.store import arrays as _arrays

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["HookStats", "batch_stats", "commit", "compute", "read"]

TABLE = """CREATE TABLE IF NOT EXISTS hook_stats (
    run_id INTEGER, hook VARCHAR, n BIGINT, mean DOUBLE[], m2 DOUBLE[],
    norm_sum DOUBLE, norm_max DOUBLE)"""
"""The catalog table (created by the first commit that records statistics)."""


@dataclass(frozen=True, slots=True)
class HookStats:
    """Mergeable statistics of a set of rows of one hook.

    Example
    -------
    >>> HookStats.of(np.ones((4, 3))).mean_norm
    1.7320508075688772
    """

    n: int
    """Rows."""
    mean_D: np.ndarray
    """float64 mean vector."""
    m2_D: np.ndarray
    """float64 sum of squared deviations from the mean, per dimension."""
    norm_sum: float
    """Sum of the rows' L2 norms."""
    norm_max: float
    """Largest row norm."""

    @classmethod
    def of(cls, x_ND: np.ndarray) -> HookStats:
        """Statistics of one block of rows (any float dtype; sums in float64).

        Each value is squared exactly (float16 in float32, float32 and bfloat16 in
        float64: the product's mantissa fits) and the sums of values and squares are
        accumulated in float64, so ``M2 = sum(x^2) - sum(x)^2 / n`` loses only the
        float64 rounding of those sums: a relative error near ``1e-16 * (mean^2 +
        var) / var``, below 1e-11 even where a dimension's mean is 100 standard
        deviations from zero. One temporary the size of the block (two for a float16
        block), instead of the float64 copy and deviations of a two-pass variance.

        Example
        -------
        >>> HookStats.of(np.zeros((2, 3), np.float16)).n
        2
        """
        x = np.asarray(x_ND)
        n = int(x.shape[0])
        if n == 0:
            return cls.empty(x.shape[1])
        work = np.float32 if x.dtype == np.float16 else np.float64
        x = x.astype(work, copy=False)
        sq = x * x
        return cls.from_sums(
            np.add.reduce(x, axis=0, dtype=np.float64),
            np.add.reduce(sq, axis=0, dtype=np.float64),
            np.add.reduce(sq, axis=1, dtype=np.float64),
        )

    @classmethod
    def from_sums(cls, s1_D: np.ndarray, s2_D: np.ndarray, row_sq_N: np.ndarray) -> HookStats:
        """Statistics from a block's float64 sums: of values and of squares per dimension,
        and of squares per row (one row or more), as :meth:`HookStats.of` and the
        ingest's torch sums (``actstore.ingest.batches.stored_stats``) compute them.

        Example
        -------
        >>> HookStats.from_sums(np.array([2.0]), np.array([2.0]), np.ones(2)).var_D.tolist()
        [0.0]
        """
        n = int(row_sq_N.shape[0])
        mean = s1_D / n
        m2 = np.maximum(s2_D - s1_D * mean, 0.0)
        norms = np.sqrt(row_sq_N)
        return cls(n, mean, m2, float(norms.sum()), float(norms.max()))

    @classmethod
    def empty(cls, d: int) -> HookStats:
        """No rows.

        Example
        -------
        >>> HookStats.empty(3).n
        0
        """
        return cls(0, np.zeros(d), np.zeros(d), 0.0, 0.0)

    def merge(self, other: HookStats) -> HookStats:
        """The statistics of both sets of rows (Chan's pairwise update).

        Example
        -------
        >>> HookStats.of(np.ones((2, 1))).merge(HookStats.of(np.zeros((2, 1)))).var_D.tolist()
        [0.25]
        """
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean_D - self.mean_D
        mean = self.mean_D + delta * (other.n / n)
        m2 = self.m2_D + other.m2_D + delta * delta * (self.n * other.n / n)
        return HookStats(
            n, mean, m2, self.norm_sum + other.norm_sum, max(self.norm_max, other.norm_max)
        )

    @property
    def var_D(self) -> np.ndarray:
        """Population variance per dimension (``M2 / n``)."""
        return self.m2_D / max(self.n, 1)

    @property
    def mean_norm(self) -> float:
        """Mean row norm."""
        return self.norm_sum / max(self.n, 1)

    def summary(self) -> dict[str, Any]:
        """Scalars for ``actstore info``: rows, mean and max row norm, mean variance.

        Example
        -------
        >>> HookStats.of(np.ones((2, 2))).summary()["max_norm"]
        1.4142135623730951
        """
        return {
            "n": self.n,
            "mean_norm": self.mean_norm,
            "max_norm": self.norm_max,
            "mean_var": float(self.var_D.mean()) if self.var_D.size else 0.0,
        }


def batch_stats(
    arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str]
) -> dict[str, HookStats]:
    """Statistics of one batch per hook, from its on-disk values (as the writer buffers them).

    Example
    -------
    >>> batch_stats({"h": np.ones((2, 2), np.float32)}, {"h": "float32"})["h"].n
    2
    """
    return {h: HookStats.of(_arrays.from_disk(x, dtypes[h])) for h, x in arrays.items()}


def merged(parts: Sequence[Mapping[str, HookStats]]) -> dict[str, HookStats]:
    """Merge per-batch statistics, in order.

    Example
    -------
    >>> merged([{"h": HookStats.of(np.ones((1, 2)))}] * 2)["h"].n
    2
    """
    out: dict[str, HookStats] = {}
    for p in parts:
        for h, s in p.items():
            out[h] = out[h].merge(s) if h in out else s
    return out


def commit(con: Any, run_id: int, stats: Mapping[str, HookStats]) -> None:
    """Merge ``stats`` into the run's rows of ``hook_stats``, inside a catalog transaction.

    Example
    -------
    >>> store.catalog.transact(lambda con: commit(con, 1, stats))  # doctest: +SKIP
    """
    if not stats:
        return
    con.execute(TABLE)
    have = {
        str(r[0]): HookStats(
            int(r[1]), np.asarray(r[2]), np.asarray(r[3]), float(r[4]), float(r[5])
        )
        for r in con.execute(
            "SELECT hook, n, mean, m2, norm_sum, norm_max FROM hook_stats WHERE run_id = ?",
            [run_id],
        ).fetchall()
    }
    for hook, s in stats.items():
        total = have[hook].merge(s) if hook in have else s
        con.execute("DELETE FROM hook_stats WHERE run_id = ? AND hook = ?", [run_id, hook])
        con.execute(
            "INSERT INTO hook_stats VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                hook,
                total.n,
                total.mean_D.tolist(),
                total.m2_D.tolist(),
                total.norm_sum,
                total.norm_max,
            ],
        )


def read(store: Store, run: str | int) -> dict[str, HookStats]:
    """The recorded statistics of a run's hooks (empty if none are recorded).

    Example
    -------
    >>> read(st, "backdoored/pairs")["blocks.2.hook_resid_post"].mean_norm  # doctest: +SKIP
    7.9
    """
    rid = store.run_id(run)
    exists = store.catalog.read(
        "SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'hook_stats' "
        "AND database_name = 'cat'"
    ).to_pylist()[0]["n"]
    if not exists:  # a store made before statistics were recorded
        return {}
    rows = store.catalog.read(
        "SELECT hook, n, mean, m2, norm_sum, norm_max FROM hook_stats WHERE run_id = ?", [rid]
    ).to_pylist()
    return {
        str(r["hook"]): HookStats(
            int(r["n"]), np.asarray(r["mean"]), np.asarray(r["m2"]), r["norm_sum"], r["norm_max"]
        )
        for r in rows
    }


def compute(
    store: Store, runs: Sequence[str | int] | None = None
) -> dict[str, dict[str, HookStats]]:
    """Record statistics for runs that have none, from their arrays, batch by batch.

    The batches of the ``batches`` table are read and merged in order, as the
    writer does, so the numbers are those an ingest records. Runs that have
    statistics are left alone (idempotent).

    Example
    -------
    >>> compute(st)["backdoored/pairs"]["blocks.2.hook_resid_post"].n  # doctest: +SKIP
    2880
    """
    from actstore.store import access as _access
    from actstore.store.writer import bump_commit_seq

    store._check_writable()
    names = [
        r["name"] for r in store.catalog.read("SELECT name FROM runs ORDER BY run_id").to_pylist()
    ]
    todo = [store.run_id(r) for r in (runs if runs else names)]
    out: dict[str, dict[str, HookStats]] = {}
    for rid in todo:
        name = names[[store.run_id(n) for n in names].index(rid)]
        have = read(store, rid)
        if have or not store.hooks(rid):
            out[name] = have
            continue
        batches = store.catalog.read(
            "SELECT first_row, n_rows FROM batches WHERE run_id = ? ORDER BY batch_idx", [rid]
        ).to_pylist()
        per_hook: dict[str, HookStats] = {}
        for hook in store.hooks(rid):
            arr, info = store.array(rid, hook)
            total = HookStats.empty(int(info["d"]))
            for b in batches:
                a, n = int(b["first_row"]), int(b["n_rows"])
                rows = _access.read_rows(arr, np.arange(a, a + n), name=info["path"])
                total = total.merge(HookStats.of(rows))
            per_hook[hook] = total

        def body(con: Any, rid: int = rid, per_hook: dict[str, HookStats] = per_hook) -> None:
            commit(con, rid, per_hook)
            bump_commit_seq(con)

        lock = store._lock_for_writing()
        try:
            store.catalog.transact(body)
        finally:
            lock.release()
        out[name] = per_hook
    return out
