"""SQL fragments a user passes (predicates, expressions), checked by DuckDB's own parser.

A predicate such as ``where="triggered AND position_role = 'last'"`` is SQL by
nature, so it is placed into a query as SQL, not bound as a value. Before it is,
:func:`expression` parses it with DuckDB's parser (``json_serialize_sql``) inside
exactly the parentheses it will be placed in, and refuses anything that is not
one expression:

* a second statement, or text that closes the parentheses and continues the
  query (``true) TO 'pwned.csv' (FORMAT csv); SELECT (1``);
* a statement of another kind (``COPY``, ``ATTACH``, ``INSTALL``, ``LOAD``,
  ``PRAGMA``, ``SET``: the parser only accepts a ``SELECT`` around it);
* a subquery that reads anything but the store's tables: table functions
  (``read_text``, ``read_blob``, ``read_csv``, ``query``, ``glob``...) and file
  names used as tables (``FROM 'x.csv'``);
* functions that touch files, the environment or session state
  (:data:`FORBIDDEN_FUNCTIONS`), and ``*`` / ``COLUMNS(*)``.

The text is then placed as ``(\\n<text>\\n)``, the very string that was parsed, so
a comment cannot swallow what follows it. Sessions built only to answer queries
are also restricted by DuckDB's own settings (``enable_external_access`` off,
the store's directories allowed: :meth:`actstore.store.session.Session.restrict`).

Example
-------
>>> expression("triggered AND position_role = 'last'", what="where")
"(\\ntriggered AND position_role = 'last'\\n)"
>>> expression("true) TO 'pwned.csv' (FORMAT csv); SELECT (1", what="where")
Traceback (most recent call last):
...
actstore.errors.InputError: where "true) TO 'pwned.csv' (FORMAT csv); SELECT (1" is not one SQL expression (syntax error at or near "TO"); write a single predicate such as "triggered AND position_role = 'last'"
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import duckdb

from actstore.errors import InputError

__all__ = ["FORBIDDEN_FUNCTIONS", "expression", "nodes", "parse_sql", "predicate_or_true"]

#: Scalar functions a predicate may not call: they read files or the environment,
#: or change session state.
FORBIDDEN_FUNCTIONS = frozenset(
    {
        "read_text",
        "read_blob",
        "getenv",
        "getvariable",
        "set_variable",
        "setseed",
        "nextval",
        "currval",
        "query",
        "query_table",
        "sql_auto_complete",
        "current_setting",
        "duckdb_secrets",
        "which_secret",
    }
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXAMPLE = "\"triggered AND position_role = 'last'\""

_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


def parse_sql(sql: str) -> dict[str, Any]:
    """DuckDB's parse of ``sql`` (``json_serialize_sql``): its statements, or its error.

    Example
    -------
    >>> parse_sql("SELECT 1")["statements"][0]["node"]["type"]
    'SELECT_NODE'
    """
    global _parser
    with _parser_lock:
        if _parser is None:
            _parser = duckdb.connect()
        row = _parser.execute("SELECT json_serialize_sql($q)", {"q": sql}).fetchall()[0][0]
    return dict(json.loads(row))


def nodes(tree: Any) -> Iterator[dict[str, Any]]:
    """Every node (dict) of a parsed tree, depth first.

    Example
    -------
    >>> len([n for n in nodes(parse_sql("SELECT a FROM t")) if n.get("type") == "BASE_TABLE"])
    1
    """
    if isinstance(tree, dict):
        yield tree
        for v in tree.values():
            yield from nodes(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from nodes(v)


def _refusal(tree: Any) -> str | None:
    """Why a parsed expression may not be used (None: it may)."""
    for node in nodes(tree):
        kind, cls = node.get("type"), node.get("class")
        if kind == "TABLE_FUNCTION":
            fn = node.get("function", {}).get("function_name", "?")
            return (
                f"it calls the table function {fn}(); a predicate may only read the store's tables"
            )
        if kind == "BASE_TABLE":
            name = str(node.get("table_name", ""))
            if not _IDENT.match(name):
                return f"it reads {name!r} as a table; a predicate may only read the store's tables"
        if cls == "FUNCTION" and str(node.get("function_name", "")).lower() in FORBIDDEN_FUNCTIONS:
            return f"it calls {node['function_name']}(), which a predicate may not use"
    return None


def expression(text: str, *, what: str) -> str:
    """Check that ``text`` is exactly one SQL expression; return it parenthesized.

    The returned string is exactly the one DuckDB's parser checked, ready to be
    placed in a query. Whether it binds (columns exist, the type is boolean) is
    for the caller to check against its relation.

    Parameters
    ----------
    text
        The user's SQL fragment.
    what
        How to name it in an error (``"where"``, ``"trigger_diff: group_a"``).

    Returns
    -------
    str
        ``"(\\n" + text + "\\n)"``.

    Raises
    ------
    InputError
        One line naming the fragment and why it is refused.

    Example
    -------
    >>> expression("reward > 0.5", what="label")
    '(\\nreward > 0.5\\n)'
    >>> expression("1; DROP TABLE runs", what="where")
    Traceback (most recent call last):
    ...
    actstore.errors.InputError: where '1; DROP TABLE runs' is not one SQL expression (syntax error at or near ";"); write a single predicate such as "triggered AND position_role = 'last'"
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what} must be a non-empty SQL expression, not {text!r}")
    if text in _ACCEPTED:  # checked before: the check depends on the text alone
        return f"(\n{text}\n)"
    wrapped = _checked(text, what)
    with _parser_lock:
        if len(_ACCEPTED) >= 4096:
            _ACCEPTED.clear()
        _ACCEPTED.add(text)
    return wrapped


#: Fragments :func:`expression` accepted (a repeated ``where=`` skips DuckDB's parser).
_ACCEPTED: set[str] = set()


def _checked(text: str, what: str) -> str:
    wrapped = f"(\n{text}\n)"
    parsed = parse_sql(f"SELECT {wrapped}")
    if parsed.get("error"):
        msg = str(parsed.get("error_message", "not parsable")).splitlines()[0]
        raise InputError(
            f"{what} {text!r} is not one SQL expression ({msg}); write a single predicate "
            f"such as {_EXAMPLE}"
        )
    statements = parsed.get("statements", [])
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    ok = (
        node.get("type") == "SELECT_NODE"
        and len(node.get("select_list", [])) == 1
        and node.get("from_table", {}).get("type") == "EMPTY"
        and not node.get("modifiers")
        and not node.get("cte_map", {}).get("map")
        and node.get("where_clause") is None
        and not node.get("group_expressions")
        and node.get("having") is None
        and node.get("qualify") is None
        and node.get("sample") is None
    )
    if not ok:
        raise InputError(
            f"{what} {text!r} is not one SQL expression (it continues past the expression); "
            f"write a single predicate such as {_EXAMPLE}"
        )
    top = node["select_list"][0]
    if top.get("class") == "STAR" or top.get("alias"):
        raise InputError(f"{what} {text!r} is not one SQL expression; write e.g. {_EXAMPLE}")
    why = _refusal(top)
    if why:
        raise InputError(f"{what} {text!r} is refused: {why}")
    return wrapped


def predicate_or_true(text: str | None, *, what: str) -> str:
    """:func:`expression` of ``text``, or ``"true"`` when it is None or empty.

    Example
    -------
    >>> predicate_or_true(None, what="where")
    'true'
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return "true"
    return expression(text, what=what)
