"""One SQL session per store: the catalog's tables plus views over rows and features.

The session is an in-memory DuckDB connection. For each statement it attaches
the catalog read-only (as ``cat``), refreshes its views if something was
committed since the last statement, runs the statement, and detaches. Names
resolve first in the session (views, macros, functions) and then in the
catalog, so ``SELECT * FROM tokens`` and ``SELECT * FROM features`` both work.

Views:

``features``
    (run_id, sae_id, row, feature, value) over the committed Parquet parts.
``feature_acts``
    ``features`` with the run's name and the SAE's name, hook and layer.
``labeled_tokens``
    every token joined to its run and its prompt's text and label columns,
    so ``WHERE triggered AND position_role = 'last'`` works.
``labeled_generations``
    every completion with ``completion`` (its ``text`` stripped of the leading
    space a completion usually starts with), its run, checkpoint label, edit
    name, its prompt's text (``prompt``) and labels, and every score of it as
    ``score_{scorer}`` and ``flag_{scorer}`` (per-prompt scores such as losses
    and logit metrics have ``sample_idx`` 0), so ``WHERE completion = answer``
    works and behaviour by label is one ``GROUP BY``.

Other packages add macros and functions with :func:`register_extension`
(``actstore.queries`` adds the named queries and array functions), and clearer
messages for their errors with :func:`register_error_hint`.

Example
-------
>>> import tempfile, actstore
>>> st = actstore.open(tempfile.mkdtemp(), create=True)
>>> st.sql("SELECT count(*) AS n FROM labeled_tokens").fetchall()
[(0,)]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from actstore.errors import CorruptChunkError, InputError
from actstore.store import part_check, selections
from actstore.store.catalog import damaged_catalog, query_arrow

if TYPE_CHECKING:
    from actstore.store.store import Store

SessionExtension = Callable[[duckdb.DuckDBPyConnection, "Store"], None]
_EXTENSIONS: list[SessionExtension] = []
ErrorHint = Callable[[str], "str | None"]
_ERROR_HINTS: list[ErrorHint] = []

_EMPTY_FEATURES = (
    "SELECT NULL::INTEGER AS run_id, NULL::INTEGER AS sae_id, NULL::BIGINT AS row, "
    "NULL::INTEGER AS feature, NULL::FLOAT AS value WHERE false"
)


def register_extension(fn: SessionExtension) -> SessionExtension:
    """Register ``fn(con, store)``, called once per new session after its views exist.

    Example
    -------
    >>> @register_extension
    ... def _answer(con, store):
    ...     con.execute("CREATE OR REPLACE MACRO answer() AS 42")
    >>> _EXTENSIONS.remove(_answer)
    """
    if fn not in _EXTENSIONS:
        _EXTENSIONS.append(fn)
    return fn


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _labeled_generations(con: duckdb.DuckDBPyConnection) -> str:
    """The ``labeled_generations`` view's SQL: one pivoted score column pair per scorer."""
    scorers = [
        str(r[0])
        for r in con.execute("SELECT DISTINCT scorer FROM cat.main.scores ORDER BY 1").fetchall()
    ]
    pivot = "".join(
        f", max(value) FILTER (WHERE scorer = '{n.replace(chr(39), chr(39) * 2)}') AS "
        f"{_ident('score_' + n)}, bool_or(flag) FILTER (WHERE scorer = "
        f"'{n.replace(chr(39), chr(39) * 2)}') AS {_ident('flag_' + n)}"
        for n in scorers
    )
    picked = "".join(f", sc.{_ident('score_' + n)}, sc.{_ident('flag_' + n)}" for n in scorers)
    # the columns of FORMAT.md's plain-DuckDB definition first, then the pivoted scores
    return f"""SELECT g.*, trim(g.text) AS completion, r.name AS run, r.checkpoint_id,
               r.prompt_set_id, p.text AS prompt, p.* EXCLUDE (prompt_set_id, prompt_idx, text),
               c.label AS checkpoint, e.name AS edit{picked}
        FROM cat.main.generations g
        JOIN cat.main.runs r USING (run_id)
        LEFT JOIN cat.main.checkpoints c ON c.checkpoint_id = r.checkpoint_id
        LEFT JOIN cat.main.edits e ON e.edit_id = r.edit_id
        LEFT JOIN cat.main.prompts p
          ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = g.prompt_idx
        LEFT JOIN (SELECT run_id, prompt_idx, sample_idx{pivot} FROM cat.main.scores
                   GROUP BY ALL) sc
          ON sc.run_id = g.run_id AND sc.prompt_idx = g.prompt_idx
         AND sc.sample_idx = g.sample_idx"""


def register_error_hint(fn: ErrorHint) -> ErrorHint:
    """Register ``fn(duckdb_message)``: a better one-line message for an error, or None.

    Example
    -------
    >>> @register_error_hint
    ... def _hint(msg):
    ...     return "no answer() here; try 42" if "answer" in msg else None
    >>> _ERROR_HINTS.remove(_hint)
    """
    if fn not in _ERROR_HINTS:
        _ERROR_HINTS.append(fn)
    return fn


class Session:
    """The DuckDB session of one :class:`~actstore.Store`.

    Example
    -------
    >>> s = Session(st)  # doctest: +SKIP
    >>> s.execute("SELECT 1").to_pylist()  # doctest: +SKIP
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        # actstore shows its own progress: no DuckDB progress bar in command output
        self.con = duckdb.connect()
        self.con.execute("SET enable_progress_bar = false")
        store.location.register(self.con)  # a remote store's Parquet parts, by URL
        self._lock = threading.RLock()
        self._seq: object = None
        self._extended = False
        self._restricted = False
        self._unverified: list[part_check.Part] = []

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Yield the session connection with the catalog attached and views fresh."""
        try:
            with self._lock, self.store.catalog.attached(self.con):
                self._refresh()
                yield self.con
        except duckdb.Error as e:
            bad = damaged_catalog(self.store.catalog.path, e)
            if bad is None:
                raise
            raise bad from None

    def verify_features(self) -> None:
        """Verify every committed feature part not verified yet in this process.

        :meth:`execute` calls it before a statement that may read the ``features``
        view; a damaged part raises :class:`~actstore.errors.CorruptChunkError`
        naming its run, SAE and path (statements that read no part still run).

        Example
        -------
        >>> st.session.verify_features()  # doctest: +SKIP
        """
        with self._lock:
            if self._unverified:
                part_check.verify(self.store.location, self._unverified)
                self._unverified = []

    def restrict(self) -> None:
        """Limit this session, for good, to reading the store's own files.

        For sessions built only to answer queries (``actstore query``, ``actstore
        info``): DuckDB's own ``enable_external_access`` is turned off with the
        store's directories (and a private spill directory) as its
        ``allowed_directories``, so no statement, however it got there, can read
        or write another file, attach another database or install an extension.
        It cannot be undone on this session (DuckDB refuses to re-enable access).

        Example
        -------
        >>> import tempfile, actstore, duckdb
        >>> st = actstore.open(tempfile.mkdtemp() + "/s", create=True)
        >>> st.session.restrict()
        >>> st.sql("SELECT count(*) FROM runs").fetchall()
        [(0,)]
        >>> st.sql("COPY (SELECT 1) TO '/tmp/elsewhere.csv'")
        Traceback (most recent call last):
        ...
        actstore.errors.InputError: SQL error: Permission Error: Cannot access file "/tmp/elsewhere.csv" - file system operations are disabled by configuration (in: COPY (SELECT 1) TO '/tmp/elsewhere.csv')
        """
        import tempfile

        loc = self.store.location
        if loc.is_local:
            allowed = [str(loc.local_path.resolve()) + "/"]
        else:
            url = loc.url.rstrip("/")
            scheme, _, rest = url.partition("://")
            allowed = [f"{url}/", f"{scheme}:///{rest}/"]  # DuckDB normalizes to scheme:///
        cache = getattr(self.store.catalog, "cache", None)  # a remote catalog's local copies
        if cache is not None:
            allowed.append(str(cache) + "/")
        with self._lock:
            if self._restricted:
                return
            spill = tempfile.mkdtemp(prefix="actstore-spill-")
            self.con.execute("SET temp_directory = ?", [spill])
            self.con.execute("SET allowed_directories = ?", [[*allowed, spill + "/"]])
            self.con.execute("SET enable_external_access = false")
            self._restricted = True

    def execute(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> pa.Table:
        """Run one statement and return its result as Arrow.

        Example
        -------
        >>> Session(st).execute("SELECT count(*) FROM runs")  # doctest: +SKIP
        """
        with self.connection() as con:
            if self._unverified and part_check.may_read_features(query):
                self.verify_features()
            try:
                return query_arrow(con, query, params)
            except duckdb.Error as e:
                bad = damaged_catalog(self.store.catalog.path, e)
                if bad is not None:
                    raise bad from None
                for hint in _ERROR_HINTS:
                    if (better := hint(str(e))) is not None:
                        raise InputError(f"SQL error: {better}") from e
                first = " ".join(query.split())
                raise InputError(f"SQL error: {str(e).splitlines()[0]} (in: {first[:300]})") from e

    def _refresh(self) -> None:
        con = self.con
        seq = con.execute("SELECT value FROM cat.meta WHERE key = 'commit_seq'").fetchall()
        if seq == self._seq:
            return
        con.execute("SET search_path = 'memory.main,cat.main'")
        root = self.store.location.url
        parts = [
            f"{root}/{r[0]}"
            for r in con.execute(
                "SELECT path FROM cat.feature_files ORDER BY run_id, sae_id, first_row"
            ).fetchall()
        ]
        if parts:
            listing = ", ".join("'" + p.replace("'", "''") + "'" for p in parts)
            src = f"SELECT run_id, sae_id, row, feature, value FROM read_parquet([{listing}])"
        else:
            src = _EMPTY_FEATURES
        self._unverified = part_check.parts_of(con)  # verified before a statement reads them
        try:  # DuckDB reads the first part's footer to bind the view
            con.execute(f"CREATE OR REPLACE VIEW features AS {src}")
        except duckdb.Error as e:
            # a damaged part fails only the statements that read features, naming it
            con.execute(f"CREATE OR REPLACE VIEW features AS {self._damaged_view(e)}")
        con.execute(
            """CREATE OR REPLACE VIEW feature_acts AS
            SELECT f.run_id, r.name AS run, f.sae_id, s.name AS sae, s.hook, s.layer,
                   f.row, f.feature, f.value
            FROM features f JOIN cat.main.runs r USING (run_id) JOIN cat.main.saes s USING (sae_id)"""
        )
        con.execute(
            """CREATE OR REPLACE VIEW labeled_tokens AS
            SELECT t.*, r.name AS run, r.checkpoint_id, r.prompt_set_id,
                   p.* EXCLUDE (prompt_set_id, prompt_idx)
            FROM cat.main.tokens t
            JOIN cat.main.runs r USING (run_id)
            LEFT JOIN cat.main.prompts p
              ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = t.prompt_idx"""
        )
        con.execute(f"CREATE OR REPLACE VIEW labeled_generations AS {_labeled_generations(con)}")
        # the rows positions-restricted encodes cover (empty when the table does not exist yet)
        con.execute(f"CREATE OR REPLACE VIEW feature_selections AS {selections.view_sql(con)}")
        if not self._extended:
            for ext in _EXTENSIONS:
                ext(con, self.store)
            self._extended = True
        self._seq = seq

    def _damaged_view(self, e: duckdb.Error) -> str:
        try:
            part_check.verify(self.store.location, self._unverified)
            why = f"the feature parts cannot be read: {str(e).splitlines()[0]}"
        except CorruptChunkError as bad:
            why = str(bad)
        msg = "'" + why.replace("'", "''") + "'"
        return f"SELECT * FROM ({_EMPTY_FEATURES.replace(' WHERE false', '')}) WHERE error({msg})"

    def close(self) -> None:
        """Close the in-memory connection."""
        self.con.close()
