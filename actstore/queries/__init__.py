"""Queries over a store: named feature analyses, arrays inside SQL, fast row reads.

Importing this package adds, to every store's SQL session (see
``actstore.store.session.register_extension``):

* the **named queries** as table macros (``trigger_diff``, ``trigger_diff_paired``,
  ``top_activations``, ``feature_reward_corr``, ``checkpoint_diff``,
  ``feature_density``), also run by name with :func:`run_named` and described by
  :func:`list_named` (``actstore.queries.named``);
* **array functions** ``project(run, hook, row, direction)`` and
  ``act_norm(run, hook, row)``, which read only the rows SQL selects
  (``actstore.queries.udfs``);
* **statistics** DuckDB lacks: ``t_pvalue(t, df)`` and the ``auroc(score, label)``
  aggregate (``actstore.queries.stats``).

:func:`read_rows` (``actstore.store.access``) reads activation rows straight from
memory-mapped shard files of uncompressed arrays, checksums verified.

Example
-------
>>> import actstore.queries as q
>>> q.get_named("trigger_diff").params[2].name
'group_a'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actstore.queries import stats, udfs
from actstore.queries.cache import clear_feature_cache, feature_cache
from actstore.queries.macros import explain_error, install_macros, mark_installed
from actstore.queries.named import NamedQuery, QueryParam, get_named, list_named, run_named
from actstore.store.access import read_rows
from actstore.store.session import register_error_hint, register_extension

if TYPE_CHECKING:
    import duckdb

    from actstore.store.store import Store

__all__ = [
    "NamedQuery",
    "QueryParam",
    "clear_feature_cache",
    "feature_cache",
    "get_named",
    "install",
    "list_named",
    "read_rows",
    "run_named",
]


def install(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """Add the statistics, array functions and named-query macros to a session connection.

    Registered with ``register_extension``, so every new session of every store gets
    them once this package is imported.

    Example
    -------
    >>> with st.session.connection() as con:  # doctest: +SKIP
    ...     install(con, st)
    """
    stats.register(con)
    udfs.register(con, store)
    install_macros(con)
    mark_installed(con)


register_extension(install)
register_error_hint(explain_error)
