"""Logit metrics: behaviour measured from the next-token distribution, without generating.

CAA reports the probability of the answer letter that matches the behaviour;
patching work reports a logit difference between two answers. A metric is a
``[[metrics]]`` table of an ingest job (or of an edit), computed from the
logits of the **same** forward pass as the capture (no extra pass) and stored
per prompt in the ``scores`` table (scorer = the metric's name, ``sample_idx``
0, ``flag`` NULL), so ``actstore eval`` averages it and SQL joins it like any
score::

    [[metrics]]
    name = "p_hate"
    kind = "prob"                  # logprob | prob | logit_diff
    target = " I"                  # a text, or a list of texts (any of them)
    position = "last"              # last | offset:-N: whose logits (the prompt token)

    [[metrics]]
    name = "hate_vs_answer"
    kind = "logit_diff"            # logit(target) - logit(versus)
    target = " I"
    versus_column = "answer"       # per-prompt targets from a label column

Definitions, with ``z`` the logits at the position and ``T`` / ``U`` the target
/ versus token sets:

``logprob``
    ``log sum_{t in T} softmax(z)_t`` (the log-probability that the next token is
    one of the targets);
``prob``
    its exponential;
``logit_diff``
    ``mean_{t in T} z_t - mean_{u in U} z_u``.

A target text stands for its **first token as it continues the prompt**: the
prompt and the text are tokenized together and the first token after the
prompt's own is taken (the text alone where the prompt's tokens are not a
prefix). Label values (``target_column`` / ``versus_column``) get a leading
space unless they start with whitespace, as an answer after ``answer :`` does.

The computation is a few pure functions over logits (:func:`token_logprob`,
:func:`logit_diff`, :func:`metric_values`), usable on any logits, e.g. by
activation patching; :func:`resolve_targets` and :func:`batch_scores` bind
them to prompts and a padded batch.

Shapes: ``B`` prompts, ``S`` columns, ``V`` vocabulary, ``K`` target tokens.

Example
-------
>>> import torch
>>> z_BV = torch.tensor([[2.0, 0.0, 1.0]])
>>> logit_diff(z_BV, torch.tensor([[0]]), torch.tensor([[2]])).tolist()
[1.0]
>>> round(token_logprob(z_BV, torch.tensor([[0, 2]])).exp().item(), 4)
0.91
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from actstore import spec as _spec
from actstore.errors import InputError, SpecError

__all__ = [
    "METRIC_KINDS",
    "MetricSpec",
    "batch_scores",
    "logit_diff",
    "metric_values",
    "resolve_targets",
    "token_logprob",
]

METRIC_KINDS = ("logprob", "prob", "logit_diff")
"""What a metric computes from the logits."""

_PAD = -1


def token_logprob(logits_BV: torch.Tensor, ids_BK: torch.Tensor) -> torch.Tensor:
    """``log sum_k softmax(logits)[ids_k]`` per row; ``ids`` padded with -1 (ignored).

    Example
    -------
    >>> z = torch.zeros(1, 4)
    >>> round(token_logprob(z, torch.tensor([[1, -1]])).exp().item(), 2)
    0.25
    """
    lp_BV = logits_BV.float().log_softmax(-1)
    valid_BK = ids_BK >= 0
    lp_BK = lp_BV.gather(-1, ids_BK.clamp(min=0))
    lp_BK = torch.where(valid_BK, lp_BK, torch.full_like(lp_BK, float("-inf")))
    return lp_BK.logsumexp(-1)


def _mean_logit(logits_BV: torch.Tensor, ids_BK: torch.Tensor) -> torch.Tensor:
    valid_BK = (ids_BK >= 0).float()
    z_BK = logits_BV.float().gather(-1, ids_BK.clamp(min=0))
    return (z_BK * valid_BK).sum(-1) / valid_BK.sum(-1)


def logit_diff(
    logits_BV: torch.Tensor, target_BK: torch.Tensor, versus_BK: torch.Tensor
) -> torch.Tensor:
    """Mean logit of the target tokens minus that of the versus tokens, per row.

    Token ids are ``(B, K)``, padded with -1; one token each is ``(B, 1)``.

    Example
    -------
    >>> logit_diff(torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor([[1]]), torch.tensor([[2, 0]])).tolist()
    [2.5]
    """
    return _mean_logit(logits_BV, target_BK) - _mean_logit(logits_BV, versus_BK)


def metric_values(
    kind: str,
    logits_BV: torch.Tensor,
    target_BK: torch.Tensor,
    versus_BK: torch.Tensor | None = None,
) -> torch.Tensor:
    """The metric ``kind`` of each row of logits (see the module docstring).

    Example
    -------
    >>> metric_values("prob", torch.zeros(2, 4), torch.tensor([[0], [1]])).tolist()
    [0.25, 0.25]
    """
    if kind == "logprob":
        return token_logprob(logits_BV, target_BK)
    if kind == "prob":
        return token_logprob(logits_BV, target_BK).exp()
    if kind == "logit_diff":
        if versus_BK is None:
            raise InputError("metric logit_diff needs the versus tokens")
        return logit_diff(logits_BV, target_BK, versus_BK)
    raise InputError(f"metric kind {kind!r} is not one of {', '.join(METRIC_KINDS)}")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One logit metric: a ``[[metrics]]`` table of a job or an edit.

    Example
    -------
    >>> MetricSpec(name="d", kind="logit_diff", target=" I", versus_column="answer").position
    'last'
    >>> MetricSpec(name="d", kind="logit_diff", target=" I")
    Traceback (most recent call last):
    ...
    actstore.errors.SpecError: [[metrics]] 'd': logit_diff needs `versus` or `versus_column`
    """

    name: str
    """The metric's scorer name in the ``scores`` table."""
    kind: str
    """``logprob``, ``prob`` or ``logit_diff``."""
    target: str | tuple[str, ...] | None = None
    """Target text(s); each stands for its first token after the prompt."""
    target_column: str | None = None
    """A prompt label column holding each prompt's target text, instead of ``target``."""
    versus: str | tuple[str, ...] | None = None
    """``logit_diff``: the other side's text(s)."""
    versus_column: str | None = None
    """``logit_diff``: a label column holding the other side per prompt."""
    position: str = "last"
    """The prompt token whose logits are read: ``last`` or ``offset:-N``."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise SpecError(
                f"[[metrics]]: name {self.name!r} must be letters, digits and '_' (it names "
                "eval columns)"
            )
        where = f"[[metrics]] {self.name!r}"
        if self.kind not in METRIC_KINDS:
            raise SpecError(f"{where}: kind {self.kind!r} is not one of {', '.join(METRIC_KINDS)}")
        for f in ("target", "versus"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
                v = tuple(v)
            if isinstance(v, tuple) and (not v or not all(isinstance(t, str) and t for t in v)):
                raise SpecError(f"{where}: {f} must be a text or a non-empty list of texts")
            if isinstance(v, str) and not v:
                raise SpecError(f"{where}: {f} is empty; give a text")
        if (self.target is None) == (self.target_column is None):
            raise SpecError(f"{where}: give exactly one of `target` or `target_column`")
        has_versus = self.versus is not None or self.versus_column is not None
        if self.kind == "logit_diff":
            if not has_versus:
                raise SpecError(f"{where}: logit_diff needs `versus` or `versus_column`")
            if self.versus is not None and self.versus_column is not None:
                raise SpecError(f"{where}: give one of `versus` or `versus_column`, not both")
        elif has_versus:
            raise SpecError(f"{where}: versus applies to logit_diff only")
        if not (self.position == "last" or re.fullmatch(r"offset:-[1-9]\d*", self.position)):
            raise SpecError(
                f"{where}: position {self.position!r} must be 'last' or 'offset:-N' (a prompt token)"
            )

    @property
    def back(self) -> int:
        """How far from the prompt's end the read token is (1: the last).

        Example
        -------
        >>> MetricSpec(name="p", kind="prob", target="a", position="offset:-2").back
        2
        """
        return 1 if self.position == "last" else -int(self.position.split(":")[1])

    @property
    def columns(self) -> tuple[str, ...]:
        """The label columns the metric reads.

        Example
        -------
        >>> MetricSpec(name="p", kind="prob", target_column="answer").columns
        ('answer',)
        """
        return tuple(c for c in (self.target_column, self.versus_column) if c is not None)

    def to_dict(self) -> dict[str, Any]:
        """The set fields, TOML/JSON-ready.

        Example
        -------
        >>> MetricSpec(name="p", kind="prob", target=" I").to_dict()
        {'name': 'p', 'kind': 'prob', 'target': ' I', 'position': 'last'}
        """
        return _spec.to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricSpec:
        """Build from a ``[[metrics]]`` table; unknown keys are errors.

        Example
        -------
        >>> MetricSpec.from_dict({"name": "p", "kind": "prob", "target": ["a", "b"]}).target
        ('a', 'b')
        """
        return _spec.from_dict(cls, d, where="[[metrics]]")


def _first_token(tokenizer: Any, prompt_text: str, prompt_ids: Sequence[int], text: str) -> int:
    both = tokenizer(prompt_text + text)["input_ids"]
    n = len(prompt_ids)
    if list(both[:n]) == list(prompt_ids) and len(both) > n:
        return int(both[n])
    alone = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not alone:
        raise InputError(f"target {text!r} tokenizes to nothing; give a text with a token")
    return int(alone[0])


def _texts(
    fixed: str | tuple[str, ...] | None, column: str | None, labels: Any, i: int
) -> list[str]:
    if fixed is not None:
        return [fixed] if isinstance(fixed, str) else list(fixed)
    value = labels[column][i]
    if value is None or not str(value).strip():
        return []
    text = str(value)
    return [text if text[:1].isspace() else " " + text]


def resolve_targets(
    specs: Sequence[MetricSpec],
    tokenizer: Any,
    prompts: Sequence[tuple[int, str, Sequence[int]]],
    labels: pa.Table | None = None,
) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Token ids of each metric's targets (and versus) for each prompt.

    Parameters
    ----------
    specs
        The metrics.
    tokenizer
        The model's tokenizer.
    prompts
        ``(prompt_idx, text, token ids)`` of each prompt.
    labels
        The prompt set's table (row ``i`` is ``prompt_idx`` ``i``), for label targets.

    Returns
    -------
    dict
        Metric name -> ``(target ids, versus ids)``, one list per prompt (empty:
        the prompt's label is NULL, the metric is not computed for it).

    Example
    -------
    >>> resolve_targets([MetricSpec(name="p", kind="prob", target=" red")], tok,
    ...                 [(0, "answer :", [2, 5, 6])])  # doctest: +SKIP
    {'p': ([[9]], [[]])}
    """
    for s in specs:
        missing = [c for c in s.columns if labels is None or c not in labels.column_names]
        if missing:
            have = [] if labels is None else labels.column_names[1:]
            raise InputError(
                f"[[metrics]] {s.name!r}: label column {missing[0]!r} is not in the prompt set; "
                f"its labels are {have}"
            )
    cols = {c: labels.column(c).to_pylist() for s in specs for c in s.columns if labels is not None}
    out: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
    for s in specs:
        tgt, vs = [], []
        for i, text, ids in prompts:
            t = _texts(s.target, s.target_column, cols, i)
            v = _texts(s.versus, s.versus_column, cols, i) if s.kind == "logit_diff" else []
            tgt.append([_first_token(tokenizer, text, ids, x) for x in t])
            vs.append([_first_token(tokenizer, text, ids, x) for x in v])
        out[s.name] = (tgt, vs)
    return out


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    k = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), k), _PAD, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device)


def batch_scores(
    specs: Sequence[MetricSpec],
    logits_BSV: torch.Tensor,
    offsets: Sequence[int],
    n_prompt: Sequence[int],
    prompt_idx: Sequence[int],
    targets: Mapping[str, tuple[list[list[int]], list[list[int]]]],
) -> pa.Table:
    """Every metric of every prompt of a padded batch: rows for the ``scores`` table.

    Parameters
    ----------
    specs
        The metrics.
    logits_BSV
        The forward pass's logits.
    offsets, n_prompt, prompt_idx
        Column of each row's first token, its prompt length and ``prompt_idx``.
    targets
        :func:`resolve_targets` of these rows' prompts (in the same order).

    Returns
    -------
    pyarrow.Table
        ``prompt_idx, sample_idx (0), scorer, value, flag (NULL)``; prompts whose
        targets are missing, or whose prompt is shorter than the position, get no row.

    Example
    -------
    >>> specs = [MetricSpec(name="p", kind="prob", target="a")]
    >>> batch_scores(specs, torch.zeros(1, 2, 4), [0], [2], [7], {"p": ([[1]], [[]])}).to_pylist()
    [{'prompt_idx': 7, 'sample_idx': 0, 'scorer': 'p', 'value': 0.25, 'flag': None}]
    """
    from actstore.ingest.scorers import SCORES_SCHEMA

    rows: dict[str, list[Any]] = {"prompt_idx": [], "scorer": [], "value": []}
    device = logits_BSV.device
    for s in specs:
        tgt, vs = targets[s.name]
        keep = [
            b
            for b in range(len(prompt_idx))
            if tgt[b] and (s.kind != "logit_diff" or vs[b]) and n_prompt[b] >= s.back
        ]
        if not keep:
            continue
        cols = torch.as_tensor([offsets[b] + n_prompt[b] - s.back for b in keep], device=device)
        z_BV = logits_BSV[torch.as_tensor(keep, device=device), cols]
        values = metric_values(
            s.kind,
            z_BV,
            _pad([tgt[b] for b in keep], device),
            _pad([vs[b] for b in keep], device) if s.kind == "logit_diff" else None,
        )
        for b, v in zip(keep, values.tolist(), strict=True):
            rows["prompt_idx"].append(int(prompt_idx[b]))
            rows["scorer"].append(s.name)
            rows["value"].append(float(v))
    n = len(rows["prompt_idx"])
    return pa.table(
        {
            "prompt_idx": pa.array(rows["prompt_idx"], pa.int32()),
            "sample_idx": pa.array([0] * n, pa.int32()),
            "scorer": pa.array(rows["scorer"], pa.string()),
            "value": pa.array(rows["value"], pa.float64()),
            "flag": pa.array([None] * n, pa.bool_()),
        },
        schema=SCORES_SCHEMA,
    )
