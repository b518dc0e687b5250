"""Positions-restricted encodes: the rows a predicate selects, cut into parts.

:func:`actstore.ingest.encode.encode` with ``positions`` encodes only the stored
rows of a run that a SQL predicate over ``labeled_tokens`` selects: a complete
encode of a subset, recorded in ``feature_selections``
(:mod:`actstore.store.selections`). This module picks the rows
(:func:`selection_for`) and writes their parts (:func:`encode_selected`).

Example
-------
>>> res = encode(st, "saes/l2", positions="position_role = 'last'")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import InputError
from actstore.ingest.saes import LoadedSAE, encode_sparse
from actstore.store import access as _access
from actstore.store import arrays as _arrays
from actstore.store import features as _features
from actstore.store import selections as _selections

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["encode_selected", "selection_for"]


def selection_for(
    store: Store,
    sae: str,
    sae_id: int | None,
    run_id: int,
    run_name: str,
    info: dict[str, Any],
    positions: str | None,
    expr: str | None,
    done: int,
) -> tuple[_selections.Selection, np.ndarray] | None:
    """The rows to encode in a run (None: all), checked against what the SAE already covers.

    ``done`` is the rows the SAE's committed parts of the run cover. One SAE name
    holds one row selection per run: another selection, or all rows after a
    selection (and a selection after all rows), is refused; the same predicate
    selecting new rows beyond ``done`` (the run's ingest was resumed since) continues it.

    Raises
    ------
    InputError
        If ``positions`` selects no stored row, or the SAE has another selection.

    Example
    -------
    >>> selection_for(st, "l1", None, 2, "r", info, "position_role = 'last'", expr, 0)[0].n_rows  # doctest: +SKIP
    12
    """
    new = None
    if positions is not None and expr is not None:
        with store.session.connection() as con:
            rows_S = _selections.select_rows(con, run_id, expr)
        rows_S = rows_S[rows_S < int(info["n_rows"])]
        if rows_S.size == 0:
            raise InputError(
                f"encode: --positions {positions!r} selects no stored row of run {run_name!r}; "
                f"check it against `actstore sql {store.root} "
                '"SELECT * FROM labeled_tokens LIMIT 5"`'
            )
        new = (_selections.Selection.of(positions, rows_S), rows_S)
    old = _selections.read(store, run_id, sae_id) if sae_id is not None else None
    fix = (
        f"encode these rows under another SAE name (--name {sae}_{'all' if new is None else 'sel'})"
    )
    if old is not None and new is not None and old.rows_sha256 != new[0].rows_sha256:
        head = new[1][: old.n_rows]  # the run gained rows since (a resumed ingest)?
        # the same predicate, the recorded rows a prefix, every new row past the covered ones
        grown = positions == old.positions and new[1].size > old.n_rows
        if (
            grown
            and int(new[1][old.n_rows]) >= done
            and (_selections.rows_sha256(head) == old.rows_sha256)
        ):
            return (_selections.Selection.of(old.positions, new[1]), new[1])
    if old is not None and (new is None or old.rows_sha256 != new[0].rows_sha256):
        raise InputError(
            f"encode: run {run_name!r} already has features of SAE {sae!r} for the "
            f"{old.n_rows} rows {old.positions!r}; one SAE name holds one row selection per "
            f"run: {fix}"
        )
    if old is None and new is not None and done > 0:
        raise InputError(
            f"encode: run {run_name!r} already has features of SAE {sae!r} for every stored "
            f"row; query them with positions= instead, or {fix}"
        )
    if old is not None and new is not None:  # the same rows: keep the recorded text
        return (old, new[1])
    return new


def encode_selected(
    store: Store,
    loaded: LoadedSAE,
    sae_id: int,
    run_id: int,
    run_name: str,
    info: dict[str, Any],
    start: int,
    part_rows: int,
    block_rows: int | None,
    before_commit: Callable[[int], None] | None,
    sel: tuple[_selections.Selection, np.ndarray],
    *,
    commit: Callable[[tuple[Any, ...], tuple[int, int, _selections.Selection] | None], None],
) -> tuple[int, int, int]:
    """Encode the selected rows from ``start`` on: part k holds selected rows ``[kP, (k+1)P)``.

    Part k covers the run's rows from its first selected row (0 for the first part)
    to the next part's first selected row (``n_rows`` for the last), so the parts
    tile ``[0, n_rows)`` and a resume continues exactly where the committed parts end.
    ``commit(part, selection)`` lists a written part (recording the selection with
    the first part it writes).

    Returns
    -------
    tuple of int
        Rows encoded, parts written, nonzeros written.

    Example
    -------
    >>> encode_selected(st, sae, 1, 2, "r", info, 0, 64, None, None, sel, commit=c)  # doctest: +SKIP
    (48, 1, 731)
    """
    selection, rows_S = sel
    n = int(info["n_rows"])
    arr = _arrays.open_array(store.location, info["path"], mode="r")
    what = f"{info['path']} (run {run_name!r}, hook {loaded.hook!r})"
    first = int(np.searchsorted(rows_S, start))
    parts = nonzeros = 0
    for j in range(first, rows_S.size, part_rows):
        idx = rows_S[j : j + part_rows]
        a = start if j == first else int(idx[0])
        b = int(rows_S[j + part_rows]) if j + part_rows < rows_S.size else n
        x_ND = np.asarray(_access.read_rows(arr, idx, name=what), dtype=np.float32)
        rows, feats, vals = encode_sparse(loaded, x_ND, block_rows=block_rows)
        rel, n_bytes, crc = _features.write_part(
            store.location,
            run_id=run_id,
            sae_id=sae_id,
            first_row=a,
            rows=idx[rows],
            features=feats,
            values=vals,
        )
        nnz = int(np.count_nonzero(vals))
        if before_commit is not None:
            before_commit(a)
        part = (run_id, sae_id, rel, a, b - a, nnz, n_bytes, crc)
        # the selection is recorded with the first part this call commits (updated when
        # the run gained rows since, re-recorded unchanged on a resume)
        commit(part, (run_id, sae_id, selection) if j == first else None)
        parts += 1
        nonzeros += nnz
    return rows_S.size - first, parts, nonzeros
