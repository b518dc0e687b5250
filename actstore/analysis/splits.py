"""Held-out splits: which rows fit a direction or a regression and which score it.

A split is one of

``"random"``
    a deterministic pseudo-random split by unit: by prompt (``prompt_idx``), or
    by matched pair when a pair column is given, so that the rows of one prompt
    (and both halves of a pair) always land on the same side. Units are ranked
    by a hash of ``(seed, unit)``, and the first ``test_fraction`` of them are
    held out; a unit's side therefore does not depend on which other units a
    query selected, so two runs (or two layers) over the same prompts split
    identically.
``"none"``
    no split: fit and score on every row (scores are in-sample; the result says so).
any other string
    a SQL expression over ``labeled_tokens``, typically a label column: a
    BOOLEAN expression is true on held-out rows; a VARCHAR one takes the values
    ``'train'`` and ``'test'``.

Example
-------
>>> keys = np.arange(10)
>>> test = random_split(keys, test_fraction=0.3, seed=0)
>>> int(test.sum())
3
"""

from __future__ import annotations

import hashlib

import numpy as np

from actstore.analysis.rows import Selection
from actstore.errors import InputError, SpecError

#: Split values meaning "no SQL expression".
BUILTIN_SPLITS = ("random", "none")


def split_expression(split: str | None) -> str | None:
    """The SQL expression to evaluate for ``split`` (``None`` for the built-in splits).

    Example
    -------
    >>> split_expression("random"), split_expression("split")
    (None, 'split')
    """
    if split is None or split in BUILTIN_SPLITS:
        return None
    return split


def _unit_hash(seed: int, key: object) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def random_split(keys: np.ndarray, *, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean held-out mask over rows, assigning whole units (equal keys) to one side.

    Parameters
    ----------
    keys
        One unit key per row (prompt index, pair id...).
    test_fraction
        Share of units held out; at least one unit on each side when there are two or more.
    seed
        Changes the assignment.

    Example
    -------
    >>> random_split(np.array([0, 0, 1, 1, 2, 2]), test_fraction=0.34, seed=1).reshape(3, 2).all(1).sum()
    np.int64(1)
    """
    if not 0.0 < test_fraction < 1.0:
        raise SpecError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction}")
    uniq, inverse = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    if uniq.size < 2:
        raise InputError(
            f"a random split needs at least two units (prompts or pairs); the selection has "
            f"{uniq.size}: select more prompts or pass split='none'"
        )
    order = np.argsort([_unit_hash(seed, k) for k in uniq], kind="stable")
    n_test = min(max(1, round(test_fraction * uniq.size)), uniq.size - 1)
    test_unit = np.zeros(uniq.size, dtype=bool)
    test_unit[order[:n_test]] = True
    return test_unit[inverse.ravel()]


def split_masks(
    sel: Selection,
    split: str | None,
    *,
    unit: str = "prompt_idx",
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train mask, test mask, held_out) over the rows of a selection.

    Parameters
    ----------
    sel
        A selection; for a SQL split it must carry the column ``_split``
        (``select(..., columns={"split": split_expression(split)})``).
    split
        ``"random"``, ``"none"`` or a SQL expression (see the module docstring).
    unit
        The ``meta`` column whose values are kept together by a random split.

    Example
    -------
    >>> train, test, held_out = split_masks(sel, "random", test_fraction=0.25)  # doctest: +SKIP
    """
    if split is None or split == "none":
        every = np.ones(sel.n, dtype=bool)
        return every, every, False
    if split == "random":
        test = random_split(sel.column(unit), test_fraction=test_fraction, seed=seed)
        return ~test, test, True
    col = sel.meta.column("_split")
    if col.null_count:
        raise InputError(
            f"split expression {split!r} is NULL on {col.null_count} selected rows; give every "
            "row a side, or restrict the rows with where="
        )
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype == bool:
        test = values.astype(bool)
    else:
        seen = sorted({str(v) for v in values})
        bad = [v for v in seen if v not in ("train", "test")]
        if bad:
            raise InputError(
                f"split column {split!r} has values {seen}; a VARCHAR split must be 'train' or "
                f"'test'. Pick held-out rows with a predicate instead, e.g. split=\"{split} = 'test'\""
            )
        test = values.astype(str) == "test"
    return ~test, test, True
