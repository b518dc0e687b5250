"""The open shard of each hook of a run being written: one preallocated buffer, reused.

:class:`~actstore.store.writer.RunWriter` copies (and casts) every batch's rows straight
into its hook's buffer and writes a shard as soon as it is full, so writing allocates
nothing per batch or per shard; peak memory does not grow with the rows written, with
the allocator's default settings (see :mod:`actstore.store.heap`).

Example
-------
>>> import tempfile, numpy as np
>>> from actstore.store import arrays
>>> a = arrays.create_array(tempfile.mkdtemp(), "a", d=2, dtype="bfloat16", capacity=0)
>>> b = HookBuffer(a, "h", shard_rows=4096, start=0)
>>> b.add(np.ones((3, 2), np.float32)).dtype.name, b.fill
('uint16', 3)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from actstore.store import arrays as _arrays
from actstore.store import shardio as _shardio

if TYPE_CHECKING:
    import zarr

__all__ = ["HookBuffer"]


@dataclass
class HookBuffer:
    """The open shard of one hook: a (shard_rows, D) buffer of on-disk values, reused.

    Rows are copied (and cast) straight into one buffer allocated once per writer and
    hook; a full shard is written from it and the buffer starts over. No per-batch or
    per-shard allocations, so the heap does not grow with the rows written, whatever
    the allocator's thresholds (see :mod:`actstore.store.heap`).
    """

    arr: zarr.Array
    name: str
    shard_rows: int
    start: int  # global row of buf[0]; always a shard boundary
    disk_rows: int = 0  # rows [0, disk_rows) are durable on disk
    fill: int = 0  # rows of the open shard held in buf
    buf: np.ndarray | None = None  # on-disk dtype (uint16 bits for bfloat16)
    wrote: bool = False  # a whole shard was written since the writer last looked
    stream: _shardio.ShardStream | None = None  # the open shard's file, chunk by chunk

    @property
    def end(self) -> int:
        return self.start + self.fill

    def _buffer(self) -> np.ndarray:
        if self.buf is None:
            self.buf = np.empty((self.shard_rows, self.arr.shape[1]), np.dtype(self.arr.dtype))
            if self.fill:  # released after a flush wrote them: the open shard's rows are on disk
                self.buf[: self.fill] = np.asarray(self.arr[self.start : self.end])
        return self.buf

    def add(self, rows: np.ndarray) -> np.ndarray:
        """Copy a batch's rows into the open shard, writing each shard it fills.

        Returns the rows as stored (a view of the buffer when the batch fits in the
        open shard, else the cast copy), for the batch's statistics.

        Example
        -------
        >>> buf.add(acts_ND).shape  # doctest: +SKIP
        (1024, 768)
        """
        dtype = _arrays.logical_dtype(self.arr)
        buf = self._buffer()
        n = rows.shape[0]
        if self.fill + n <= self.shard_rows:
            dst = buf[self.fill : self.fill + n]
            _cast_into(dst, rows, dtype)
            self.fill += n
            stored = dst
            if self.fill == self.shard_rows:  # stats read the buffer before it is reused
                stored = dst.copy()
                self._write_full()
            else:
                self._stream()
            return stored
        stored = np.ascontiguousarray(_arrays.to_disk(rows, dtype))  # spans shards
        i = 0
        while i < n:
            k = min(n - i, self.shard_rows - self.fill)
            buf[self.fill : self.fill + k] = stored[i : i + k]
            self.fill += k
            i += k
            if self.fill == self.shard_rows:
                self._write_full()
        self._stream()
        return stored

    @functools.cached_property
    def _layout(self) -> _shardio.RawShardLayout | None:
        """The array's raw shard layout if its shard files can be streamed, else None.

        Only its geometry is used (its ``n_rows`` is the array's size when first asked).
        """
        lay = _shardio.raw_layout(self.arr)
        return lay if lay is not None and lay.shard_rows == self.shard_rows else None

    def _stream(self) -> None:
        """Write the open shard's inner chunks that are full to its temporary file."""
        if self.end <= self.disk_rows or self._layout is None:
            return
        if self.stream is None:
            self.stream = _shardio.ShardStream(self._layout, self.start // self.shard_rows)
        assert self.buf is not None
        self.stream.write_chunks(self.buf, self.fill)

    def _finish(self) -> None:
        """Write the open shard's first ``fill`` rows as its file: the stream's rest, or whole."""
        assert self.buf is not None
        _arrays.ensure_capacity(self.arr, self.end)
        self._stream()
        if self.stream is not None:
            self.stream.finish(self.buf, self.fill)
            self.stream = None
        else:
            _arrays.write_rows(self.arr, self.start, self.buf[: self.fill])
        self.disk_rows = self.end

    def _write_full(self) -> None:
        if self.end > self.disk_rows:
            self._finish()
            self.wrote = True
        self._drop_stream()
        self.start += self.shard_rows
        self.fill = 0

    def _drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.discard()
            self.stream = None

    def write(self, partial: bool, final: bool = False) -> bool:
        """Write the open shard's rows if ``partial`` (whole shards are written as they fill).

        ``final`` (the writer's close): no more rows come, so the streamed file is
        finished and renamed into place. Otherwise (a commit while the shard is
        still filling) its rows so far are written as the shard's file, and the
        stream goes on beside it, to replace that file once the shard is full.

        Example
        -------
        >>> buf.write(partial=True)  # doctest: +SKIP
        True
        """
        if not partial or self.end <= max(self.start, self.disk_rows):
            if final:
                self._drop_stream()
            return False
        assert self.buf is not None
        if final:
            self._finish()
        else:
            _arrays.write_rows(self.arr, self.start, self.buf[: self.fill])
            self.disk_rows = self.end
        return True

    def release(self) -> None:
        """Drop the buffer once the writer is flushed or aborted: its memory goes back at once.

        A shard file still being streamed is removed (its rows were not committed).

        Example
        -------
        >>> buf.release()  # doctest: +SKIP
        """
        self._drop_stream()
        self.buf = None


def _cast_into(dst: np.ndarray, rows: np.ndarray, dtype: str) -> None:
    """``dst[...] = to_disk(rows, dtype)`` in one pass, without a temporary."""
    if dtype == "bfloat16" and rows.dtype != np.uint16:
        np.copyto(_arrays.from_disk(dst, dtype), rows, casting="unsafe")
    else:
        np.copyto(dst, rows, casting="unsafe")
