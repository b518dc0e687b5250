"""Two groups of rows: a label or two predicates, matched pairs, and a held-out split.

Contrast analyses (:mod:`actstore.analysis.contrast`, direction transfer in
:mod:`actstore.analysis.diff`) compare a positive and a negative group of rows.
The groups are defined by SQL over ``labeled_tokens``: one boolean expression
(``group="triggered"``: true rows positive, false rows negative, NULL rows
dropped) or two exclusive predicates (``positive=``, ``negative=``; rows matching
neither are dropped). An optional pair column matches rows across the groups,
and the split (:mod:`actstore.analysis.splits`) keeps a pair, or else a prompt,
on one side.

Example
-------
>>> lab = labelled_rows(st, run="base", hooks=["blocks.1.hook_resid_post"],
...                     where="position_role = 'last'", group="triggered", pair="pair_id")  # doctest: +SKIP
>>> lab.y.sum(), lab.test.sum()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from actstore.analysis.rows import Params, RunInfo, Selection, require_rows, select
from actstore.analysis.splits import split_expression, split_masks
from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.store.store import Store


@dataclass(frozen=True, slots=True, eq=False)
class Labelled:
    """A selection restricted to rows of either group, with labels, pairs and split masks."""

    sel: Selection
    """The rows."""
    y: np.ndarray
    """Boolean group label per row (True = positive)."""
    pair: np.ndarray | None
    """Pair id per row, if pairs were given."""
    train: np.ndarray
    """Boolean mask of training rows."""
    test: np.ndarray
    """Boolean mask of held-out rows."""
    held_out: bool
    """Whether train and test differ."""
    n_dropped: int
    """Selected rows in neither group."""


def group_columns(
    group: str | None,
    positive: str | None,
    negative: str | None,
    pair: str | None,
    split: str | None,
) -> dict[str, str]:
    """The SQL columns a labelled selection evaluates (see :func:`labelled_rows`).

    Example
    -------
    >>> sorted(group_columns("triggered", None, None, "pair_id", "split"))
    ['pair', 'split', 'y']
    """
    cols: dict[str, str] = {}
    if group is not None:
        if positive is not None or negative is not None:
            raise SpecError("pass either group= or positive= and negative=, not both")
        cols["y"] = group
    elif positive is not None and negative is not None:
        cols["pos"] = f"coalesce(({positive}), false)"
        cols["neg"] = f"coalesce(({negative}), false)"
    else:
        raise SpecError(
            "define the two groups with group= (a boolean label or predicate, e.g. "
            "group='triggered') or with both positive= and negative= predicates"
        )
    if pair is not None:
        cols["pair"] = pair
    expr = split_expression(split)
    if expr is not None:
        cols["split"] = expr
    return cols


def labelled_rows(
    store: Store,
    *,
    run: str | int | RunInfo,
    hooks: Sequence[str] = (),
    where: str | None = None,
    params: Params = None,
    group: str | None = None,
    positive: str | None = None,
    negative: str | None = None,
    pair: str | None = None,
    split: str | None = "random",
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Labelled:
    """Select rows, label them by group, and split them (by pair when pairs are given).

    Example
    -------
    >>> lab = labelled_rows(st, run="r", group="triggered", pair="pair_id")  # doctest: +SKIP
    """
    cols = group_columns(group, positive, negative, pair, split)
    sel = select(store, run=run, where=where, params=params, columns=cols, hooks=hooks)
    if "y" in cols:
        ycol = sel.meta.column("_y")
        if not pa.types.is_boolean(ycol.type):
            vals = sorted({str(v) for v in ycol.to_pylist()[:1000]})[:10]
            raise InputError(
                f"group {group!r} is {ycol.type}, not boolean (values {vals}); pass a predicate, "
                f"e.g. group=\"{group} = '{vals[0] if vals else 'a'}'\", or positive=/negative="
            )
        keep = np.asarray(ycol.is_valid().to_numpy(zero_copy_only=False), bool)
        y_all = np.asarray(ycol.fill_null(False).to_numpy(zero_copy_only=False), bool)
    else:
        pos = np.asarray(sel.column("_pos"), bool)
        neg = np.asarray(sel.column("_neg"), bool)
        both = int((pos & neg).sum())
        if both:
            raise InputError(
                f"{both} rows match both positive={positive!r} and negative={negative!r}; "
                "make the predicates exclusive"
            )
        keep = pos | neg
        y_all = pos
    if pair is not None:
        keep &= np.asarray(sel.meta.column("_pair").is_valid().to_numpy(zero_copy_only=False))
    n_dropped = int((~keep).sum())
    sel = sel.take(keep)
    y = y_all[keep]
    require_rows(sel, "contrast", 2)
    pair_ids = sel.column("_pair") if pair is not None else None
    train, test, held_out = split_masks(
        sel,
        split,
        unit="_pair" if pair is not None else "prompt_idx",
        test_fraction=test_fraction,
        seed=seed,
    )
    return Labelled(sel, y, pair_ids, train, test, held_out, n_dropped)
