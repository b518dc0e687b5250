"""The open shard of each hook of a run being written: streamed to its file, or buffered.

:class:`~actstore.store.writer.RunWriter` hands every batch's rows to its hook's
:class:`HookBuffer`. Uncompressed 16-bit arrays (the default for float16 and
bfloat16) stream them: full inner chunks are written to the open shard's file from
the batch itself, and only the chunk still filling is held (one chunk per hook, not a
shard). Other layouts copy them into one shard buffer per hook, reused, written when
full. Writing allocates nothing that grows with the rows written, with the
allocator's default settings (see :mod:`actstore.store.heap`).

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
    """The open shard of one hook: streamed to its file, or held in a reused buffer.

    When the array's shard files can be written directly (uncompressed 16-bit
    layouts, :func:`~actstore.store.shardio.raw_layout`) each batch's rows go
    straight into the open shard's :class:`~actstore.store.shardio.ShardStream`:
    its full inner chunks are written from the batch itself, and only the chunk
    still filling is copied (one chunk, not a shard, of memory per hook). Other
    layouts (compressed, remote) copy the rows into a ``(shard_rows, D)`` buffer
    allocated once per writer and hook, written through zarr when full. Either
    way no memory grows with the batches or shards written, so neither does the heap (see :mod:`actstore.store.heap`).
    """

    arr: zarr.Array
    name: str
    shard_rows: int
    start: int  # global row of the open shard's first row; always a shard boundary
    disk_rows: int = 0  # rows [0, disk_rows) are durable on disk
    fill: int = 0  # rows of the open shard added
    buf: np.ndarray | None = None  # held rows (unstreamed layouts), on-disk dtype
    stream: _shardio.ShardStream | None = None  # the open shard's file, chunk by chunk

    @property
    def end(self) -> int:
        return self.start + self.fill

    @property
    def held_nbytes(self) -> int:
        """Bytes of memory this hook's open shard holds (its buffer, or its stream's chunk)."""
        if self.buf is not None:
            return int(self.buf.nbytes)
        return 0 if self.stream is None else self.stream.held_nbytes

    @functools.cached_property
    def _layout(self) -> _shardio.RawShardLayout | None:
        """The array's raw shard layout if its shard files can be streamed, else None.

        Only its geometry is used (its ``n_rows`` is the array's size when first asked).
        """
        lay = _shardio.raw_layout(self.arr)
        return lay if lay is not None and lay.shard_rows == self.shard_rows else None

    def add(self, rows: np.ndarray) -> np.ndarray:
        """Add a batch's rows to the open shard, writing each shard it fills.

        Returns the rows as stored (on-disk dtype), for the batch's statistics: the
        rows themselves when they are already so, else their cast copy (or, held in
        a buffer, a view of it while the batch fits in the open shard).

        Example
        -------
        >>> buf.add(acts_ND).shape  # doctest: +SKIP
        (1024, 768)
        """
        dtype = _arrays.logical_dtype(self.arr)
        if self._layout is None:
            return self._add_held(rows, dtype)
        stored = np.ascontiguousarray(_arrays.to_disk(rows, dtype))
        i, n = 0, stored.shape[0]
        while i < n:
            k = min(n - i, self.shard_rows - self.fill)
            if self.stream is None:
                self.stream = _shardio.ShardStream(self._layout, self.start // self.shard_rows)
            self.stream.append(stored[i : i + k])
            self.fill += k
            i += k
            if self.fill == self.shard_rows:
                self._write_full()
        return stored

    def _add_held(self, rows: np.ndarray, dtype: str) -> np.ndarray:
        """:meth:`add` for a layout written through zarr: rows copied into the shard buffer."""
        if self.buf is None:
            self.buf = np.empty((self.shard_rows, self.arr.shape[1]), np.dtype(self.arr.dtype))
            if self.fill:  # released after a flush wrote them: the open shard's rows are on disk
                self.buf[: self.fill] = np.asarray(self.arr[self.start : self.end])
        buf = self.buf
        n = rows.shape[0]
        if self.fill + n <= self.shard_rows:
            dst = buf[self.fill : self.fill + n]
            _cast_into(dst, rows, dtype)
            self.fill += n
            if self.fill < self.shard_rows:
                return dst
            stored = dst.copy()  # stats read the rows after the buffer is reused
            self._write_full()
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
        return stored

    def _finish(self) -> None:
        """Write the open shard's rows as its file: the stream finished, or the buffer whole."""
        _arrays.ensure_capacity(self.arr, self.end)
        if self.stream is not None:
            self.stream.finish()
            self.stream = None
        else:
            assert self.buf is not None
            _arrays.write_rows(self.arr, self.start, self.buf[: self.fill])
        self.disk_rows = self.end

    def _write_full(self) -> None:
        if self.end > self.disk_rows:
            self._finish()
        self._drop_stream()
        self.start += self.shard_rows
        self.fill = 0

    def _drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.discard()
            self.stream = None

    def write(self, partial: bool, final: bool = False) -> None:
        """Write the open shard's rows if ``partial`` (whole shards are written as they fill).

        ``final`` (the writer's close): no more rows come, so the shard's file is
        finished (a stream renamed into place). Otherwise (a commit while the shard
        is still filling) its rows so far are written as the shard's file, and the
        stream goes on beside it, to replace that file once the shard is full.

        Example
        -------
        >>> buf.write(partial=True)  # doctest: +SKIP
        """
        if not partial or self.end <= max(self.start, self.disk_rows):
            if final:
                self._drop_stream()
            return
        if final:
            self._finish()
            return
        if self.stream is not None:
            _arrays.ensure_capacity(self.arr, self.end)
            self.stream.snapshot()
        else:
            assert self.buf is not None
            _arrays.write_rows(self.arr, self.start, self.buf[: self.fill])
        self.disk_rows = self.end

    def release(self) -> None:
        """Drop what the open shard holds once the writer is flushed or aborted.

        A shard file still being streamed is removed (its rows were not committed),
        and a held buffer's memory goes back at once.

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
