"""Matched pairs and how their positions line up.

A patching experiment runs a *target* prompt with activations taken from its
*source* prompt. Pairs come from a prompt label column (``pair_id``): in each
pair value, one prompt matches the source predicate (``triggered``) and one the
target predicate (``NOT triggered``).

The two prompts of a pair need not have the same length (the trigger adds
tokens), so each pair gets an :class:`Alignment`, a list of (target position,
source position) cells, either side ``None`` where a token has no counterpart:

``end`` (default)
    positions are matched by their distance from the end of the prompt; a leading
    special token both prompts share (``<bos>``) is matched to itself. The tokens
    of the longer prompt in between (a trigger at the start) have no counterpart.
``start``
    positions are matched by index from the start; the tail of the longer prompt
    has no counterpart.
``tokens``
    the longest matching blocks of equal token ids (Python's ``difflib``), so a
    trigger inserted anywhere is left without a counterpart and everything else
    meets its own token.

Example
-------
>>> align([2, 10, 11, 6], [2, 4, 10, 11, 6], "end", special={2}).cells
[(0, 0), (None, 1), (1, 2), (2, 3), (3, 4)]
>>> align([2, 10, 11, 6], [2, 4, 10, 11, 6], "start").cells
[(0, 0), (1, 1), (2, 2), (3, 3), (None, 4)]
>>> align([2, 10, 11, 6], [2, 10, 4, 11, 6], "tokens").cells
[(0, 0), (1, 1), (None, 2), (2, 3), (3, 4)]
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb

from actstore.errors import InputError
from actstore.store.predicate import expression

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["ALIGNMENTS", "Alignment", "Pair", "align", "check_predicate", "find_pairs"]

ALIGNMENTS = ("end", "start", "tokens")
"""The ways positions of a pair's two prompts are matched (see the module docstring)."""


@dataclass(frozen=True)
class Alignment:
    """Cells ``(target_position, source_position)``; ``None`` marks a token with no counterpart.

    Example
    -------
    >>> a = align([2, 5], [2, 4, 5], "end", special={2})
    >>> a.matched, a.source_only
    ([(0, 0), (1, 2)], [1])
    """

    cells: list[tuple[int | None, int | None]]

    @property
    def matched(self) -> list[tuple[int, int]]:
        """The cells with both a target and a source position."""
        return [(t, s) for t, s in self.cells if t is not None and s is not None]

    @property
    def source_only(self) -> list[int]:
        """Source positions with no target counterpart (the trigger, patching it away)."""
        return [s for t, s in self.cells if t is None and s is not None]

    @property
    def target_only(self) -> list[int]:
        """Target positions with no source counterpart (nothing to patch in)."""
        return [t for t, s in self.cells if s is None and t is not None]

    def source_for(self, target_position: int) -> int | None:
        """The source position matched to ``target_position`` (None: no counterpart).

        Example
        -------
        >>> align([2, 5], [2, 4, 5], "end", special={2}).source_for(1)
        2
        """
        for t, s in self.cells:
            if t == target_position:
                return s
        return None


def align(
    target: Sequence[int],
    source: Sequence[int],
    how: str = "end",
    *,
    special: Collection[int] = (),
) -> Alignment:
    """Match the positions of a target and a source prompt (token id lists).

    Parameters
    ----------
    target, source
        The two prompts' token ids.
    how
        ``end``, ``start`` or ``tokens`` (see the module docstring).
    special
        Special token ids (``<bos>``): under ``end`` a shared leading one is matched
        to itself.

    Example
    -------
    >>> align([1, 2], [1, 2], "end").cells
    [(0, 0), (1, 1)]
    """
    nt, ns = len(target), len(source)
    cells: list[tuple[int | None, int | None]]
    if how == "start":
        n = min(nt, ns)
        cells = [(i, i) for i in range(n)]
        cells += [(i, None) for i in range(n, nt)] + [(None, i) for i in range(n, ns)]
    elif how == "end":
        lead = int(nt > 0 and ns > 0 and target[0] == source[0] and target[0] in special)
        n = min(nt, ns) - lead
        cells = [(0, 0)] if lead else []
        cells += [(i, None) for i in range(lead, nt - n)]
        cells += [(None, i) for i in range(lead, ns - n)]
        cells += [(nt - n + k, ns - n + k) for k in range(n)]
    elif how == "tokens":
        cells = []
        t = s = 0
        sm = difflib.SequenceMatcher(None, list(target), list(source), autojunk=False)
        for block in sm.get_matching_blocks():
            cells += [(i, None) for i in range(t, block.a)]
            cells += [(None, j) for j in range(s, block.b)]
            cells += [(block.a + k, block.b + k) for k in range(block.size)]
            t, s = block.a + block.size, block.b + block.size
    else:
        raise InputError(f"alignment {how!r} is not one of {', '.join(ALIGNMENTS)}")
    return Alignment(cells)


@dataclass(frozen=True)
class Pair:
    """One matched pair: its value in the pair column and its two prompts.

    Example
    -------
    >>> Pair("0", target_prompt=0, source_prompt=1, labels={"answer": "red"}).source_prompt
    1
    """

    key: str
    """The pair column's value (as text)."""
    target_prompt: int
    source_prompt: int
    labels: dict[str, Any]
    """The target prompt's label columns (the metric reads them)."""


def check_predicate(st: Store, relation: str, param: str, text: str) -> str:
    """Check that ``text`` is one boolean SQL expression over ``relation``; return it.

    Raises
    ------
    InputError
        If it does not parse, does not bind, or is not boolean (the message lists columns).

    Example
    -------
    >>> check_predicate(st, "prompts", "--from", "triggered")  # doctest: +SKIP
    'triggered'
    """
    expr = expression(text, what=param)  # one expression: no statement smuggled through it
    with st.session.connection() as con:
        cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
        try:
            rows = con.execute(f"DESCRIBE SELECT {expr} AS x FROM {relation}").fetchall()
        except duckdb.Error as e:
            raise InputError(
                f"{param} {text!r} is not a SQL expression over {relation} "
                f"({str(e).splitlines()[0]}); columns: {cols}"
            ) from None
    if str(rows[0][1]) != "BOOLEAN":
        raise InputError(
            f"{param} {text!r} is {rows[0][1]}, not a boolean predicate over {relation}; "
            f"compare it, e.g. `{cols[-1]} = 1`"
        )
    return expr


def find_pairs(
    st: Store,
    prompt_set_id: int,
    *,
    pairs: str,
    source: str,
    target: str,
    where: str | None = None,
    same_prompt: bool = False,
) -> list[Pair]:
    """The matched pairs of a prompt set: one ``source`` and one ``target`` prompt per pair value.

    Parameters
    ----------
    pairs
        The label column holding the pair id.
    source, target
        Boolean SQL predicates over ``prompts`` (``triggered``, ``NOT triggered``).
    where
        Optional predicate choosing which prompts take part (``split = 'test'``).
    same_prompt
        Allow a prompt matching both predicates to pair with itself (patching
        between runs of two checkpoints over the same prompts).

    Raises
    ------
    InputError
        If the column is missing, a predicate is bad, a prompt matches both, or a
        pair lacks one side or has two of it.

    Example
    -------
    >>> find_pairs(st, 1, pairs="pair_id", source="triggered", target="NOT triggered")[0]  # doctest: +SKIP
    Pair(key='0', target_prompt=0, source_prompt=1, labels={...})
    """
    cols = [r[0] for r in st.sql("SELECT column_name FROM (DESCRIBE prompts)").fetchall()]
    if pairs not in cols:
        labels = [c for c in cols if c not in ("prompt_set_id", "prompt_idx")]
        raise InputError(f"--pairs {pairs!r} is not a prompt label column; columns: {labels}")
    for param, text in (("--from", source), ("--to", target), ("--where", where)):
        if text is not None:
            check_predicate(st, "prompts", param, text)
    q = '"' + pairs.replace('"', '""') + '"'
    rows = (
        st.sql(
            f"""SELECT prompt_idx, CAST({q} AS VARCHAR) AS _pair, coalesce(({source}), false) AS _src,
                   coalesce(({target}), false) AS _tgt, *
            FROM prompts WHERE prompt_set_id = ? AND ({where or "true"}) AND {q} IS NOT NULL
            ORDER BY prompt_idx""",
            [prompt_set_id],
        )
        .arrow()
        .to_pylist()
    )
    by_pair: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["_src"] and r["_tgt"] and not same_prompt:
            raise InputError(
                f"prompt {r['prompt_idx']} matches both --from {source!r} and --to {target!r}; "
                "give predicates that tell a pair's two prompts apart (a prompt pairs with "
                "itself only when patching from another run)"
            )
        for side in ("src", "tgt"):
            if r[f"_{side}"]:
                by_pair.setdefault(r["_pair"], {"src": [], "tgt": []})[side].append(r)
    out = []
    for key, sides in by_pair.items():
        for side, pred in (("src", source), ("tgt", target)):
            if len(sides[side]) != 1:
                idx = [r["prompt_idx"] for r in sides[side]]
                raise InputError(
                    f"pair {pairs}={key} has {len(idx)} prompts matching {pred!r} "
                    f"(prompts {idx}); each pair needs exactly one: narrow it with --where"
                )
        t, s = sides["tgt"][0], sides["src"][0]
        drop = {"_pair", "_src", "_tgt", "prompt_set_id", "prompt_idx", "text"}
        out.append(
            Pair(
                key,
                int(t["prompt_idx"]),
                int(s["prompt_idx"]),
                {k: v for k, v in t.items() if k not in drop},
            )
        )
    if not out:
        raise InputError(
            f"no pairs: no prompt with a {pairs!r} value matches --from {source!r} or --to "
            f"{target!r}" + (f" among --where {where!r}" if where else "")
        )
    return out
