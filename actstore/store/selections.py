"""Row selections of positions-restricted encodes: which stored rows a (run, SAE)'s features cover.

``actstore encode STORE --sae SAE --positions PRED`` encodes only the stored rows
of a run that a SQL predicate over ``labeled_tokens`` selects. Its features are a
*complete* encode of that *subset*: the feature parts still tile the run's rows
``[0, n_rows)`` (each part covers a range of rows and holds the features of the
selected rows in it), and the catalog's ``feature_selections`` table records the
selection, one row per (run, SAE):

* ``positions``, the predicate exactly as given (checked by
  :func:`actstore.store.predicate.expression`: one expression, no table function
  or file read);
* ``n_rows``, the number of rows it selected;
* ``rows_sha256``, the SHA-256 of the selected row numbers (sorted, int64
  little-endian): :func:`rows_sha256`.

A (run, SAE) without a row here has features of every stored row (captured at
ingest, or encoded without ``--positions``). The queries restrict their token
selections to the encoded rows and check first that the predicate still selects
exactly the recorded rows (:func:`select_rows`, :func:`rows_sha256`). The table is
created by the first positions-restricted encode (stores without one lack it); the
session's ``feature_selections`` view is the table, or an empty relation of the
same columns (:func:`view_sql`).

Example
-------
>>> rows_sha256(np.array([0, 3, 7]))[:16]
'bc35e6ad23095939'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np

from actstore.errors import InputError, NotFoundError
from actstore.store.catalog import query_arrow
from actstore.store.predicate import expression

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = [
    "TABLE",
    "Selection",
    "check_predicate",
    "has_any",
    "read",
    "record",
    "recorded",
    "require_complete",
    "require_rows",
    "rows_sha256",
    "select_rows",
    "unfinished",
    "unfinished_sql",
    "verify",
    "view_sql",
]

TABLE = """CREATE TABLE IF NOT EXISTS feature_selections (
    run_id INTEGER, sae_id INTEGER, positions VARCHAR, n_rows BIGINT, rows_sha256 VARCHAR)"""
"""The catalog table (created by the first positions-restricted encode)."""

_EMPTY = (
    "SELECT NULL::INTEGER AS run_id, NULL::INTEGER AS sae_id, NULL::VARCHAR AS positions, "
    "NULL::BIGINT AS n_rows, NULL::VARCHAR AS rows_sha256 WHERE false"
)


@dataclass(frozen=True, slots=True)
class Selection:
    """The stored rows a positions-restricted encode covers.

    Example
    -------
    >>> Selection.of("position_role = 'last'", np.array([4, 9])).n_rows
    2
    """

    positions: str
    """The predicate over ``labeled_tokens``, as given."""
    n_rows: int
    """Rows it selected."""
    rows_sha256: str
    """:func:`rows_sha256` of those rows."""

    @classmethod
    def of(cls, positions: str, rows: np.ndarray) -> Selection:
        """The selection of ``rows`` (sorted row numbers) by ``positions``.

        Example
        -------
        >>> Selection.of("true", np.arange(3)).rows_sha256 == rows_sha256(np.arange(3))
        True
        """
        return cls(positions, int(rows.size), rows_sha256(rows))


def rows_sha256(rows: np.ndarray) -> str:
    """SHA-256 (hex) of row numbers, sorted, as int64 little-endian.

    Example
    -------
    >>> rows_sha256(np.array([7, 0, 3])) == rows_sha256(np.array([0, 3, 7]))
    True
    """
    arr = np.sort(np.asarray(rows, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def check_predicate(con: duckdb.DuckDBPyConnection, text: str, *, what: str) -> str:
    """``text`` parenthesized, once it is one boolean SQL expression over ``labeled_tokens``.

    Parameters
    ----------
    con
        A store session connection (``labeled_tokens`` is its view).
    text
        The predicate.
    what
        How to name it in an error (``"encode: --positions"``).

    Raises
    ------
    InputError
        One line: not one expression, does not bind (listing the columns), not boolean.

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     check_predicate(con, "position_role = 'last'", what="--positions")
    "(\\nposition_role = 'last'\\n)"
    """
    expr = expression(text, what=what)
    cols = [str(r[0]) for r in con.execute("DESCRIBE SELECT * FROM labeled_tokens").fetchall()]
    try:
        kind = con.execute(f"DESCRIBE SELECT {expr} AS x FROM labeled_tokens").fetchall()[0][1]
    except duckdb.Error as e:
        raise InputError(
            f"{what} {text!r} is not a SQL predicate over labeled_tokens "
            f"({str(e).splitlines()[0]}); columns: {cols}"
        ) from None
    if str(kind) != "BOOLEAN":
        raise InputError(
            f"{what} {text!r} is {kind}, not a boolean predicate over labeled_tokens; "
            "compare it, e.g. `position_role = 'last'`"
        )
    return expr


def select_rows(con: duckdb.DuckDBPyConnection, run_id: int, expr: str) -> np.ndarray:
    """Sorted stored rows (int64) of run ``run_id`` that the checked predicate ``expr`` selects.

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     select_rows(con, 2, "(\\nposition_role = 'last'\\n)")[:3]
    array([ 5, 11, 18])
    """
    t = query_arrow(
        con,
        f'SELECT lt."row" FROM labeled_tokens lt WHERE lt.run_id = ? AND lt."row" IS NOT NULL '
        f'AND ({expr}) ORDER BY lt."row"',
        [run_id],
    )
    return np.asarray(t.column("row").to_numpy(), dtype=np.int64)


def _exists(store: Store) -> bool:
    n = store.catalog.read(
        "SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'feature_selections' "
        "AND database_name = 'cat'"
    ).to_pylist()[0]["n"]
    return bool(n)


def has_any(store: Store) -> bool:
    """Whether any (run, SAE) of the store has a positions-restricted encode.

    Example
    -------
    >>> has_any(st)  # doctest: +SKIP
    False
    """
    if not _exists(store):
        return False
    rows = store.catalog.read("SELECT count(*) AS n FROM feature_selections").to_pylist()
    return bool(rows[0]["n"])


def read(store: Store, run_id: int, sae_id: int) -> Selection | None:
    """The recorded selection of (run, SAE), or None: its features cover every row.

    Example
    -------
    >>> read(st, 2, 1)  # doctest: +SKIP
    Selection(positions="position_role = 'last'", n_rows=48, rows_sha256='...')
    """
    if not _exists(store):
        return None
    rows = store.catalog.read(
        "SELECT positions, n_rows, rows_sha256 FROM feature_selections "
        "WHERE run_id = ? AND sae_id = ?",
        [run_id, sae_id],
    ).to_pylist()
    if not rows:
        return None
    r = rows[0]
    return Selection(str(r["positions"]), int(r["n_rows"]), str(r["rows_sha256"]))


def record(con: Any, run_id: int, sae_id: int, sel: Selection) -> None:
    """Record the selection of (run, SAE), inside a catalog transaction (re-runnable).

    Example
    -------
    >>> st.catalog.transact(lambda con: record(con, 2, 1, sel))  # doctest: +SKIP
    """
    con.execute(TABLE)
    con.execute("DELETE FROM feature_selections WHERE run_id = ? AND sae_id = ?", [run_id, sae_id])
    con.execute(
        "INSERT INTO feature_selections VALUES (?, ?, ?, ?, ?)",
        [run_id, sae_id, sel.positions, sel.n_rows, sel.rows_sha256],
    )


def view_sql(con: duckdb.DuckDBPyConnection) -> str:
    """SQL of the session's ``feature_selections`` view: the catalog table, or an empty one.

    Example
    -------
    >>> import duckdb
    >>> duckdb.connect().execute(_EMPTY).fetchall()
    []
    """
    have = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'cat' "
        "AND table_name = 'feature_selections'"
    ).fetchall()[0][0]
    return "SELECT * FROM cat.main.feature_selections" if have else _EMPTY


def recorded(con: duckdb.DuckDBPyConnection, run_id: int, sae_id: int) -> Selection | None:
    """The recorded selection of (run, SAE) in a session (its ``feature_selections`` view).

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     recorded(con, 2, 1).n_rows
    48
    """
    rows = con.execute(
        "SELECT positions, n_rows, rows_sha256 FROM feature_selections "
        "WHERE run_id = ? AND sae_id = ?",
        [run_id, sae_id],
    ).fetchall()
    if not rows:
        return None
    return Selection(str(rows[0][0]), int(rows[0][1]), str(rows[0][2]))


def verify(con: duckdb.DuckDBPyConnection, run_id: int, sel: Selection, *, what: str) -> str:
    """The checked SQL of a recorded selection, once it still selects the recorded rows.

    Raises
    ------
    NotFoundError
        If the predicate now selects other rows than the encode did.

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     verify(con, 2, recorded(con, 2, 1), what="trigger_diff")
    "(\\nposition_role = 'last'\\n)"
    """
    expr = expression(sel.positions, what=what)
    now = select_rows(con, run_id, expr)
    if now.size != sel.n_rows or rows_sha256(now) != sel.rows_sha256:
        raise NotFoundError(
            f"{what}: the encoded rows {sel.positions!r} ({sel.n_rows} at encode time) now "
            f"select {now.size} other rows of run {run_id}; the catalog is inconsistent: "
            "re-encode under another SAE name"
        )
    return expr


def require_rows(store: Store, run_id: int, sae_id: int, rows: np.ndarray, *, what: str) -> None:
    """Refuse ``rows`` of a run if some have no features: an unfinished or positions-restricted encode.

    For analyses that read features of rows they selected themselves: a row that was
    not encoded has no features, which is not the same as zero features. The
    (run, SAE) is checked complete first (:func:`require_complete`).

    Raises
    ------
    NotFoundError
        The run has no features of the SAE, or its encode is in progress or was
        interrupted (naming the command that finishes it).
    InputError
        Naming the encoded predicate and how to restrict the selection to it.

    Example
    -------
    >>> require_rows(st, 2, 1, np.array([5, 11]), what="reward_correlation")  # doctest: +SKIP
    """
    sel = require_complete(store, run_id, sae_id, what=what)
    if sel is None:
        return
    with store.session.connection() as con:
        encoded = select_rows(con, run_id, expression(sel.positions, what=what))
    outside = np.setdiff1d(np.asarray(rows, dtype=np.int64), encoded)
    if outside.size:
        raise InputError(
            f"{what}: {outside.size} of the selected rows of run {run_id} have no features of "
            f"SAE {sae_id}: it was encoded for the rows {sel.positions!r} only (a row not "
            f"encoded is not a zero); add `AND ({sel.positions})` to the selection"
        )


def unfinished(
    what: str, root: object, run: str, sae: str, covered: int, stored: int, sel: Selection | None
) -> NotFoundError:
    """The error for (run, SAE) features whose committed parts cover only part of the run.

    One wording for every reader of features (the named queries, the report, the
    analyses): it names the ``actstore encode`` command that finishes the encode.

    Example
    -------
    >>> print(unfinished("report", "st", "r", "l1", 10, 40, None))
    report: run 'r' has features of SAE 'l1' for 10 of its 40 rows (an encode is in progress or was interrupted); finish it with `actstore encode st --sae l1 --run r`
    """
    pos = "" if sel is None else f' --positions "{sel.positions}"'
    return NotFoundError(
        f"{what}: run {run!r} has features of SAE {sae!r} for {covered} of its "
        f"{stored} rows (an encode is in progress or was interrupted); finish it with "
        f"`actstore encode {root} --sae {sae} --run {run}{pos}`"
    )


def unfinished_sql(runs: str, sae_id: str) -> str:
    """Scalar SQL: true, or an error with :func:`unfinished`'s message for a run not covered.

    For SQL that cannot call Python first (the named queries' table macros):
    ``runs`` is a SQL relation of run ids (column ``run_id``), ``sae_id`` a SQL
    scalar; the session views ``feature_files``, ``arrays``, ``runs`` and ``saes``
    are read. The store's path is not known in SQL: the command names ``STORE``.

    Example
    -------
    >>> "in progress or was interrupted" in unfinished_sql("SELECT 2 AS run_id", "1")
    True
    """

    def first(col: str) -> str:
        return f"first(c.{col} ORDER BY c.run_id)::VARCHAR"

    run, sae = first("run"), first("sae")
    message = (
        f"'actstore: run ''' || {run} || ''' has features of SAE ''' || {sae} || ''' for ' || "
        f"{first('covered')} || ' of its ' || {first('stored')} || ' rows (an encode is in "
        f"progress or was interrupted); finish it with `actstore encode STORE --sae ' || {sae} "
        f"|| ' --run ' || {run} || '`'"
    )
    return (
        f"(SELECT CASE WHEN count(*) > 0 THEN error({message}) ELSE true END FROM ("
        "SELECT r.run_id, r.name AS run, s.name AS sae, (SELECT sum(ff.n_rows) FROM feature_files "
        "ff WHERE ff.run_id = r.run_id AND ff.sae_id = s.sae_id)::BIGINT AS covered, (SELECT "
        "a.n_rows FROM arrays a WHERE a.run_id = r.run_id AND a.hook = s.hook) AS stored "
        f"FROM runs r, saes s WHERE r.run_id IN ({runs}) AND s.sae_id = {sae_id}) c "
        "WHERE c.covered < c.stored)"
    )


def require_complete(store: Store, run_id: int, sae_id: int, *, what: str) -> Selection | None:
    """Refuse (run, SAE) unless its committed feature parts cover every stored row.

    For readers of the ``features`` view that do not go through the named queries
    (whose :meth:`~actstore.queries.context.Context.require_features` does the
    same): an interrupted or running encode leaves rows without features, which
    are not zeros. Returns the recorded selection of a positions-restricted
    encode (its features cover those rows only), or None (every row).

    Raises
    ------
    NotFoundError
        The run has no features of the SAE, or only some of its rows are covered
        (:func:`unfinished`, naming the command that finishes the encode).

    Example
    -------
    >>> require_complete(st, 2, 1, what="report")  # doctest: +SKIP
    Selection(positions="position_role = 'last'", n_rows=48, rows_sha256='...')
    """
    got = store.catalog.read(
        "SELECT r.name AS run, s.name AS sae, (SELECT sum(ff.n_rows) FROM feature_files ff "
        "WHERE ff.run_id = r.run_id AND ff.sae_id = s.sae_id) AS covered, (SELECT a.n_rows "
        "FROM arrays a WHERE a.run_id = r.run_id AND a.hook = s.hook) AS stored "
        "FROM runs r, saes s WHERE r.run_id = ? AND s.sae_id = ?",
        [run_id, sae_id],
    ).to_pylist()
    if not got:
        raise NotFoundError(f"{what}: no run {run_id} or SAE {sae_id} in store {store.root}")
    g = got[0]
    run, sae = str(g["run"]), str(g["sae"])
    if g["covered"] is None:
        raise NotFoundError(
            f"{what}: run {run!r} has no features of SAE {sae!r}; encode them with "
            f"`actstore encode {store.root} --sae {sae} --run {run}`"
        )
    sel = read(store, run_id, sae_id)
    if g["stored"] is not None and int(g["covered"]) < int(g["stored"]):
        raise unfinished(what, store.root, run, sae, int(g["covered"]), int(g["stored"]), sel)
    return sel
