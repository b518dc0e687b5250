"""Edit positions: which tokens of a forward pass an edit op changes.

An op names its positions (``all``, ``prompt``, ``completion``, ``last``). What
that means in a given forward pass depends on the pass:

- a *capture* pass (the ingest's forward pass over prompt and completion tokens,
  padded left or right, or :func:`~actstore.edits.evaluate.measure_loss_kl`'s):
  column ``c`` of batch row ``b`` is token ``c - offsets[b]`` of its prompt
  wherever the attention mask is 1;
- *generation*: Hugging Face's ``generate`` first runs the whole left-padded
  prompt batch (the prefill, like a capture pass), then one token at a time with
  the KV cache: decoding step ``k`` (``k = 1, 2, ...``) feeds the ``k``-th
  generated token, at position ``n_prompt + k - 1``. With ``num_samples > 1``
  every prompt's row is repeated in place.

:class:`StepTracker` turns each hook call into a :class:`Step` (the position of
every column, -1 at padding); a selector from :data:`SELECTORS` turns positions
into a mask; :meth:`Step.select` returns the chosen :class:`Sites`. Every
selector is a function of the position and the prompt's length alone, so one
definition serves both kinds of pass.

Shapes: ``B`` batch rows of the hooked tensor, ``S`` its columns, ``N`` selected
sites.

Example
-------
>>> import torch
>>> step = Step.unpadded(batch=1, seq=4)
>>> step.select("last").s_N.tolist(), step.select("prompt").s_N.tolist()
([3], [0, 1, 2, 3])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from actstore.errors import InputError

__all__ = ["SELECTORS", "Sites", "Step", "StepTracker"]

Selector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(position_BS, n_prompt_B1) -> mask_BS``; position is -1 at padding."""

SELECTORS: dict[str, Selector] = {
    "all": lambda pos, n: pos >= 0,
    "prompt": lambda pos, n: (pos >= 0) & (pos < n),
    "completion": lambda pos, n: pos >= n,
    "last": lambda pos, n: pos == n - 1,
}
"""Position name -> selector. ``completion`` is every token after the prompt (the
generated ones); ``last`` is the prompt's last token."""


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

    def select(self, positions: str) -> Sites:
        """The sites that ``positions`` picks in this step.

        Example
        -------
        >>> Step.unpadded(batch=1, seq=3).select("last").position_N.tolist()
        [2]
        """
        try:
            selector = SELECTORS[positions]
        except KeyError:
            raise InputError(
                f"positions {positions!r} is not one of {', '.join(SELECTORS)}"
            ) from None
        mask_BS = selector(self.position_BS, self.n_prompt_B[:, None])
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
        if ctx.phase == "generate" and call > 0:  # a decoding step: one new token per row
            if n_cols != 1:
                raise InputError(
                    f"edit at hook {hook!r}: decoding step {call} has {n_cols} columns; "
                    "only one-token steps after the prompt are supported"
                )
            pos = (n_prompt_B + call - 1)[:, None]
            return Step(pos, n_prompt_B, prompt_idx_B, None, batch)
        if n_cols != pos_BS.shape[1]:
            raise InputError(
                f"edit at hook {hook!r}: the forward pass has {n_cols} columns but the batch "
                f"has {pos_BS.shape[1]}; pass the BatchContext of the inputs being run"
            )
        return Step(pos_BS, n_prompt_B, prompt_idx_B, ids_BS, batch)
