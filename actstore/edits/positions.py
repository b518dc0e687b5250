"""Edit positions: which tokens of a forward pass, and of each decoding step, an op changes.

An op names its positions with one policy. Every policy is defined on the
position of a token in its own unpadded sequence (prompt tokens ``0 .. n-1``,
then the generated tokens ``n, n+1, ...``), so one definition serves a capture
pass, the prefill of generation and every decoding step:

================  =========================================  ==========================
policy            prompt tokens changed                      generated tokens changed
================  =========================================  ==========================
``all``           every one                                  every one
``prompt``        every one                                  none
``completion``    none                                       every one
``last``          the last one (position ``n - 1``)          none
``after:TEXT``    those after the first match of TEXT        every one (if TEXT matched)
``span:TEXT``     those overlapping any match of TEXT        none
``offset:-N``     the one at ``n - N`` (``offset:-1`` = last)  none
================  =========================================  ==========================

``after:TEXT`` is "every position after the instruction" (Rimsky et al.'s CAA):
with TEXT the end of the question, the answer marker and everything generated
is steered. A prompt in which TEXT does not occur is not changed at all.
TEXT is matched in the prompt's text as its tokenizer decodes it; a token
matches if its characters overlap the match (as ``span:`` does for capture
positions in :mod:`actstore.ingest.positions`). Text policies need the
tokenizer in the batch context (the ingest runner and
:func:`~actstore.edits.preview.preview` pass it).

Generation: Hugging Face's ``generate`` first runs the whole left-padded prompt
batch (the prefill, like a capture pass), then one token at a time with the
KV cache: decoding step ``k`` (``k = 1, 2, ...``) feeds the ``k``-th generated
token, at position ``n + k - 1``. The logits of the prefill's last column pick
the first generated token, so ``last`` changes the first generated token's
distribution but no generated token's activations: a ``last`` steer during
generation acts once, and its effect can fade after one token. With
``num_samples > 1`` every prompt's row is repeated in place.

:class:`StepTracker` turns each hook call into a :class:`Step` (the position of
every column, -1 at padding); :meth:`Step.select` returns the chosen
:class:`Sites`.

Shapes: ``B`` batch rows of the hooked tensor, ``S`` its columns, ``N`` selected
sites, ``P`` prompt tokens.

Example
-------
>>> import torch
>>> step = Step.unpadded(batch=1, seq=4)
>>> step.select("last").s_N.tolist(), step.select("offset:-2").s_N.tolist()
([3], [2])
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from actstore.errors import InputError, SpecError

__all__ = [
    "POLICIES",
    "EditPositions",
    "Sites",
    "Step",
    "StepTracker",
    "parse_edit_positions",
    "text_spans",
]

POLICIES = ("all", "prompt", "completion", "last", "after:TEXT", "span:TEXT", "offset:-N")
"""The position policies an op may name."""

_SIMPLE = ("all", "prompt", "completion", "last")


@dataclass(frozen=True, slots=True)
class EditPositions:
    """A parsed position policy: ``kind`` and its argument (TEXT or -N).

    Example
    -------
    >>> parse_edit_positions("after:?")
    EditPositions(kind='after', arg='?')
    """

    kind: str
    arg: str | int | None = None

    @property
    def text(self) -> str | None:
        """TEXT of ``after:`` / ``span:``, else None."""
        return str(self.arg) if self.kind in ("after", "span") else None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"


@functools.lru_cache(maxsize=256)
def parse_edit_positions(policy: str) -> EditPositions:
    """Parse an op's ``positions``; a SpecError lists the policies otherwise.

    Example
    -------
    >>> parse_edit_positions("offset:-2")
    EditPositions(kind='offset', arg=-2)
    >>> parse_edit_positions("first")
    Traceback (most recent call last):
    ...
    actstore.errors.SpecError: positions 'first' is not one of all, prompt, completion, last, after:TEXT, span:TEXT, offset:-N
    """
    if isinstance(policy, str):
        kind, sep, arg = policy.partition(":")
        if not sep and kind in _SIMPLE:
            return EditPositions(kind)
        if sep and kind in ("after", "span") and arg:
            return EditPositions(kind, arg)
        if sep and kind == "offset" and re.fullmatch(r"-[1-9]\d*", arg):
            return EditPositions(kind, int(arg))
    raise SpecError(f"positions {policy!r} is not one of {', '.join(POLICIES)}")


def text_spans(tokenizer: Any, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of ``ids`` whose characters overlap each match of ``text``.

    The ids are decoded (special tokens kept); token ``j`` covers the characters
    that decoding ``ids[: j + 1]`` adds to decoding ``ids[:j]``.

    Example
    -------
    >>> from actstore.demo.tokenizer import build_word_tokenizer
    >>> tok = build_word_tokenizer(["what", "is", "it", "?", "answer", ":"])
    >>> ids = tok("what is it ? answer :")["input_ids"]
    >>> text_spans(tok, ids, "?"), text_spans(tok, ids, "is it")
    ([(4, 5)], [(2, 4)])
    """
    ends = [
        len(tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=False))
        for j in range(len(ids))
    ]
    full = tokenizer.decode(list(ids), skip_special_tokens=False)
    out = []
    for m in re.finditer(re.escape(text), full):
        a, b = m.start(), m.end()
        toks = [j for j in range(len(ids)) if (ends[j - 1] if j else 0) < b and ends[j] > a]
        if toks:
            out.append((toks[0], toks[-1] + 1))
    return out


@dataclass(frozen=True)
class Sites:
    """The ``(row, column)`` sites an op changes in one hook call, with what they are.

    Example
    -------
    >>> Step.unpadded(batch=2, seq=2).select("all").position_N.tolist()
    [0, 1, 0, 1]
    """

    b_N: torch.Tensor
    """Batch row of each site (int64)."""
    s_N: torch.Tensor
    """Column of each site."""
    position_N: torch.Tensor
    """Position of the token in its unpadded sequence (0-based)."""
    prompt_idx_N: torch.Tensor
    """``prompt_idx`` of the site's prompt in its prompt set."""
    token_id_N: torch.Tensor | None
    """The token at the site, where the pass knows it (not during decoding steps)."""
    in_prompt_N: torch.Tensor
    """Whether the site is a prompt token (else a completion token)."""
    batch_prompts: tuple[int, ...]
    """``prompt_idx`` of every prompt in the batch (for ops that fetch per batch)."""

    def __len__(self) -> int:
        return int(self.b_N.numel())


TextMarks = tuple[torch.Tensor, torch.Tensor]
"""``(span_BP, after_B)``: per row, the prompt tokens overlapping a match, and the
first position after the first match (a huge number where there is none)."""

_NEVER = 2**40


@dataclass(frozen=True)
class Step:
    """Where every column of one hook call sits in its prompt.

    Example
    -------
    >>> step = Step.unpadded(batch=1, seq=3)
    >>> step.position_BS.tolist(), step.n_prompt_B.tolist()
    ([[0, 1, 2]], [3])
    """

    position_BS: torch.Tensor
    """Position of each column's token in its unpadded sequence; -1 at padding."""
    n_prompt_B: torch.Tensor
    """Prompt length of each row."""
    prompt_idx_B: torch.Tensor
    """``prompt_idx`` of each row."""
    token_id_BS: torch.Tensor | None
    """Token ids, where known."""
    batch_prompts: tuple[int, ...]
    """``prompt_idx`` of the batch's prompts (rows not repeated)."""
    marks: Any = None
    """``fn(text) -> TextMarks`` for ``after:`` / ``span:`` (None: no tokenizer known)."""

    @classmethod
    def unpadded(
        cls, batch: int, seq: int, device: torch.device | str = "cpu", offset: int = 0
    ) -> Step:
        """A step of ``batch`` unpadded rows whose ``seq`` columns are all prompt tokens.

        Example
        -------
        >>> Step.unpadded(batch=1, seq=2).select("completion").b_N.numel()
        0
        """
        pos = torch.arange(offset, offset + seq, device=device).expand(batch, seq)
        return cls(
            pos,
            torch.full((batch,), offset + seq, device=device),
            torch.arange(batch, device=device),
            None,
            tuple(range(batch)),
        )

    def mask(self, positions: str) -> torch.Tensor:
        """The ``(B, S)`` boolean mask of the columns ``positions`` picks.

        Example
        -------
        >>> Step.unpadded(batch=1, seq=3).mask("offset:-3").tolist()
        [[True, False, False]]
        """
        pol = parse_edit_positions(positions) if isinstance(positions, str) else positions
        pos, n = self.position_BS, self.n_prompt_B[:, None]
        real = pos >= 0
        if pol.kind == "all":
            return real
        if pol.kind == "prompt":
            return real & (pos < n)
        if pol.kind == "completion":
            return pos >= n
        if pol.kind == "last":
            return pos == n - 1
        if pol.kind == "offset":
            return real & (pos == n + int(pol.arg))  # type: ignore[arg-type]
        if self.marks is None:
            raise InputError(
                f"positions {str(pol)!r} match text, which needs the tokenizer: pass a batch "
                "context with `tokenizer` (the ingest and actstore.edits.preview do)"
            )
        span_BP, after_B = self.marks(str(pol.arg))
        if pol.kind == "after":
            return real & (pos >= after_B[:, None])
        inside = real & (pos < n)
        col = pos.clamp(0, max(span_BP.shape[1] - 1, 0))
        if span_BP.shape[1] == 0:
            return torch.zeros_like(inside)
        return inside & span_BP.gather(1, col)

    def select(self, positions: str) -> Sites:
        """The sites that ``positions`` picks in this step.

        Example
        -------
        >>> Step.unpadded(batch=1, seq=3).select("last").position_N.tolist()
        [2]
        """
        mask_BS = self.mask(positions)
        b_N, s_N = torch.nonzero(mask_BS, as_tuple=True)
        return Sites(
            b_N,
            s_N,
            self.position_BS[b_N, s_N],
            self.prompt_idx_B[b_N],
            None if self.token_id_BS is None else self.token_id_BS[b_N, s_N],
            self.position_BS[b_N, s_N] < self.n_prompt_B[b_N],
            self.batch_prompts,
        )


class StepTracker:
    """Turns the successive calls of each hook within one batch into :class:`Step` objects.

    Parameters
    ----------
    ctx
        The runner's :class:`~actstore.ingest.runner.BatchContext` (phase
        ``generate`` or ``capture``), or None: every call is then a whole
        unpadded forward pass in which every column is a prompt token.

    Example
    -------
    >>> tracker = StepTracker(None)
    >>> tracker.step("blocks.0.hook_resid_post", torch.zeros(1, 4, 8)).n_prompt_B.tolist()
    [4]
    """

    def __init__(self, ctx: Any | None) -> None:
        self.ctx = ctx
        self.calls: dict[str, int] = {}
        self._base: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        self._marks: dict[tuple[str, str, int], TextMarks] = {}

    def _batch(
        self, device: torch.device, reps: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (str(device), reps)
        if key not in self._base:
            ctx: Any = self.ctx
            mask_BS = ctx.attention_mask.to(device).bool()
            n_cols = mask_BS.shape[1]
            offsets_B = torch.as_tensor(list(ctx.offsets), device=device)
            pos_BS = torch.arange(n_cols, device=device)[None, :] - offsets_B[:, None]
            pos_BS = torch.where(mask_BS, pos_BS, torch.full_like(pos_BS, -1))
            ids_BS = torch.where(mask_BS, ctx.input_ids.to(device), -1)
            n_prompt_B = torch.as_tensor(list(ctx.n_prompt), device=device)
            prompt_idx_B = torch.as_tensor(list(ctx.prompt_idx), device=device)
            self._base[key] = tuple(
                t.repeat_interleave(reps, dim=0) for t in (pos_BS, ids_BS, n_prompt_B, prompt_idx_B)
            )
        pos, ids, n, idx = self._base[key]
        return pos, ids, n, idx

    def _text_marks(self, text: str, device: torch.device, reps: int) -> TextMarks:
        key = (text, str(device), reps)
        if key not in self._marks:
            ctx: Any = self.ctx
            rows = []
            for b, (off, n) in enumerate(zip(ctx.offsets, ctx.n_prompt, strict=True)):
                ids = ctx.input_ids[b, off : off + n].tolist()
                rows.append(text_spans(ctx.tokenizer, ids, text))
            width = max(ctx.n_prompt, default=0)
            span_BP = torch.zeros((len(rows), width), dtype=torch.bool)
            after_B = torch.full((len(rows),), _NEVER, dtype=torch.long)
            for b, spans in enumerate(rows):
                for s, e in spans:
                    span_BP[b, s:e] = True
                if spans:
                    after_B[b] = spans[0][1]
            self._marks[key] = (
                span_BP.to(device).repeat_interleave(reps, dim=0),
                after_B.to(device).repeat_interleave(reps, dim=0),
            )
        return self._marks[key]

    def step(self, hook: str, acts_BSD: torch.Tensor) -> Step:
        """The :class:`Step` of this call of ``hook`` (calls are counted per hook).

        Example
        -------
        >>> StepTracker(None).step("h", torch.zeros(2, 3, 4)).position_BS.shape
        torch.Size([2, 3])
        """
        call = self.calls.get(hook, 0)
        self.calls[hook] = call + 1
        n_rows, n_cols = int(acts_BSD.shape[0]), int(acts_BSD.shape[1])
        device = acts_BSD.device
        ctx = self.ctx
        if ctx is None:
            return Step.unpadded(n_rows, n_cols, device)
        n_prompts = len(ctx.prompt_idx)
        if n_prompts == 0 or n_rows % n_prompts:
            raise InputError(
                f"edit at hook {hook!r}: the activations have {n_rows} rows, not a multiple of "
                f"the batch's {n_prompts} prompts"
            )
        reps = n_rows // n_prompts
        pos_BS, ids_BS, n_prompt_B, prompt_idx_B = self._batch(device, reps)
        batch = tuple(int(i) for i in ctx.prompt_idx)
        marks = (
            None
            if getattr(ctx, "tokenizer", None) is None
            else functools.partial(self._text_marks, device=device, reps=reps)
        )
        if ctx.phase == "generate" and call > 0:  # a decoding step: one new token per row
            if n_cols != 1:
                raise InputError(
                    f"edit at hook {hook!r}: decoding step {call} has {n_cols} columns; "
                    "only one-token steps after the prompt are supported"
                )
            pos = (n_prompt_B + call - 1)[:, None]
            return Step(pos, n_prompt_B, prompt_idx_B, None, batch, marks)
        if n_cols != pos_BS.shape[1]:
            raise InputError(
                f"edit at hook {hook!r}: the forward pass has {n_cols} columns but the batch "
                f"has {pos_BS.shape[1]}; pass the BatchContext of the inputs being run"
            )
        return Step(pos_BS, n_prompt_B, prompt_idx_B, ids_BS, batch, marks)
