"""Fast row reads: gather rows straight from memory-mapped shard files.

A store's 16-bit arrays are sharded and uncompressed (see ``actstore.store.arrays``).
Zarr's sharding codec lays such a shard file out as the concatenation of its
inner chunks, each the raw little-endian values followed by a 4-byte crc32c,
then an index at the end: one ``(offset, nbytes)`` pair of uint64 per inner
chunk (``2**64 - 1`` twice for a chunk never written), followed by the index's
own crc32c. Every inner chunk holds whole rows, so a row is ``d * itemsize``
contiguous bytes at a known place in a file.

:func:`read_rows` is a drop-in for :func:`actstore.store.arrays.read_rows`: for
such arrays it memory-maps the shard files (cached per process, re-mapped when a
file is replaced) and copies the requested rows out with one numpy gather per
shard, which costs about what the same gather from a raw ``np.memmap`` costs.
When torch is imported (it is wherever tensors are returned) that gather is a
``torch.index_select`` over an overlapping view of the shard's rows, which
copies each row as one block; rows asked for out of order are gathered in order
and put back with a second ``index_select`` (numpy's scatter is slower).
Zarr pays 0.5-0.7 ms per chunk touched instead. Each inner chunk a read touches
is checked against its crc32c the first time this process touches it (the result
is cached per file version), so corrupted data is never returned: a failure
raises :class:`~actstore.errors.CorruptChunkError` naming the array and chunk,
with the same wording as ``arrays.read_rows``. Arrays in any other layout
(compressed, not sharded, not on a local disk) are read through zarr.

Example
-------
>>> import tempfile, numpy as np
>>> from actstore.store import arrays
>>> arr = arrays.create_array(tempfile.mkdtemp(), "a", d=4, dtype="float16", capacity=0)
>>> arrays.write_rows(arr, 0, np.arange(40, dtype=np.float16).reshape(10, 4))
>>> read_rows(arr, np.array([9, 0]))[:, 0].tolist()
[36.0, 0.0]
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np

from actstore.errors import CorruptChunkError, InputError
from actstore.store import arrays as _arrays
from actstore.store.mapped import MappedArray
from actstore.store.shardio import RawShardLayout, parse_layout

if TYPE_CHECKING:  # zarr is imported when an array is opened (actstore.store.arrays)
    import zarr

__all__ = ["ShardLayout", "clear_cache", "read_rows", "shard_layout"]

_EMPTY = np.uint64(2**64 - 1)
#: Shard files kept mapped at once (each mapping holds a file descriptor).
MAX_MAPPED_SHARDS = 256


#: Where the bytes of each row of a raw sharded array are: the writer's layout.
ShardLayout = RawShardLayout


# id(metadata) -> (weak reference to it, its layout): metadata objects are immutable, so
# a layout is worked out once per object (keyed by identity: equal metadata of two
# arrays in different directories must not share an entry).
_LAYOUTS: dict[int, tuple[weakref.ref[Any], ShardLayout | None]] = {}


def shard_layout(arr: zarr.Array) -> ShardLayout | None:
    """The layout of ``arr`` if its shards can be memory-mapped, else None.

    That is: a 2-D Zarr v3 array on a local disk, whole-row inner chunks and
    shards, codecs ``bytes`` (little endian) + ``crc32c`` inside the shard, and the
    shard index (``bytes`` + ``crc32c``) at the end of the file.

    Example
    -------
    >>> import tempfile
    >>> from actstore.store import arrays
    >>> a16 = arrays.create_array(tempfile.mkdtemp(), "a", d=8, dtype="float16", capacity=0)
    >>> a32 = arrays.create_array(tempfile.mkdtemp(), "a", d=8, dtype="float32", capacity=0)
    >>> shard_layout(a16).chunk_rows, shard_layout(a32)  # float32 is zstd-compressed
    (65536, None)
    """
    meta = arr.metadata
    hit = _LAYOUTS.get(id(meta))
    if hit is not None and hit[0]() is meta:
        lay = hit[1]
        if lay is None or lay.directory == Path(getattr(arr.store, "root", "")) / arr.path:
            return lay
    lay = parse_layout(arr)
    try:
        _LAYOUTS[id(meta)] = (weakref.ref(meta), lay)
    except TypeError:  # not weak-referenceable: no caching
        return lay
    if len(_LAYOUTS) > 4096:
        for k in [k for k, (ref, _) in _LAYOUTS.items() if ref() is None]:
            del _LAYOUTS[k]
    return lay


@dataclass
class _Shard:
    """One mapped shard file: its index and which inner chunks passed their checksum."""

    version: tuple[int, int, int]  # (inode, mtime_ns, size): a new file is a new version
    mm: mmap.mmap | None
    data: np.ndarray  # uint8 view of the whole file
    offsets: np.ndarray  # (chunks_per_shard,) uint64
    nbytes: np.ndarray  # (chunks_per_shard,) uint64
    verified: np.ndarray  # (chunks_per_shard,) bool, shared with _VERIFIED
    index_ok: bool
    view: np.ndarray | None  # (chunks, chunk_rows, d) strided view when chunks are packed
    first: int  # the inner chunk view[0] is (chunks first..first + len(view) - 1 present)
    rows_t: Any = None  # torch view of ``view``'s rows for index_select (see _row_tensor)


_lock = threading.RLock()
_SHARDS: OrderedDict[str, _Shard] = OrderedDict()
_VERIFIED: dict[tuple[str, int, int, int], np.ndarray] = {}


def clear_cache() -> None:
    """Unmap every shard file and forget which chunks were verified.

    Example
    -------
    >>> clear_cache()
    """
    with _lock:
        for sh in _SHARDS.values():
            _close(sh)
        _SHARDS.clear()
        _VERIFIED.clear()


def _close(sh: _Shard) -> None:
    # Views of the map (``data``) pin it, so it is not closed explicitly: dropping the
    # last reference unmaps it and closes its descriptor.
    sh.mm = None


def _open_shard(path: str, version: tuple[int, int, int], lay: ShardLayout) -> _Shard:
    k = lay.chunks_per_shard
    size = version[2]
    index_nbytes = 16 * k + 4
    mm: mmap.mmap | None = None
    if size:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data = np.frombuffer(mm, np.uint8)
    else:
        data = np.zeros(0, np.uint8)
    offsets = np.full(k, _EMPTY, np.uint64)
    nbytes = np.full(k, _EMPTY, np.uint64)
    index_ok = size >= index_nbytes
    if index_ok:
        raw = data[size - index_nbytes : size - 4]
        stored = int(data[size - 4 : size].view("<u4")[0])
        index_ok = google_crc32c.value(raw) == stored
        if index_ok:
            pairs = raw.view("<u8").reshape(k, 2)
            offsets, nbytes = pairs[:, 0].copy(), pairs[:, 1].copy()
    key = (path, *version)
    verified = _VERIFIED.setdefault(key, np.zeros(k, bool))
    view, first = None, 0
    want = lay.chunk_nbytes + 4
    present = np.flatnonzero(offsets != _EMPTY)
    if index_ok and present.size and (nbytes[present] == want).all():
        # zarr packs a shard's chunks back to back: then one strided view covers them all
        first, last = int(present[0]), int(present[-1])
        base = int(offsets[first])
        packed = present.size == last - first + 1 and np.array_equal(
            offsets[present], base + (present - first).astype(np.uint64) * np.uint64(want)
        )
        if packed and base + (last - first + 1) * want <= size - index_nbytes:
            view = np.ndarray(
                (last - first + 1, lay.chunk_rows, lay.d),
                dtype=lay.dtype,
                buffer=data,
                offset=base,
                strides=(want, lay.d * lay.dtype.itemsize, lay.dtype.itemsize),
            )
    return _Shard(version, mm, data, offsets, nbytes, verified, index_ok, view, first)


def _shard(lay: ShardLayout, s: int) -> _Shard | None:
    path = os.path.join(str(lay.directory), "c", str(s), "0")  # lay.shard_path(s), sooner
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    version = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _lock:
        sh = _SHARDS.get(path)
        if sh is not None and sh.version == version:
            _SHARDS.move_to_end(path)
            return sh
        if sh is not None:
            _close(_SHARDS.pop(path))
        sh = _open_shard(path, version, lay)
        _SHARDS[path] = sh
        while len(_SHARDS) > MAX_MAPPED_SHARDS:
            _close(_SHARDS.popitem(last=False)[1])
        return sh


def _corrupt(lay: ShardLayout, name: str, shard: int, inner: int, why: str) -> CorruptChunkError:
    c = shard * lay.chunks_per_shard + inner
    a, b = c * lay.chunk_rows, min((c + 1) * lay.chunk_rows, lay.n_rows)
    return CorruptChunkError(
        f"array {name}: chunk {c} (rows {a}-{b - 1}, in shard file c/{shard}/0) "
        f"is corrupt ({why}); its data cannot be trusted: re-ingest this run into a new store "
        "or restore the file from a backup"
    )


def _check_chunks(
    lay: ShardLayout, sh: _Shard, name: str, s: int, chunks: np.ndarray, committed: int | None
) -> None:
    """Verify the checksum of every chunk in ``chunks`` not verified before.

    A chunk absent from the index reads as the fill value, unless it holds one of
    the first ``committed`` rows: then the shard is damaged.
    """
    todo = chunks[~sh.verified[chunks]]
    if todo.size == 0:
        return
    if not sh.index_ok:
        raise _corrupt(lay, name, s, int(todo[0]), "the shard index fails its crc32c")
    want = lay.chunk_nbytes + 4
    size = sh.data.size
    for c in todo.tolist():
        off, nb = sh.offsets[c], sh.nbytes[c]
        if off == _EMPTY:
            if (
                committed is not None
                and (s * lay.chunks_per_shard + c) * lay.chunk_rows < committed
            ):
                raise _corrupt(lay, name, s, c, "it is missing from the shard, yet committed")
            sh.verified[c] = True  # never written: reads as the fill value
            continue
        off_i, nb_i = int(off), int(nb)
        if nb_i != want or off_i + nb_i > size:
            raise _corrupt(lay, name, s, c, f"{nb_i} bytes at offset {off_i}, expected {want}")
        stored = int(sh.data[off_i + nb_i - 4 : off_i + nb_i].view("<u4")[0])
        computed = google_crc32c.value(sh.data[off_i : off_i + nb_i - 4])
        if stored != computed:
            raise _corrupt(
                lay, name, s, c, f"crc32c stored {stored:#010x}, computed {computed:#010x}"
            )
        sh.verified[c] = True


def _row_tensor(sh: _Shard, lay: ShardLayout) -> Any:
    """A torch tensor whose row ``k`` starts at element ``k`` of the packed chunks, or None.

    Row ``w`` of inner chunk ``c`` is then row ``(c - first) * stride + w * d``
    (``stride`` a chunk plus its checksum, in elements): an overlapping view
    ``(elements, d)`` with strides ``(1, 1)``, so that one ``torch.index_select``
    gathers any rows of the shard. It copies each row as one block, several times
    faster than numpy's fancy indexing of the same rows. None where torch is not
    imported (reads stay numpy-only) or the chunks are not aligned to the element.
    """
    if sh.rows_t is not None:
        return sh.rows_t
    torch = sys.modules.get("torch")
    if torch is None or sh.view is None:
        return None
    isz = lay.dtype.itemsize
    want = lay.chunk_nbytes + 4
    view_at = int(sh.view.__array_interface__["data"][0])
    base = view_at - int(sh.data.__array_interface__["data"][0])  # offset of chunk ``first``
    span = len(sh.view) * want
    if isz not in (2, 4, 8) or want % isz or base % isz or span % isz:
        return None
    flat = sh.data[base : base + span].view(f"<i{isz}")
    with warnings.catch_warnings():  # read-only map: the tensor is never written
        warnings.simplefilter("ignore", UserWarning)
        flat_t = torch.from_numpy(flat)
    sh.rows_t = flat_t.as_strided((flat_t.numel() - lay.d + 1, lay.d), (1, 1))
    return sh.rows_t


def _torch_gather(
    rows_t: Any,
    sh: _Shard,
    lay: ShardLayout,
    inner: np.ndarray,
    within: np.ndarray,
    dest: np.ndarray,
    at: slice,
) -> None:
    """``dest[at] = rows (inner, within)`` of the shard, by ``torch.index_select``."""
    import torch

    stride = (lay.chunk_nbytes + 4) // lay.dtype.itemsize
    start = torch.from_numpy((inner - sh.first) * stride + within * lay.d)
    out = torch.from_numpy(dest[at].view(f"<i{lay.dtype.itemsize}"))
    torch.index_select(rows_t, 0, start, out=out)


def _gather(
    lay: ShardLayout,
    sh: _Shard | None,
    s: int,
    rows: np.ndarray,
    name: str,
    dest: np.ndarray,
    at: np.ndarray | slice,
    committed: int | None,
) -> None:
    """Copy ``rows`` (sorted, all in shard ``s``) into ``dest[at]``."""
    if sh is None:  # shard never written: the fill value, unless it holds committed rows
        if committed is not None and int(rows[0]) < committed:
            raise CorruptChunkError(
                _arrays.missing_shard(name, s, lay.shard_rows, lay.chunk_rows, committed)
            )
        dest[at] = lay.fill_value
        return
    loc = rows - s * lay.shard_rows
    inner = loc // lay.chunk_rows
    within = loc % lay.chunk_rows
    _check_chunks(lay, sh, name, s, np.unique(inner), committed)
    if sh.view is not None and inner[0] >= sh.first and inner[-1] < sh.first + len(sh.view):
        # one gather for the whole shard (rows are sorted, so inner is too), each row
        # copied as one opaque record (a memcpy) rather than element by element
        rows_t = _row_tensor(sh, lay) if isinstance(at, slice) else None
        if rows_t is not None and isinstance(at, slice):
            _torch_gather(rows_t, sh, lay, inner, within, dest, at)
            return
        rec = np.dtype((np.void, lay.d * lay.dtype.itemsize))
        dest.view(rec)[at, 0] = sh.view.view(rec)[inner - sh.first, within, 0]
        return
    bounds = np.flatnonzero(np.diff(inner)) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    ends = np.concatenate([bounds, [rows.size]]).tolist()
    idx = np.arange(rows.size) if isinstance(at, slice) else at
    base = (at.start or 0) if isinstance(at, slice) else 0
    for a, b in zip(starts, ends, strict=True):
        c = int(inner[a])
        where = slice(base + a, base + b) if isinstance(at, slice) else idx[a:b]
        if sh.offsets[c] == _EMPTY:  # never written (and holding no committed row)
            dest[where] = lay.fill_value
            continue
        chunk = np.frombuffer(
            sh.data, lay.dtype, count=lay.chunk_rows * lay.d, offset=int(sh.offsets[c])
        ).reshape(lay.chunk_rows, lay.d)
        dest[where] = chunk[within[a:b]]


def read_rows(
    arr: zarr.Array | MappedArray,
    rows: np.ndarray | slice | Any,
    *,
    name: str | None = None,
    out: np.ndarray | None = None,
    committed: int | None = None,
) -> np.ndarray:
    """Read rows (any order, repeats allowed) in their logical dtype, like ``arrays.read_rows``.

    Raw sharded arrays are read from memory-mapped shard files; others through zarr.
    A chunk that fails its checksum raises :class:`CorruptChunkError`.

    Parameters
    ----------
    arr
        The array (as returned by ``Store.array``), or a raw sharded one opened from
        its metadata alone (:func:`actstore.store.mapped.open_mapped`).
    rows
        Row numbers (any order, repeats allowed) or a slice.
    name
        How errors name the array (default: its store path).
    out
        Optional (N, D) array to fill and return.
    committed
        The run's committed rows (``arrays.n_rows``): a shard or chunk holding one
        of them that is absent raises :class:`CorruptChunkError` instead of reading
        as the fill value (zeros).

    Returns
    -------
    numpy.ndarray
        (N, D) in the logical dtype (``ml_dtypes.bfloat16`` for bfloat16 arrays).

    Example
    -------
    >>> import tempfile
    >>> from actstore.store import arrays
    >>> a = arrays.create_array(tempfile.mkdtemp(), "a", d=2, dtype="bfloat16", capacity=0)
    >>> arrays.write_rows(a, 0, np.ones((3, 2), np.float32))
    >>> read_rows(a, [2, 2]).astype(float).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    if isinstance(arr, MappedArray):  # opened without zarr (actstore.store.mapped)
        lay, name = arr.layout, name or arr.path
    else:
        got = shard_layout(arr)
        if got is None:
            return _arrays.read_rows(arr, rows, name=name, out=out, committed=committed)
        lay, name = got, name or str(arr.store)
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(lay.n_rows))
    rows_N = np.asarray(rows, dtype=np.int64).ravel()
    if rows_N.size and (rows_N.min() < 0 or rows_N.max() >= lay.n_rows):
        raise InputError(f"array {name}: rows outside 0-{lay.n_rows - 1} requested")
    logical = _arrays.logical_dtype(arr)
    shape = (rows_N.size, lay.d)
    direct = (
        out is not None
        and out.shape == shape
        and out.dtype == _arrays.STORE_DTYPES.get(logical, lay.dtype)
        and out.flags.c_contiguous
        and out.flags.writeable
    )
    if direct:
        assert out is not None
        result = out.view(lay.dtype)
    else:
        result = np.empty(shape, lay.dtype)
    is_sorted = rows_N.size < 2 or bool((rows_N[1:] >= rows_N[:-1]).all())
    order = None if is_sorted else np.argsort(rows_N, kind="stable")
    sorted_N = rows_N if order is None else rows_N[order]
    torch = sys.modules.get("torch")
    unsorted_into = None
    if order is not None and torch is not None:
        # gather in row order into a scratch array, then put the rows in the order asked
        # with one torch.index_select (a row copy each; numpy's scatter is far slower)
        unsorted_into, result = result, np.empty(shape, lay.dtype)
    shard_of = sorted_N // lay.shard_rows
    bounds = np.flatnonzero(np.diff(shard_of)) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    ends = np.concatenate([bounds, [sorted_N.size]]).tolist()
    for a, b in zip(starts, ends, strict=True):
        if a == b:
            continue
        s = int(shard_of[a])
        at = slice(a, b) if order is None or unsorted_into is not None else order[a:b]
        _gather(lay, _shard(lay, s), s, sorted_N[a:b], name, result, at, committed)
    if unsorted_into is not None:
        assert torch is not None and order is not None
        as_int = f"<i{lay.dtype.itemsize}"
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        torch.index_select(
            torch.from_numpy(result.view(as_int)),
            0,
            torch.from_numpy(back),
            out=torch.from_numpy(unsorted_into.view(as_int)),
        )
        result = unsorted_into
    if direct:
        assert out is not None
        return out
    values = _arrays.from_disk(result, logical)
    if out is not None:
        out[...] = values
        return out
    return values
