"""The named queries as DuckDB table macros, callable from any SQL of a store session.

The macros are written from the same SQL as :func:`actstore.queries.run_named`
(``actstore.queries.sparse``), with two differences: run and SAE names are
resolved by scalar subqueries (an unknown name raises an error listing the valid
ones), and the token selection, which embeds the caller's SQL predicates, goes
through DuckDB's ``query()`` table function. Features are read from the Parquet
parts (the native cache is kept by ``run_named``, the faster path). On large SAEs,
``SET perfect_ht_threshold = 20`` in the session first lets DuckDB aggregate per
feature in a perfect hash table, as ``run_named`` does for its own queries.

Their signatures are generated from the named queries' parameters
(``actstore.queries.signatures``: :data:`SIGNATURES`), listed by ``actstore query
--list``; a macro called with arguments it does not take is an error that shows them
(:func:`explain_error`, registered with the session).

Example
-------
>>> st.sql("SELECT feature, diff, q FROM trigger_diff('backdoored/pairs', 'sae_l2', "
...        "'triggered', positions := 'position_role = ''last''') WHERE q < 0.01")  # doctest: +SKIP
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING

import duckdb

from actstore.queries import sparse
from actstore.queries.signatures import SIGNATURES, macro_help
from actstore.store import selections

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["SIGNATURES", "ensure_installed", "explain_error", "install_macros", "mark_installed"]


def _id(table: str, key: str, param: str, what: str, nullable: bool = False) -> str:
    """Scalar SQL: the id of the ``table`` row named ``param``, else an error listing names."""
    null = f"WHEN {param} IS NULL THEN NULL " if nullable else ""
    return (
        f"(SELECT CASE {null}WHEN v.id IS NULL THEN error('actstore: {what} ''' || "
        f"{param}::VARCHAR || ''' not in the store; {what}s: ' || coalesce((SELECT "
        f"string_agg(x2.name, ', ' ORDER BY x2.{key}) FROM {table} x2), 'none yet')) "
        f"ELSE v.id END FROM (SELECT min(x1.{key}) AS id FROM {table} x1 "
        f"WHERE x1.name = {param}::VARCHAR) v)"
    )


def _macro_src(rid: str, sid: str) -> str:
    # a positions-restricted encode (feature_selections) covers some rows only, and a
    # macro cannot restrict its query() token selection to them: refused, pointing to
    # run_named, which does
    subset = (
        f"(SELECT CASE WHEN count(*) > 0 THEN error('actstore: the features of this run and "
        f"SAE cover only the rows ' || any_value(fs.positions) || ' (a positions-restricted "
        f"encode), which the SQL macros cannot restrict to; use actstore query or "
        f"actstore.queries.run_named, which answer over those rows') ELSE true END "
        f"FROM feature_selections fs WHERE fs.run_id = {rid} AND fs.sae_id = {sid})"
    )
    # an interrupted encode leaves rows without features (not zeros): refused, as run_named does
    done = selections.unfinished_sql(f"SELECT {rid} AS run_id", sid)
    return (
        f'(SELECT fv."row", fv.feature, fv.value FROM features fv '
        f"WHERE fv.run_id = {rid} AND fv.sae_id = {sid} AND {subset} AND {done})"
    )


def _macro_tokens(rid: str, select: str, alias: str = "q") -> str:
    """Selected stored tokens of run ``rid`` through ``query()`` (the predicates are SQL)."""
    return (
        f"SELECT {alias}.* EXCLUDE (run_id) FROM query('SELECT run_id, \"row\"' || {select} || "
        f"' FROM labeled_tokens WHERE \"row\" IS NOT NULL AND (' || coalesce(positions, 'true') "
        f"|| ')') {alias} WHERE {alias}.run_id = {rid}"
    )


def _d_sae(sid: str) -> str:
    return f"(SELECT s.d_sae FROM saes s WHERE s.sae_id = {sid})"


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create (or replace) the named queries' table macros on a session connection.

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     install_macros(con)
    """
    rid, sid = _id("runs", "run_id", "run", "run"), _id("saes", "sae_id", "sae", "SAE")
    group = (
        "', CASE WHEN (' || group_a || ') THEN 1 WHEN (' || coalesce(group_b, 'NOT (' || "
        "group_a || ')') || ') THEN 0 END AS g'"
    )
    pair = group + " || ', \"' || replace(pair, '\"', '\"\"') || '\" AS pair'"
    macros = {
        "trigger_diff": sparse.trigger_diff(
            sel=_macro_tokens(rid, group),
            src=_macro_src(rid, sid),
            d_sae=_d_sae(sid),
            rank_by="rank_by",
        ),
        "trigger_diff_paired": sparse.trigger_diff_paired(
            sel=_macro_tokens(rid, pair),
            src=_macro_src(rid, sid),
            d_sae=_d_sae(sid),
            rank_by="rank_by",
        ),
        "feature_reward_corr": sparse.feature_reward_corr(
            sel=_macro_tokens(rid, "', prompt_idx, (' || label || ')::DOUBLE AS y'"),
            src=_macro_src(rid, sid),
            d_sae=_d_sae(sid),
            aggregate="aggregate",
            rank_by="rank_by",
        ),
        "feature_density": sparse.feature_density(
            sel=_macro_tokens(rid, "''"),
            src=_macro_src(rid, sid),
            n_tokens="0",
            d_sae=_d_sae(sid),
        ),
    }
    rid_a, rid_b = _id("runs", "run_id", "run_a", "run"), _id("runs", "run_id", "run_b", "run")
    sid_ab = _id("saes", "sae_id", "sae", "SAE")
    same = (
        'SELECT lt2."row" FROM ({tokens}) lt2 WHERE lt2.prompt_idx IN '
        "(SELECT t.prompt_idx FROM tokens t WHERE t.run_id = {other})"
    )
    with_prompt = "', prompt_idx'"
    macros["checkpoint_diff"] = sparse.checkpoint_diff(
        sel_a=same.format(tokens=_macro_tokens(rid_a, with_prompt), other=rid_b),
        sel_b=same.format(tokens=_macro_tokens(rid_b, with_prompt), other=rid_a),
        src_a=_macro_src(rid_a, sid_ab),
        src_b=_macro_src(rid_b, sid_ab),
        d_sae=_d_sae(sid_ab),
    )
    rid_opt = _id("runs", "run_id", "run", "run", nullable=True)
    covered = (  # every run the macro reads, checked complete
        f"SELECT DISTINCT ff2.run_id FROM feature_files ff2 WHERE ff2.sae_id = {sid} "
        f"AND (run IS NULL OR ff2.run_id = {rid_opt})"
    )
    top_src = (
        f'(SELECT fv.run_id, fv."row", fv.feature, fv.value FROM features fv '
        f"WHERE fv.sae_id = {sid} AND (run IS NULL OR fv.run_id = {rid_opt}) "
        f"AND {selections.unfinished_sql(covered, sid)})"
    )
    top_sel = (
        'SELECT q.run_id, q."row" FROM query(\'SELECT run_id, "row" FROM labeled_tokens '
        "WHERE \"row\" IS NOT NULL AND (' || coalesce(positions, 'true') || ')') q"
    )
    macros["top_activations"] = sparse.top_activations(
        src=top_src, sel=top_sel, feature="feature_id", k="k", width="width"
    )
    for name, body in macros.items():
        con.execute(f"CREATE OR REPLACE MACRO {SIGNATURES[name]} AS TABLE {body}")


_WRONG_CALL = re.compile(
    r'Macro "?(\w+)"?\(\) (does not support the supplied arguments|has named argument)'
)


def explain_error(message: str) -> str | None:
    """A one-line error for a named-query macro called with wrong arguments, else None.

    DuckDB's own message says only that the arguments do not fit; this names the
    macro's signature (and its named query's other macros).

    Example
    -------
    >>> explain_error("Binder Error: Macro checkpoint_diff() does not support the supplied "
    ...               "arguments. You might need to add explicit type casts.")[:64]
    'checkpoint_diff() was called with arguments it does not take; it'
    """
    m = _WRONG_CALL.search(message)
    if m is None or (sigs := macro_help(m.group(1))) is None:
        return None
    return (
        f"{m.group(1)}() was called with arguments it does not take; its signature: {sigs} "
        "(required arguments first, then `name := value`; see `actstore query --list`)"
    )


#: Connections the queries are installed on (asking DuckDB costs ~10 ms a statement).
_INSTALLED: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()


def mark_installed(con: duckdb.DuckDBPyConnection) -> None:
    """Record that the queries' macros and functions are installed on ``con``.

    Example
    -------
    >>> import duckdb
    >>> mark_installed(duckdb.connect())
    """
    _INSTALLED.add(con)


def ensure_installed(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """Install the queries' macros and functions on ``con`` if they are missing.

    (They are installed on every new session once ``actstore.queries`` is imported;
    this covers a session created before that import.)

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     ensure_installed(con, st)
    """
    if con in _INSTALLED:
        return
    have = con.execute(
        "SELECT count(*) FROM duckdb_functions() WHERE function_name = 'trigger_diff'"
    ).fetchall()[0][0]
    if not have:
        from actstore.queries import install

        install(con, store)
    mark_installed(con)
