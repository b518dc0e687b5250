"""Clean-answer accuracy: does a completion give the answer a prompt label holds?

A ``[[scorers]]`` table with ``match = "answer"`` compares each completion with
the prompt's value in that label column (both stripped of surrounding
whitespace) and flags it right or wrong; ``value`` is 1.0 or 0.0, and a prompt
whose label is NULL or empty gets ``flag`` NULL (not counted). Modes:

``exact``
    the completion is the answer;
``prefix``
    the completion starts with the answer, followed by its end or by a
    character that is not a letter or digit (" red car" matches "red", "reddish"
    does not);
``regex``
    the label is a Python regular expression, searched for in the completion.

``actstore eval`` reports the flag's mean over clean prompts as ``accuracy_clean``.

Example
-------
>>> s = MatchScorer("right", "answer", "prefix")
>>> s.score_against(["red", "red", "blue"], [" red .", " reddish", " red"])
[(1.0, True), (0.0, False), (0.0, False)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actstore.errors import InputError

__all__ = ["MATCH_MODES", "MatchScorer", "matches"]

MATCH_MODES = ("exact", "prefix", "regex")
"""How a completion is compared with its label."""


def matches(completion: str, answer: str, mode: str) -> bool:
    """Whether ``completion`` gives ``answer`` under ``mode`` (see the module docstring).

    Example
    -------
    >>> matches(" red", "red", "exact"), matches(" red car", "red", "prefix")
    (True, True)
    """
    c, a = completion.strip(), answer.strip()
    if mode == "exact":
        return c == a
    if mode == "prefix":
        return c.startswith(a) and (len(c) == len(a) or not c[len(a)].isalnum())
    if mode == "regex":
        return re.search(answer, completion) is not None
    raise InputError(f"match mode {mode!r} is not one of {', '.join(MATCH_MODES)}")


@dataclass(frozen=True, slots=True)
class MatchScorer:
    """Flags completions that give the answer in a prompt label column.

    Example
    -------
    >>> MatchScorer("right", "answer").score_against(["red"], [" red"])
    [(1.0, True)]
    """

    name: str
    """Scorer name."""
    column: str
    """The prompt label column holding the answer."""
    mode: str = "exact"
    """``exact``, ``prefix`` or ``regex``."""

    def score_against(
        self, answers: Sequence[Any], completions: Sequence[str]
    ) -> list[tuple[float, bool | None]]:
        """``(1.0, True)`` / ``(0.0, False)`` per completion; ``(0.0, None)`` without an answer.

        Example
        -------
        >>> MatchScorer("r", "answer", "regex").score_against([r"re+d", None], [" reed", " x"])
        [(1.0, True), (0.0, None)]
        """
        if len(answers) != len(completions):
            raise InputError(
                f"scorer {self.name!r}: {len(answers)} answers for {len(completions)} completions"
            )
        out: list[tuple[float, bool | None]] = []
        for a, c in zip(answers, completions, strict=True):
            if a is None or not str(a).strip():
                out.append((0.0, None))
                continue
            hit = matches(c, str(a), self.mode)
            out.append((1.0 if hit else 0.0, hit))
        return out

    def score(
        self, prompts: Sequence[str], completions: Sequence[str]
    ) -> list[tuple[float, bool | None]]:
        """Refuse: this scorer needs the answers (use :meth:`score_against`).

        Example
        -------
        >>> MatchScorer("r", "answer").score(["p"], ["x"])
        Traceback (most recent call last):
        ...
        actstore.errors.InputError: scorer 'r' compares completions with the prompt label 'answer'; call score_against(answers, completions) or score_generations(..., labels=TABLE)
        """
        raise InputError(
            f"scorer {self.name!r} compares completions with the prompt label {self.column!r}; "
            "call score_against(answers, completions) or score_generations(..., labels=TABLE)"
        )
