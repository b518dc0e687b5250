"""Direct writes of whole shard files of raw (uncompressed) sharded arrays.

Zarr's sharding codec encodes a shard through its async codec pipeline, once per
inner chunk, with several copies on the way; that runs at 0.3-1.5 GB/s where a raw
file write of the same bytes runs at 2-5 GB/s. For the layout a store uses for
16-bit data (inner codecs ``bytes`` little endian + ``crc32c``, index at the end),
a shard file is simple enough to write directly, byte for byte what zarr writes:

* the inner chunks present, in C order (zarr's Morton order, which is C order for
  a ``(k, 1)`` grid of whole-row chunks), packed back to back, each its raw
  row-major little-endian bytes followed by its crc32c (4 bytes, little endian);
* then the index: one ``(offset, nbytes)`` pair of little-endian uint64 per inner
  chunk in C order, ``(2**64 - 1, 2**64 - 1)`` for a chunk absent from the file,
  followed by the index's own crc32c.

In the last shard of an array whose row count is not a multiple of the shard rows,
zarr writes only the inner chunks that overlap the array: those entirely past the
end are absent, and the one the end cuts is padded to the full chunk with the fill
value (the rows past the end have never been written, as arrays only grow, so
the fill value is what zarr keeps there too).

Only whole shards are written here (or the last shard up to the array's end);
:func:`actstore.store.arrays.write_rows` sends every other write through zarr.
A file is written under a temporary name and renamed into place, as zarr's
``LocalStore`` does (and, like it, without ``fsync``), so a reader sees the old
shard or the new one, never a mix. The checksums use ``google_crc32c``, the
implementation zarr's ``Crc32cCodec`` uses.

The layout rules here and in :mod:`actstore.store.access` (the memory-mapped
reader of the same files) are the same; ``tests/store/test_shardio.py`` checks
that they agree and that the files are identical to zarr's.

Example
-------
>>> import tempfile, numpy as np
>>> from actstore.store import arrays
>>> lay16 = arrays.Layout(chunk_rows=2, shard_rows=4, compression="none")
>>> a = arrays.create_array(tempfile.mkdtemp(), "a", d=3, dtype="float16", capacity=6, layout=lay16)
>>> lay = raw_layout(a)
>>> write_shards(lay, 0, np.ones((6, 3), np.float16))
>>> a[:].sum()
np.float16(18.0)
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np

from actstore.errors import InputError

if TYPE_CHECKING:  # zarr is imported when an array is opened (actstore.store.arrays)
    import zarr

__all__ = [
    "MISSING",
    "TEMPORARY_GLOB",
    "RawShardLayout",
    "ShardStream",
    "layout_from_metadata",
    "parse_layout",
    "raw_layout",
    "shard_bytes",
    "temporary_path",
    "whole_shards",
    "write_shards",
]

#: Offset and length of an inner chunk absent from its shard.
MISSING = 2**64 - 1
_IOV_MAX = 512  # buffers per writev call (POSIX guarantees at least 16, Linux allows 1024)


@dataclass(frozen=True, slots=True)
class RawShardLayout:
    """Where the bytes of a raw sharded 2-D array go in its shard files."""

    directory: Path
    """The array's directory (holding ``zarr.json`` and ``c/``)."""
    n_rows: int
    """Rows in the array's shape now (the last shard ends here)."""
    d: int
    """Columns."""
    dtype: np.dtype[Any]
    """On-disk dtype, little endian."""
    chunk_rows: int
    """Rows per inner chunk."""
    shard_rows: int
    """Rows per shard file: a multiple of ``chunk_rows``."""
    fill_value: Any
    """Value of the rows of an edge chunk past the array's end."""

    @property
    def chunks_per_shard(self) -> int:
        """Inner chunks per shard file.

        Example
        -------
        >>> RawShardLayout(Path("a"), 64, 4, np.dtype("<f2"), 8, 32, 0).chunks_per_shard
        4
        """
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one inner chunk, without its checksum.

        Example
        -------
        >>> RawShardLayout(Path("a"), 64, 4, np.dtype("<f2"), 8, 32, 0).chunk_nbytes
        64
        """
        return self.chunk_rows * self.d * self.dtype.itemsize

    def shard_path(self, shard: int) -> Path:
        """The file of shard ``shard`` (``c/{shard}/0``).

        Example
        -------
        >>> RawShardLayout(Path("a"), 64, 4, np.dtype("<f2"), 8, 32, 0).shard_path(1).as_posix()
        'a/c/1/0'
        """
        return self.directory / "c" / str(shard) / "0"

    def shard_nrows(self, shard: int) -> int:
        """Rows of shard ``shard`` inside the array (``shard_rows`` except for the last one).

        Example
        -------
        >>> lay = RawShardLayout(Path("a"), 70, 4, np.dtype("<f2"), 8, 32, 0)
        >>> lay.shard_nrows(0), lay.shard_nrows(2)
        (32, 6)
        """
        return max(0, min(self.shard_rows, self.n_rows - shard * self.shard_rows))


def _is_codec(spec: Any, name: str) -> bool:
    return isinstance(spec, dict) and spec.get("name") == name


def _is_little_bytes(spec: Any, itemsize: int) -> bool:
    if not _is_codec(spec, "bytes"):
        return False
    endian = (spec.get("configuration") or {}).get("endian")
    return endian == "little" or (endian is None and itemsize == 1)


def raw_layout(arr: zarr.Array) -> RawShardLayout | None:
    """The layout of ``arr`` if its shard files can be written directly, else None.

    That is (the rules of :func:`actstore.store.access.shard_layout`): a 2-D Zarr
    v3 array on a local disk with the default ``/`` chunk keys, whole-row inner
    chunks and shards, codecs ``bytes`` (little endian) + ``crc32c`` inside the
    shard and the shard index (``bytes`` + ``crc32c``) at the end of the file.
    Writing also needs the array open for writing with ``write_empty_chunks``
    (zarr would otherwise leave out chunks that hold only the fill value).

    Example
    -------
    >>> import tempfile
    >>> from actstore.store import arrays
    >>> a16 = arrays.create_array(tempfile.mkdtemp(), "a", d=8, dtype="float16", capacity=0)
    >>> a32 = arrays.create_array(tempfile.mkdtemp(), "a", d=8, dtype="float32", capacity=0)
    >>> raw_layout(a16).chunk_rows, raw_layout(a32)  # float32 is zstd-compressed
    (65536, None)
    """
    if arr.read_only or not arr.config.write_empty_chunks:
        return None
    return parse_layout(arr)


def parse_layout(arr: zarr.Array) -> RawShardLayout | None:
    """The raw shard layout of ``arr`` (for reading or writing), or None if it has another.

    The format rules that both the memory-mapped reader (:mod:`actstore.store.access`)
    and the direct writer rely on; see :func:`raw_layout`.

    Example
    -------
    >>> import tempfile
    >>> from actstore.store import arrays
    >>> a = arrays.create_array(tempfile.mkdtemp(), "a", d=8, dtype="bfloat16", capacity=0)
    >>> parse_layout(a).dtype.name  # bfloat16 bits, little endian
    'uint16'
    """
    from zarr.storage import LocalStore

    meta = arr.metadata
    if getattr(meta, "zarr_format", None) != 3 or not isinstance(arr.store, LocalStore):
        return None
    directory = Path(arr.store.root) / arr.path
    md: dict[str, Any] = dict(meta.to_dict())
    return layout_from_metadata(
        md, directory, np.dtype(arr.dtype), list(arr.shape), meta.fill_value
    )


def layout_from_metadata(
    md: dict[str, Any], directory: Path, dtype: np.dtype[Any], shape: list[int], fill_value: Any
) -> RawShardLayout | None:
    """The raw shard layout a Zarr v3 array metadata document describes, or None.

    ``md`` is the document (``zarr.json``, or zarr's parsed metadata as a dict);
    ``dtype``, ``shape`` and ``fill_value`` are its data type, shape and fill value,
    parsed. The rules of :func:`parse_layout`, shared with the zarr-free opener
    :func:`actstore.store.mapped.open_mapped`.

    Example
    -------
    >>> import json, tempfile
    >>> from actstore.store import arrays
    >>> r = tempfile.mkdtemp(); _ = arrays.create_array(r, "a", d=8, dtype="float16", capacity=0)
    >>> md = json.loads((Path(r) / "a" / "zarr.json").read_text())
    >>> layout_from_metadata(md, Path(r) / "a", np.dtype("float16"), [0, 8], 0.0).shard_rows
    2097152
    """
    if len(shape) != 2 or md.get("storage_transformers"):
        return None
    enc: dict[str, Any] = md.get("chunk_key_encoding") or {}
    if enc.get("name") != "default" or (enc.get("configuration") or {}).get("separator") != "/":
        return None
    codecs = list(md.get("codecs") or [])
    if len(codecs) != 1 or not _is_codec(codecs[0], "sharding_indexed"):
        return None
    conf: dict[str, Any] = codecs[0].get("configuration") or {}
    dtype = dtype.newbyteorder("<")
    inner = list(conf.get("codecs") or [])
    index = list(conf.get("index_codecs") or [])
    if not (
        len(inner) == 2
        and _is_little_bytes(inner[0], dtype.itemsize)
        and _is_codec(inner[1], "crc32c")
        and len(index) == 2
        and _is_little_bytes(index[0], 8)
        and _is_codec(index[1], "crc32c")
        and conf.get("index_location", "end") == "end"
    ):
        return None
    n, d = (int(x) for x in shape)
    chunk = [int(x) for x in conf.get("chunk_shape") or ()]
    grid: dict[str, Any] = md.get("chunk_grid") or {}
    shard = [int(x) for x in (grid.get("configuration") or {}).get("chunk_shape") or ()]
    if grid.get("name") != "regular" or len(chunk) != 2 or len(shard) != 2:
        return None
    if chunk[1] != d or shard[1] != d or chunk[0] <= 0 or shard[0] % chunk[0]:
        return None
    return RawShardLayout(
        directory=directory,
        n_rows=n,
        d=d,
        dtype=dtype,
        chunk_rows=chunk[0],
        shard_rows=shard[0],
        fill_value=fill_value,
    )


def whole_shards(lay: RawShardLayout, start: int, stop: int) -> tuple[int, int]:
    """The rows ``[a, b)`` of ``[start, stop)`` that make up whole shards.

    A shard counts as whole when the rows cover it entirely, or from its first row
    to the array's end (the last shard). ``a == b`` when there are none.

    Example
    -------
    >>> lay = RawShardLayout(Path("a"), 70, 4, np.dtype("<f2"), 8, 32, 0)
    >>> whole_shards(lay, 0, 64), whole_shards(lay, 10, 70), whole_shards(lay, 0, 40)
    ((0, 64), (32, 70), (0, 32))
    """
    a = -(-start // lay.shard_rows) * lay.shard_rows
    b = stop if stop == lay.n_rows else (stop // lay.shard_rows) * lay.shard_rows
    return (a, b) if a < b else (a, a)


def _pieces(lay: RawShardLayout, shard: int, rows_ND: np.ndarray) -> list[Any]:
    """The buffers of the file of ``shard`` holding ``rows_ND`` (its rows inside the array)."""
    n = rows_ND.shape[0]
    want = lay.shard_nrows(shard)
    if n != want or rows_ND.shape[1:] != (lay.d,):
        raise InputError(
            f"shard {shard} of {lay.directory} holds ({want}, {lay.d}) rows; "
            f"got {rows_ND.shape}: write whole shards, or write through zarr"
        )
    present = -(-n // lay.chunk_rows)
    return [*_chunk_pieces(lay, rows_ND, 0, present), _index_piece(lay, present)]


def _chunk_pieces(lay: RawShardLayout, rows_ND: np.ndarray, c0: int, c1: int) -> list[Any]:
    """Inner chunks ``c0..c1-1`` of a shard whose first ``len(rows_ND)`` rows are given,
    each followed by its crc32c; the chunk the rows end in is padded with the fill value."""
    cr, n = lay.chunk_rows, rows_ND.shape[0]
    pieces: list[Any] = []
    flat = rows_ND.reshape(-1).view(np.uint8)
    nbytes = lay.chunk_nbytes
    for c in range(c0, c1):
        if (c + 1) * cr <= n:
            chunk = flat[c * nbytes : (c + 1) * nbytes]
        else:  # the edge chunk: padded to the full chunk with the fill value, as zarr does
            padded = np.full((cr, lay.d), lay.fill_value, lay.dtype)
            padded[: n - c * cr] = rows_ND[c * cr :]
            chunk = padded.reshape(-1).view(np.uint8)
        pieces.append(chunk)
        pieces.append(struct.pack("<I", google_crc32c.value(chunk)))
    return pieces


def _index_piece(lay: RawShardLayout, present: int) -> bytes:
    """The shard index for chunks ``0..present-1`` packed back to back, and its crc32c."""
    nbytes = lay.chunk_nbytes
    index = np.full((lay.chunks_per_shard, 2), MISSING, "<u8")
    index[:present, 0] = np.arange(present, dtype=np.uint64) * np.uint64(nbytes + 4)
    index[:present, 1] = nbytes + 4
    raw = index.tobytes()
    return raw + struct.pack("<I", google_crc32c.value(raw))


class ShardStream:
    """One shard's file written chunk by chunk as its rows arrive, renamed into place at the end.

    A writer calls :meth:`append` with each batch's rows of the shard (on-disk
    dtype): every inner chunk they complete is written at once, with its crc32c, to
    a temporary file beside the shard's, straight from the rows given; only the rows
    of the chunk still filling are copied, into a one-chunk buffer. So a shard's
    rows are never held whole in memory, and when the shard is done only its edge
    chunk and the index are left to write (:meth:`finish`). :meth:`snapshot`
    writes the shard's visible file as it stands (a commit inside the shard) while
    the stream goes on. The files are byte for byte what :func:`write_shards` (or
    zarr, for a shard that ends before the array does) writes for the same rows;
    the temporary file is invisible until it is renamed into place, and
    :meth:`discard` removes it.

    Example
    -------
    >>> import tempfile, numpy as np
    >>> from actstore.store import arrays
    >>> lay16 = arrays.Layout(chunk_rows=2, shard_rows=4, compression="none")
    >>> a = arrays.create_array(tempfile.mkdtemp(), "a", d=3, dtype="float16", capacity=4, layout=lay16)
    >>> s = ShardStream(raw_layout(a), 0)
    >>> s.append(np.ones((3, 3), np.float16))  # chunk 0 is full: written now
    >>> s.chunks, s.rows
    (1, 3)
    >>> s.append(np.ones((1, 3), np.float16)); s.finish()
    >>> a[:].sum()
    np.float16(12.0)
    """

    def __init__(self, lay: RawShardLayout, shard: int) -> None:
        self.lay = lay
        self.path = lay.shard_path(shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.path)
        self._fd: int | None = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self.chunks = 0  # inner chunks written so far
        self.rows = 0  # rows appended so far
        self._tail = np.empty((lay.chunk_rows, lay.d), lay.dtype)  # the chunk still filling

    @property
    def held_nbytes(self) -> int:
        """Bytes of memory the stream holds: its one-chunk buffer.

        Example
        -------
        >>> s.held_nbytes  # doctest: +SKIP
        786432
        """
        return int(self._tail.nbytes)

    def append(self, rows_ND: np.ndarray) -> None:
        """Append rows to the shard; write every inner chunk they complete.

        Example
        -------
        >>> s.append(rows_ND)  # doctest: +SKIP
        """
        rows = _prepare(self.lay, rows_ND)
        cr, n = self.lay.chunk_rows, rows.shape[0]
        if self.rows + n > self.lay.shard_rows:
            raise InputError(
                f"shard {self.path}: {self.rows} + {n} rows exceed its {self.lay.shard_rows}"
            )
        held = self.rows - self.chunks * cr
        pieces: list[Any] = []
        i = 0
        if held:  # complete the chunk still filling first
            i = min(n, cr - held)
            self._tail[held : held + i] = rows[:i]
            if held + i == cr:
                pieces += _chunk_pieces(self.lay, self._tail, 0, 1)
        full = (n - i) // cr
        pieces += _chunk_pieces(self.lay, rows[i : i + full * cr], 0, full)
        if pieces:
            assert self._fd is not None
            _write_all(self._fd, pieces)  # before the buffer takes the next chunk's rows
        rest = rows[i + full * cr :]
        self._tail[: rest.shape[0]] = rest
        self.rows += n
        self.chunks = self.rows // cr

    def _edge_and_index(self) -> list[Any]:
        """The chunk still filling (padded with the fill value) and the index, as pieces."""
        held = self.rows - self.chunks * self.lay.chunk_rows
        edge = _chunk_pieces(self.lay, self._tail[:held], 0, 1) if held else []
        return [*edge, _index_piece(self.lay, self.chunks + (1 if held else 0))]

    def finish(self) -> None:
        """Write the edge chunk and the index; rename the file into place.

        Example
        -------
        >>> s.finish()  # doctest: +SKIP
        """
        assert self._fd is not None
        try:
            _write_all(self._fd, self._edge_and_index())
            os.close(self._fd)
            self._fd = None
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise

    def snapshot(self) -> None:
        """Write the shard's file as it stands (its rows so far); the stream goes on.

        The chunks written so far are copied from the temporary file inside the
        kernel (``copy_file_range``), the edge chunk and index added, and the result
        renamed into place; :meth:`finish` replaces it later.

        Example
        -------
        >>> s.snapshot()  # doctest: +SKIP
        """
        assert self._fd is not None
        done = self.chunks * (self.lay.chunk_nbytes + 4)
        tmp = temporary_path(self.path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                _copy_range(self._fd, fd, done)
                _write_all(fd, self._edge_and_index())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        """Close and remove the temporary file (the shard's visible file is untouched).

        Example
        -------
        >>> s.discard()  # doctest: +SKIP
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def _copy_range(src: int, dst: int, nbytes: int) -> None:
    """Copy the first ``nbytes`` of file ``src`` to the current end of ``dst``."""
    off = 0
    while off < nbytes:
        try:
            got = os.copy_file_range(src, dst, nbytes - off, off)
        except OSError:  # a file system without it: through memory, a chunk at a time
            got = os.write(dst, os.pread(src, min(nbytes - off, 1 << 24), off))
        if got == 0:
            raise OSError(f"copy of {nbytes} bytes stopped at {off}")
        off += got


def shard_bytes(lay: RawShardLayout, shard: int, rows_ND: np.ndarray) -> bytes:
    """The bytes of the file of ``shard`` holding ``rows_ND`` (its rows inside the array).

    Example
    -------
    >>> lay = RawShardLayout(Path("a"), 3, 2, np.dtype("<f2"), 2, 4, 0)
    >>> len(shard_bytes(lay, 0, np.zeros((3, 2), np.float16)))  # 2 chunks of 8 + 4, index 36
    60
    """
    return b"".join(bytes(p) for p in _pieces(lay, shard, _prepare(lay, rows_ND)))


def _prepare(lay: RawShardLayout, rows_ND: np.ndarray) -> np.ndarray:
    if rows_ND.dtype.newbyteorder("<") != lay.dtype:
        raise InputError(
            f"array {lay.directory} stores {lay.dtype}; got rows of {rows_ND.dtype}: "
            "convert them first (arrays.to_disk)"
        )
    return np.ascontiguousarray(rows_ND, dtype=lay.dtype)


def _write_all(fd: int, pieces: Sequence[Any]) -> None:
    """``writev`` every piece to ``fd``, resuming after short writes."""
    views = [memoryview(p).cast("B") for p in pieces]
    i = 0
    while i < len(views):
        batch = views[i : i + _IOV_MAX]
        done = os.writev(fd, batch)
        for v in batch:
            if done >= v.nbytes:
                done -= v.nbytes
                i += 1
            else:  # short write: finish this buffer, then go on with writev
                rest = v[done:]
                while rest.nbytes:
                    rest = rest[os.write(fd, rest) :]
                i += 1
                break


TEMPORARY_GLOB = "*.partial"
"""What the temporary files of shards being written match (see :func:`temporary_path`)."""


def temporary_path(path: Path) -> Path:
    """The temporary name a shard file is written under before it is renamed to ``path``.

    zarr's ``LocalStore`` naming: ``c/S/0.<uuid>.partial`` beside ``c/S/0``.

    Example
    -------
    >>> temporary_path(Path("a/c/0/0")).match(TEMPORARY_GLOB)
    True
    """
    return path.with_suffix(f".{uuid.uuid4().hex}.partial")


def _atomic_write(path: Path, pieces: Sequence[Any]) -> None:
    """Write ``pieces`` to ``path`` through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, pieces)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shards(lay: RawShardLayout, start: int, rows_ND: np.ndarray) -> None:
    """Write ``rows_ND`` as rows ``[start, start + N)``: whole shards of the array.

    ``start`` must be the first row of a shard and ``start + N`` the end of one or
    the array's end (see :func:`whole_shards`). Each shard file is replaced whole.

    Example
    -------
    >>> write_shards(lay, 0, rows_ND)  # doctest: +SKIP
    """
    stop = start + rows_ND.shape[0]
    if stop == start:
        return
    if (start, stop) != whole_shards(lay, start, stop) or stop > lay.n_rows:
        raise InputError(
            f"array {lay.directory}: rows {start}-{stop - 1} are not whole shards of "
            f"{lay.shard_rows} rows (the array has {lay.n_rows}); write them through zarr"
        )
    rows_ND = _prepare(lay, rows_ND)
    for a in range(start, stop, lay.shard_rows):
        shard = a // lay.shard_rows
        b = a + lay.shard_nrows(shard)
        _atomic_write(lay.shard_path(shard), _pieces(lay, shard, rows_ND[a - start : b - start]))
