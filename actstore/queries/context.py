"""Checking a named query's parameters against the catalog, and binding its values.

A :class:`Context` is what a named query's builder writes its SQL with. It

* resolves run and SAE names to ids, raising errors that list the valid ones
  (:class:`~actstore.errors.RunNotFoundError`, :class:`~actstore.errors.NotFoundError`);
* checks that a user's SQL predicate or expression binds over ``labeled_tokens``
  with the right type before it is placed in the query (a predicate is SQL by
  nature; a bad one gets an error naming the parameter and the columns);
* binds every value (ids, numbers, choices) as a ``$p{n}`` parameter, never pasting it;
* picks where a (run, SAE)'s features are read from: the session's native cache or
  the Parquet parts (``actstore.queries.cache``).

Example
-------
>>> with st.session.connection() as con:  # doctest: +SKIP
...     Context(st, con, "trigger_diff", cache=False).run("backdoored/pairs")
(2, 'backdoored/pairs')
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import duckdb

from actstore.errors import InputError, NotFoundError, RunNotFoundError
from actstore.queries.cache import feature_cache
from actstore.store import part_check, selections
from actstore.store.ids import as_id
from actstore.store.predicate import expression

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["NUMERIC_TYPES", "Context", "quote_ident"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: SQL types a numeric label may have.
NUMERIC_TYPES = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "UHUGEINT",
    "FLOAT",
    "DOUBLE",
    "BOOLEAN",
)


def quote_ident(name: str) -> str:
    """Quote a SQL identifier.

    Example
    -------
    >>> print(quote_ident("pair id"))
    "pair id"
    """
    return '"' + name.replace('"', '""') + '"'


class Context:
    """Names checked against the catalog, values bound as parameters, feature sources.

    One context serves one query: it holds the session connection (catalog attached)
    and collects the parameters the query's SQL binds.

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     ctx = Context(st, con, "feature_density", cache=False)
    ...     ctx.bind(3), ctx.binds
    ('$p0', {'p0': 3})
    """

    def __init__(
        self, store: Store, con: duckdb.DuckDBPyConnection, query: str, cache: bool | str
    ) -> None:
        self.store = store
        self.con = con
        self.query = query
        self.cache = cache
        self.binds: dict[str, Any] = {}
        self._columns: dict[str, str] | None = None
        #: run_id -> (checked SQL, selection, run, SAE) of positions-restricted encodes
        self._encoded: dict[int, tuple[str, selections.Selection, str, str]] = {}

    def bind(self, value: Any) -> str:
        """Bind ``value`` as a new parameter; return its placeholder (``$p0``, ``$p1``...).

        Example
        -------
        >>> ctx.bind("backdoored/pairs")  # doctest: +SKIP
        '$p0'
        """
        name = f"p{len(self.binds)}"
        self.binds[name] = value
        return f"${name}"

    def run(self, value: str | int) -> tuple[int, str]:
        """(run_id, name) of a run given by name or id; the error lists the runs.

        Example
        -------
        >>> ctx.run(2)  # doctest: +SKIP
        (2, 'backdoored/pairs')
        """
        rows = self.con.execute("SELECT run_id, name FROM cat.main.runs ORDER BY run_id").fetchall()
        want = as_id(value)
        for rid, name in rows:
            if value == name or (want is not None and want == rid):
                return int(rid), str(name)
        names = [r[1] for r in rows]
        raise RunNotFoundError(
            f"{self.query}: run {value if want is None else want!r} not in store "
            f"{self.store.root}; runs: "
            f"{names or 'none yet'} (see `actstore info {self.store.root}`)"
        )

    def sae(self, value: str) -> tuple[int, int, str]:
        """(sae_id, d_sae, name) of an SAE given by name; the error lists the SAEs.

        Example
        -------
        >>> ctx.sae("sae_l2")  # doctest: +SKIP
        (1, 256, 'sae_l2')
        """
        rows = self.con.execute(
            "SELECT sae_id, name, d_sae FROM cat.main.saes ORDER BY sae_id"
        ).fetchall()
        for sid, name, d_sae in rows:
            if value == name:
                return int(sid), int(d_sae), str(name)
        raise NotFoundError(
            f"{self.query}: SAE {value!r} not in store {self.store.root}; SAEs: "
            f"{[r[1] for r in rows] or 'none yet'} (see `actstore info {self.store.root}`)"
        )

    def require_features(self, rid: int, sid: int, run: str, sae: str) -> None:
        """Raise unless the run has committed features of the SAE (listing the runs that do).

        Features cover every stored row of the run, or, after a positions-restricted
        encode, every row of its recorded selection (checked to still select those
        rows); :meth:`tokens` then restricts the query's tokens to them.

        Example
        -------
        >>> ctx.require_features(2, 1, "backdoored/pairs", "sae_l2")  # doctest: +SKIP
        """
        have = self.con.execute(
            "SELECT count(*) FROM cat.main.feature_files WHERE run_id = ? AND sae_id = ?",
            [rid, sid],
        ).fetchall()[0][0]
        if not have:
            runs = [
                r[0]
                for r in self.con.execute(
                    "SELECT DISTINCT r.name FROM cat.main.feature_files f JOIN cat.main.runs r "
                    "ON f.run_id = r.run_id WHERE f.sae_id = ? ORDER BY r.name",
                    [sid],
                ).fetchall()
            ]
            raise NotFoundError(
                f"{self.query}: run {run!r} has no features of SAE {sae!r}; runs with them: "
                f"{runs or 'none'} (ingest the run with this SAE first)"
            )
        covered, stored = self.con.execute(
            "SELECT (SELECT sum(n_rows) FROM cat.main.feature_files WHERE run_id = ? AND "
            "sae_id = ?), (SELECT a.n_rows FROM cat.main.arrays a JOIN cat.main.saes s "
            "ON a.hook = s.hook WHERE a.run_id = ? AND s.sae_id = ?)",
            [rid, sid, rid, sid],
        ).fetchall()[0]
        sel = selections.recorded(self.con, rid, sid)
        if stored is not None and int(covered) < int(stored):
            raise selections.unfinished(
                self.query, self.store.root, run, sae, int(covered), int(stored), sel
            )
        if sel is not None:
            expr = selections.verify(self.con, rid, sel, what=self.query)
            self._encoded[rid] = (expr, sel, run, sae)

    def encoded_subset(self, rid: int) -> str | None:
        """The recorded predicate of a positions-restricted encode of run ``rid`` (None: all rows).

        Example
        -------
        >>> ctx.encoded_subset(2)  # doctest: +SKIP
        "position_role = 'last'"
        """
        got = self._encoded.get(rid)
        return None if got is None else got[1].positions

    def require_subsets_cover(self, sid: int, pos: str, positions: str) -> None:
        """Refuse ``positions`` (checked SQL ``pos``) if, in any run, it selects rows SAE
        ``sid`` was not encoded for (runs with a positions-restricted encode).

        Example
        -------
        >>> ctx.require_subsets_cover(1, ctx.predicate("positions", "true"), "true")  # doctest: +SKIP
        """
        rows = self.con.execute(
            "SELECT s.run_id, r.name, x.name FROM feature_selections s JOIN cat.main.runs r "
            "ON r.run_id = s.run_id JOIN cat.main.saes x ON x.sae_id = s.sae_id "
            "WHERE s.sae_id = ? ORDER BY s.run_id",
            [sid],
        ).fetchall()
        for rid, run, sae in rows:
            self.require_features(int(rid), sid, str(run), str(sae))
            self._inside_encoded(int(rid), pos, positions)

    def _inside_encoded(self, rid: int, pos: str, positions: str | None) -> str:
        """``pos`` restricted to the encoded rows of ``rid``; refused if it selects others."""
        got = self._encoded.get(rid)
        if got is None:
            return pos
        enc, sel, run, sae = got
        if positions is not None:
            outside = self.con.execute(
                f'SELECT count(*) FROM labeled_tokens lt WHERE lt.run_id = ? AND lt."row" IS NOT '
                f"NULL AND ({pos}) AND NOT coalesce(({enc}), false)",
                [rid],
            ).fetchall()[0][0]
            if outside:
                raise InputError(
                    f"{self.query}: positions {positions!r} selects {outside} rows of run "
                    f"{run!r} that have no features of SAE {sae!r}: it was encoded for the rows "
                    f"{sel.positions!r} only (a row not encoded is not a zero); restrict "
                    f'positions to them, e.g. "({sel.positions}) AND ({positions})", or encode '
                    "those rows under another SAE name"
                )
        return f"({pos}) AND ({enc})"

    def columns(self) -> dict[str, str]:
        """Columns of ``labeled_tokens`` and their SQL types.

        Example
        -------
        >>> ctx.columns()["triggered"]  # doctest: +SKIP
        'BOOLEAN'
        """
        if self._columns is None:
            rows = self.con.execute("DESCRIBE SELECT * FROM labeled_tokens").fetchall()
            self._columns = {str(r[0]): str(r[1]) for r in rows}
        return self._columns

    def column(self, param: str, name: str) -> str:
        """The quoted identifier of column ``name`` of ``labeled_tokens`` (else an error).

        Example
        -------
        >>> ctx.column("pair", "pair_id")  # doctest: +SKIP
        '"pair_id"'
        """
        if name not in self.columns():
            raise NotFoundError(
                f"{self.query}: {param} {name!r} is not a column of labeled_tokens; columns: "
                f"{list(self.columns())}"
            )
        return quote_ident(name)

    def sql(self, param: str, text: str, kinds: tuple[str, ...], what: str) -> str:
        """Check that ``text`` is one expression binding over labeled_tokens with a type in ``kinds``.

        DuckDB's parser checks it is exactly one expression first
        (:func:`actstore.store.predicate.expression`): a second statement, ``COPY``,
        a table function or a file read is refused before anything runs.

        Example
        -------
        >>> ctx.sql("label", "reward * 2", NUMERIC_TYPES, "numeric expression")  # doctest: +SKIP
        '(\\nreward * 2\\n)'
        """
        text = expression(text, what=f"{self.query}: {param}")
        try:
            rows = self.con.execute(f"DESCRIBE SELECT {text} AS x FROM labeled_tokens").fetchall()
        except duckdb.Error as e:
            first = str(e).splitlines()[0]
            given = text[2:-2]
            if _IDENT.match(given.strip()) and given.strip() not in self.columns():
                raise NotFoundError(
                    f"{self.query}: {param} {given!r} is not a column of labeled_tokens; "
                    f"columns: {list(self.columns())}"
                ) from None
            raise InputError(
                f"{self.query}: {param} {given!r} is not a valid SQL {what} over labeled_tokens "
                f"({first}); columns: {list(self.columns())}"
            ) from None
        typ = str(rows[0][1])
        if typ not in kinds and typ != "NULL":
            raise InputError(
                f"{self.query}: {param} {text[2:-2]!r} is {typ}, expected a {what}"
                + (" (compare it, e.g. `label = 1`)" if what == "boolean predicate" else "")
            )
        return text

    def predicate(self, param: str, text: str | None) -> str:
        """A checked boolean predicate over ``labeled_tokens`` (``true`` for None).

        Example
        -------
        >>> ctx.predicate("positions", "position_role = 'last'")  # doctest: +SKIP
        "(\\nposition_role = 'last'\\n)"
        """
        if text is None:
            return "true"
        return self.sql(param, text, ("BOOLEAN",), "boolean predicate")

    def features(self, rid: int, sid: int, d_sae: int | None = None) -> str:
        """Relation ``("row", feature, value)`` of (run, SAE): the cache, or its Parquet parts.

        Example
        -------
        >>> ctx.features(2, 1)  # doctest: +SKIP
        'memory.main._actstore_fc_r2_s1'
        """
        # a damaged part raises here, naming run, SAE and part, before its rows are used
        part_check.verify(
            self.store.location, part_check.parts_of(self.con, run_id=rid, sae_id=sid)
        )
        table = feature_cache(self.store).source(
            self.con, self.store.location.url, rid, sid, policy=self.cache
        )
        if table is not None:
            return table
        # the committed parts of this (run, SAE) only, rather than the `features` view over
        # every part of the store filtered by run and SAE (same rows, fewer files opened)
        root = self.store.location.url
        files = [
            f"{root}/{r[0]}"
            for r in self.con.execute(
                "SELECT path FROM cat.main.feature_files WHERE run_id = ? AND sae_id = ? "
                "ORDER BY first_row, path",
                [rid, sid],
            ).fetchall()
        ]
        # Parquet scans carry no value range for `feature`; a USMALLINT gives it one, so
        # DuckDB can group by it in a perfect hash table (see sparse.PERFECT_HT_BITS)
        feature = (
            "fp.feature::USMALLINT" if d_sae is not None and d_sae <= 1 << 16 else "fp.feature"
        )
        return (
            f'(SELECT fp."row", {feature} AS feature, fp.value '
            f"FROM read_parquet({self.bind(files)}) fp)"
        )

    def run_sae(self, run: str | int, sae: str) -> tuple[int, int, int]:
        """(run_id, sae_id, d_sae), checked to have committed features.

        Example
        -------
        >>> ctx.run_sae("backdoored/pairs", "sae_l2")  # doctest: +SKIP
        (2, 1, 256)
        """
        rid, run_name = self.run(run)
        sid, d_sae, sae_name = self.sae(sae)
        self.require_features(rid, sid, run_name, sae_name)
        return rid, sid, d_sae

    def tokens(self, rid: int, positions: str | None, extra: str = "") -> str:
        """SQL selecting the stored tokens of run ``rid`` that ``positions`` picks.

        Columns ``lt."row"`` and then ``extra`` (SQL over ``labeled_tokens lt``).
        After a positions-restricted encode of the run (seen by :meth:`require_features`)
        only its encoded rows are selected, and ``positions`` selecting any other row is
        refused: a row that was not encoded has no features, not zero features.

        Example
        -------
        >>> ctx.tokens(2, "position_role = 'last'", ", lt.prompt_idx")  # doctest: +SKIP
        """
        pos = self.predicate("positions", positions)
        if rid in self._encoded:  # a positions-restricted encode: its rows only
            pos = self._inside_encoded(rid, pos, positions)
        return (
            f'SELECT lt."row"{extra} FROM labeled_tokens lt WHERE lt.run_id = {self.bind(rid)} '
            f'AND lt."row" IS NOT NULL AND ({pos})'
        )
