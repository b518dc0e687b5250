"""Batches of an ingest: padding, token rows, and the background writer thread.

Example
-------
>>> ids, mask, pos, offs = pad_batch(prompts, pad_id=0, side="left", device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actstore.ingest import positions as _pos


def pad_batch(
    batch: list[_pos.TokenizedPrompt], pad_id: int, side: str, device: str
) -> tuple[torch.Tensor, ...]:
    """Pad prompts (and completions) into ``input_ids``, ``attention_mask``, ``position_ids``.

    Position ids count real tokens only, so either side of padding gives the same values
    at real tokens. Also returns each prompt's column offset in the batch.

    Example
    -------
    >>> tps = [_pos.TokenizedPrompt(0, "a", [2, 5, 6], None), _pos.TokenizedPrompt(1, "b", [2, 7], None)]
    >>> ids, mask, pos, offs = pad_batch(tps, 0, "left", "cpu")
    >>> ids.tolist(), pos.tolist(), offs.tolist()
    ([[2, 5, 6], [0, 2, 7]], [[0, 1, 2], [0, 0, 1]], [0, 1])
    """
    lens = [len(tp.all_ids) for tp in batch]
    s = max(lens)
    ids = torch.full((len(batch), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), s), dtype=torch.long)
    pos = torch.zeros((len(batch), s), dtype=torch.long)
    offsets = []
    for b, (tp, n) in enumerate(zip(batch, lens, strict=True)):
        off = s - n if side == "left" else 0
        ids[b, off : off + n] = torch.tensor(tp.all_ids)
        mask[b, off : off + n] = 1
        pos[b, off : off + n] = torch.arange(n)
        offsets.append(off)
    return ids.to(device), mask.to(device), pos.to(device), torch.tensor(offsets)


class BackgroundWriter:
    """Host copies, casts and appends on a thread; the queue bounds memory to two batches.

    Example
    -------
    >>> bg = BackgroundWriter(store.writer(run), "float16")  # doctest: +SKIP
    >>> bg.put({"arrays": ..., "tokens": ..., "first_prompt": 0, "n_prompts": 8}); bg.close()  # doctest: +SKIP
    """

    def __init__(self, writer: Any, store_dtype: str) -> None:
        self.writer = writer
        self.store_dtype = store_dtype
        self.q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="actstore-writer", daemon=True)
        self.thread.start()

    def _to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.to("cpu")
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                item["arrays"] = {h: self._to_numpy(t) for h, t in item["arrays"].items()}
                self.writer.append(**item)
            except BaseException as e:  # surfaced in the main thread
                self.error = e

    def put(self, item: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            self.writer.abort()
            raise self.error
        self.writer.close()

    def abort(self) -> None:
        """Stop after the queued batches are dropped; commit nothing more."""
        self.error = self.error or RuntimeError("aborted")
        with self.q.mutex:
            self.q.queue.clear()
        self.q.put(None)
        self.thread.join()
        self.writer.abort()


def token_table(
    batch: list[_pos.TokenizedPrompt], sels: list[_pos.Selection], tok: Any
) -> pa.Table:
    """The ``tokens`` rows of a batch: every token, its role, and its batch-local row or NULL.

    Example
    -------
    >>> t = token_table(batch, selections, tokenizer)  # doctest: +SKIP
    >>> t.column_names[:3]  # doctest: +SKIP
    ['prompt_idx', 'position', 'token_id']
    """
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "prompt_idx",
            "position",
            "token_id",
            "token_text",
            "position_role",
            "pos_from_end",
            "in_span",
            "is_completion",
            "row",
        )
    }
    row = 0
    for tp, sel in zip(batch, sels, strict=True):
        ids = tp.all_ids
        texts = tok.convert_ids_to_tokens(ids)
        for j, (tid, text) in enumerate(zip(ids, texts, strict=True)):
            cols["prompt_idx"].append(tp.prompt_idx)
            cols["position"].append(j)
            cols["token_id"].append(int(tid))
            cols["token_text"].append(text)
            cols["position_role"].append(sel.roles[j])
            cols["pos_from_end"].append(j - tp.n_prompt)
            cols["in_span"].append(sel.in_span[j])
            cols["is_completion"].append(j >= tp.n_prompt)
            if sel.stored[j]:
                cols["row"].append(row)
                row += 1
            else:
                cols["row"].append(None)
    return pa.table(
        {k: pa.array(v, type=pa.int64() if k == "row" else None) for k, v in cols.items()}
    )
