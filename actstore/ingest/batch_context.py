"""What an edit sees of a batch (:class:`BatchContext`) and what makes a job's runs edited runs
(:class:`EditContext`): the seam between the ingest runner and :mod:`actstore.edits`.

Example
-------
>>> from actstore.ingest.batch_context import BatchContext
>>> BatchContext([0], None, None, None, [3], [0], "capture").phase
'capture'
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch


@dataclass
class BatchContext:
    """What an intervention (an edit) needs to know about the batch being run."""

    prompt_idx: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    n_prompt: list[int]
    offsets: list[int]
    """Column of each prompt's first token in the padded batch."""
    phase: str
    """``generate`` or ``capture``."""
    tokenizer: Any = None
    """The tokenizer, for edit positions that match text (``after:TEXT``, ``span:TEXT``)."""


def _context(
    batch: list[Any], ids: Any, mask: Any, pos: Any, offs: Any, phase: str, tok: Any
) -> BatchContext:
    return BatchContext(
        [tp.prompt_idx for tp in batch],
        ids,
        mask,
        pos,
        [tp.n_prompt for tp in batch],
        offs.tolist(),
        phase,
        tok,
    )


Intervention = Callable[[Any, BatchContext], AbstractContextManager[Any]]


@dataclass
class EditContext:
    """Makes the runs of a job edited runs: suffix, edit id, parent lookup, intervention."""

    name: str
    edit_id: int
    intervention: Intervention
    spec_hash: str
    metrics: tuple[Any, ...] = ()
    """The edit's own logit metrics (:class:`~actstore.ingest.logit_metrics.MetricSpec`)."""
    prompts: Callable[[pa.Table], list[int]] | None = None
    """The prompts the edited run holds (``prompt_idx``), chosen from the prompt table; None: all."""
