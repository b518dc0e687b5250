"""Statistics that DuckDB lacks, as vectorized SQL functions, and the SQL for BH q-values.

DuckDB has no Student-t distribution, so two-sided p-values come from a Python
function that DuckDB calls with a whole batch of rows as Arrow arrays (one call
per ~2048 rows, never one per row): ``t_pvalue(t, df)``. Welch's t, the paired t
and the t of a correlation coefficient (``r * sqrt((n - 2) / (1 - r^2))`` with
``n - 2`` degrees of freedom, which is how ``scipy.stats.pearsonr`` and
``spearmanr`` compute theirs) are all computed in SQL and passed to it.

``auroc(score, label)`` is an aggregate: the area under the ROC curve of a score
for a boolean label (ties count one half), so the AUROC of a direction's
projection is one query::

    SELECT hook, auroc(project(run, hook, "row", 'trigger_dir'), triggered)
    FROM labeled_tokens ... GROUP BY hook

Benjamini-Hochberg q-values need the whole column of p-values; :func:`bh_sql`
writes them as window functions: rank the p-values, take ``p * m / rank`` and
its running minimum from the largest rank down, capped at 1 (exactly what
``scipy.stats.false_discovery_control`` computes). NULL p-values (tests that
cannot be computed, such as a feature that never fires) are left out of ``m``.

Example
-------
>>> import duckdb
>>> con = duckdb.connect()
>>> register(con)
>>> con.sql("SELECT round(t_pvalue(2.0, 10), 4)").fetchall()
[(0.0734,)]
"""

from __future__ import annotations

import contextlib
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

__all__ = ["auroc_lists", "bh_sql", "register", "replace_function", "t_pvalue"]


def t_pvalue(t_N: np.ndarray, df_N: np.ndarray) -> np.ndarray:
    """Two-sided p-values of Student-t statistics (NaN where t or df is NaN).

    An infinite ``t`` has p = 0 whatever ``df`` is.

    Example
    -------
    >>> t_pvalue(np.array([0.0, 2.0, np.inf]), np.array([5.0, 10.0, np.nan])).round(4).tolist()
    [1.0, 0.0734, 0.0]
    """
    from scipy import special  # on first use: importing scipy takes a while

    t_N = np.asarray(t_N, np.float64)
    df_N = np.asarray(df_N, np.float64)
    with np.errstate(invalid="ignore"):
        p_N = 2.0 * special.stdtr(df_N, -np.abs(t_N))
    p_N = np.where(np.isinf(t_N), 0.0, p_N)
    return np.minimum(p_N, 1.0)


def _float_arg(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(a.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _t_pvalue_arrow(t: pa.Array, df: pa.Array) -> pa.Array:
    p_N = t_pvalue(_float_arg(t), _float_arg(df))
    return pa.array(p_N, type=pa.float64(), mask=np.isnan(p_N))


def auroc_lists(scores: list[Any] | None, labels: list[Any] | None) -> float | None:
    """AUROC of ``scores`` for boolean ``labels`` (pairs with a NULL are dropped).

    None when either class is missing. Ties between the classes count one half,
    as in ``sklearn.metrics.roc_auc_score``.

    Example
    -------
    >>> auroc_lists([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    0.75
    """
    from scipy.stats import rankdata

    if scores is None or labels is None:
        return None
    pairs = [(s, y) for s, y in zip(scores, labels, strict=True) if s is not None and y is not None]
    if not pairs:
        return None
    s_N = np.array([float(s) for s, _ in pairs])
    y_N = np.array([bool(y) for _, y in pairs])
    n_pos = int(y_N.sum())
    n_neg = y_N.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s_N).any():
        return None
    ranks = rankdata(s_N)
    return float((ranks[y_N].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_arrow(scores: pa.Array, labels: pa.Array) -> pa.Array:
    out = [auroc_lists(s, y) for s, y in zip(scores.to_pylist(), labels.to_pylist(), strict=True)]
    return pa.array(out, type=pa.float64())


def bh_sql(p: str, relation: str, q: str = "q", tiebreak: str = "feature") -> str:
    """SQL adding a Benjamini-Hochberg q-value column ``q`` for p-value column ``p``.

    Parameters
    ----------
    p
        The p-value column of ``relation`` (NULLs are not tests).
    relation
        A relation name (a CTE).
    q
        Name of the new column.
    tiebreak
        A column that orders equal p-values deterministically.

    Example
    -------
    >>> import duckdb
    >>> con = duckdb.connect()
    >>> _ = con.execute("CREATE TABLE t AS SELECT * FROM (VALUES (1, 0.01::DOUBLE), (2, 0.04), (3, 0.03)) v(feature, p)")
    >>> con.sql(bh_sql("p", "t") + " ORDER BY feature").fetchall()
    [(1, 0.01, 0.03), (2, 0.04, 0.04), (3, 0.03, 0.04)]
    """
    rank, m = f"_{q}_rank", f"_{q}_m"
    return f"""SELECT * EXCLUDE ({rank}, {m}),
        CASE WHEN {p} IS NOT NULL THEN least(1.0, min({p} * {m} / {rank}) OVER (
            ORDER BY {rank} DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) END AS {q}
    FROM (SELECT *, row_number() OVER (ORDER BY {p} ASC NULLS LAST, {tiebreak}) AS {rank},
                 count({p}) OVER () AS {m}
          FROM {relation})"""


def replace_function(con: duckdb.DuckDBPyConnection, name: str, *args: Any, **kwargs: Any) -> None:
    """``con.create_function``, replacing a function of that name if there is one.

    Example
    -------
    >>> import duckdb
    >>> con = duckdb.connect()
    >>> for _ in range(2):
    ...     replace_function(con, "one", lambda: 1, [], "BIGINT")
    """
    with contextlib.suppress(duckdb.InvalidInputException, duckdb.CatalogException):
        con.remove_function(name)
    con.create_function(name, *args, **kwargs)


def register(con: duckdb.DuckDBPyConnection) -> None:
    """Register ``t_pvalue(t, df)`` and the ``auroc(score, label)`` aggregate on ``con``.

    Example
    -------
    >>> import duckdb
    >>> con = duckdb.connect(); register(con)
    >>> con.sql("SELECT auroc(s, y) FROM (VALUES (0.1, false), (0.9, true)) v(s, y)").fetchall()
    [(1.0,)]
    """
    double = duckdb.sqltype("DOUBLE")
    replace_function(
        con,
        "t_pvalue",
        _t_pvalue_arrow,
        [double, double],
        double,
        type="arrow",
        null_handling="special",
    )
    replace_function(
        con,
        "_actstore_auroc",
        _auroc_arrow,
        [duckdb.list_type(double), duckdb.list_type(duckdb.sqltype("BOOLEAN"))],
        double,
        type="arrow",
        null_handling="special",
    )
    con.execute(
        "CREATE OR REPLACE MACRO auroc(score, label) AS "
        "_actstore_auroc(list(score::DOUBLE), list(label::BOOLEAN))"
    )
