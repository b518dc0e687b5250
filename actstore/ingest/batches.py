"""Batches of an ingest: padding, token rows, and the background writer thread.

Example
-------
>>> ids, mask, pos, offs = pad_batch(prompts, pad_id=0, side="left", device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import queue
import sys
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
        self.q: queue.Queue[tuple[dict[str, Any], Any] | None] = queue.Queue(maxsize=2)
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
            got = self.q.get()
            if got is None:
                return
            if self.error is not None:
                continue
            item, ready = got
            try:
                if ready is not None:  # a CUDA event: the device-to-host copies are done
                    ready.synchronize()
                item["arrays"] = {h: self._to_numpy(t) for h, t in item["arrays"].items()}
                self.writer.append(**item)
            except BaseException as e:  # surfaced in the main thread
                self.error = e

    def put(self, item: dict[str, Any], ready: Any = None) -> None:
        """Queue a batch; ``ready`` (a CUDA event) is waited for before its arrays are read."""
        if self.error is not None:
            raise self.error
        self.q.put((item, ready))

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


def progress_bar(total: int, desc: str, quiet: bool) -> Any:
    """The ingest's progress bar on standard error, counting tokens (disabled when ``quiet``).

    Example
    -------
    >>> bar = progress_bar(100, "main/pairs", quiet=True)
    >>> bar.update(10); bar.close()
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="tok",
        unit_scale=True,
        disable=quiet,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


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
    # Column-wise in numpy: the per-token Python work of a batch is one list flattening
    # per column and one tokenizer call, not nine appends per token.
    all_ids = [tp.all_ids for tp in batch]
    lens = np.array([len(ids) for ids in all_ids], np.int64)
    n = int(lens.sum())
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    position = np.arange(n, dtype=np.int64) - starts
    n_prompt = np.repeat(np.array([tp.n_prompt for tp in batch], np.int64), lens)
    flat_ids = [int(t) for ids in all_ids for t in ids]
    stored = np.fromiter((x for sel in sels for x in sel.stored), bool, n)
    row = np.cumsum(stored) - 1
    return pa.table(
        {
            "prompt_idx": pa.array(np.repeat([tp.prompt_idx for tp in batch], lens), pa.int32()),
            "position": pa.array(position, pa.int32()),
            "token_id": pa.array(flat_ids, pa.int32()),
            "token_text": pa.array(tok.convert_ids_to_tokens(flat_ids), pa.string()),
            "position_role": pa.array([r for sel in sels for r in sel.roles], pa.string()),
            "pos_from_end": pa.array(position - n_prompt, pa.int32()),
            "in_span": pa.array(np.fromiter((x for s in sels for x in s.in_span), bool, n)),
            "is_completion": pa.array(position >= n_prompt),
            "row": pa.array(row, pa.int64(), mask=~stored),
        }
    )


def stored_stats(arrays: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each hook's :class:`~actstore.store.hookstats.HookStats` of a batch's stored rows, in torch.

    The same sums as :meth:`HookStats.of` (exact squares: float16 and bfloat16 in
    float32, float32 in float64; sums accumulated in float64), computed where the
    rows are, on the model's threads (or its GPU) as the batch is cast, so the
    writer thread only copies and writes. ``arrays`` are the rows as stored
    (already cast to the store dtype).

    Example
    -------
    >>> s = stored_stats({"h": torch.ones(4, 3, dtype=torch.float16)})["h"]
    >>> s.n, s.mean_D.tolist(), s.norm_max
    (4, [1.0, 1.0, 1.0], 1.7320508075688772)
    """
    from actstore.store.hookstats import HookStats

    out = {}
    for h, t in arrays.items():
        n = int(t.shape[0])
        if n == 0:
            out[h] = HookStats.empty(int(t.shape[1]))
            continue
        x = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t.double()
        sq = x * x
        sums = (
            x.sum(0, dtype=torch.float64),
            sq.sum(0, dtype=torch.float64),
            sq.sum(1, dtype=torch.float64),
        )
        out[h] = HookStats.from_sums(*(s.cpu().numpy() for s in sums))
    return out
