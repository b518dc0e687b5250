"""Dense activation arrays: one Zarr v3 array per (run, hook), rows = tokens.

Layout choices, measured on 2-core VMs (see ``docs/FORMAT.md``):

* **Chunks** of about 1 MiB of whole rows (all columns in one chunk: a row is
  read in one piece), **shards** of 32 chunks so a large run is not a million
  files. Writers write whole shards (see ``writer.py``): a partial write of a
  sharded array re-reads and re-writes the whole shard.
* **Codecs**: ``bytes`` then, for float32, ``zstd`` level 1 (about 1.5x), and
  always ``crc32c`` so a damaged chunk is detected, never read. 16-bit data is
  stored uncompressed by default: zstd gains only ~1.09x on float16 and costs
  the raw-chunk layout that fast random row reads rely on. ``compression=`` picks.
* **bfloat16** is not a Zarr data type: it is stored as ``uint16`` with the real
  dtype in the array attribute ``actstore_dtype`` and returned as
  ``ml_dtypes.bfloat16`` (numpy) or ``torch.bfloat16``.
* **Dimension names** (``row``, ``d``) are in every array's metadata, and each
  run's directory is a Zarr group (:func:`create_group`), so
  ``xarray.open_zarr("STORE/arrays/run000001")`` opens a run's hooks as one Dataset.

Example
-------
>>> import tempfile, numpy as np
>>> root = tempfile.mkdtemp()
>>> arr = create_array(root, "arrays/run000001/h", d=4, dtype="float16", capacity=10)
>>> write_rows(arr, 0, np.ones((3, 4), np.float16))
>>> read_rows(arr, np.array([0, 2])).shape
(2, 4)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import CorruptChunkError, InputError
from actstore.store import shardio as _shardio
from actstore.store.location import Location

if TYPE_CHECKING:  # zarr is imported when an array is first created or opened
    import zarr

    from actstore.store.mapped import MappedArray


class _StoreDtypes(Mapping[str, "np.dtype[Any]"]):
    """``{"float16": ..., "float32": ..., "bfloat16": ...}``; ml_dtypes (slow to import: its
    extension registers a dozen numpy dtypes) is imported when bfloat16 is first looked up."""

    _names = ("float16", "float32", "bfloat16")

    def __init__(self) -> None:
        self._have: dict[str, np.dtype[Any]] = {
            "float16": np.dtype(np.float16),
            "float32": np.dtype(np.float32),
        }

    def __getitem__(self, name: str) -> np.dtype[Any]:
        if name == "bfloat16" and name not in self._have:
            import ml_dtypes

            self._have[name] = np.dtype(ml_dtypes.bfloat16)
        return self._have[name]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


#: Storage dtypes a run can choose, and the numpy dtype each is read as.
STORE_DTYPES: Mapping[str, np.dtype[Any]] = _StoreDtypes()
_ON_DISK = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
COMPRESSIONS = ("none", "zstd", "blosc")
TARGET_CHUNK_BYTES = 1 << 20
#: Reads of rows are tried this often before a failure is reported as corruption.
READ_ATTEMPTS = 3
CHUNKS_PER_SHARD = 32


@dataclass(frozen=True, slots=True)
class Layout:
    """How an array is cut into chunks and shards and encoded."""

    chunk_rows: int
    """Rows per inner chunk (all columns)."""
    shard_rows: int
    """Rows per shard file: a multiple of ``chunk_rows``."""
    compression: str
    """``none``, ``zstd`` (level 1) or ``blosc`` (zstd level 1 with byte shuffle)."""


def check_dtype(dtype: str) -> str:
    """Return ``dtype`` if it is a storage dtype, else raise a clear error.

    Example
    -------
    >>> check_dtype("bfloat16")
    'bfloat16'
    """
    if dtype not in STORE_DTYPES:
        raise InputError(
            f"store dtype {dtype!r} is not supported; choose one of {sorted(STORE_DTYPES)}"
        )
    return dtype


def default_layout(d: int, dtype: str, compression: str | None = None) -> Layout:
    """The chunking and codec for a width ``d`` and a storage dtype.

    Example
    -------
    >>> default_layout(768, "float16")
    Layout(chunk_rows=512, shard_rows=16384, compression='none')
    """
    itemsize = STORE_DTYPES[check_dtype(dtype)].itemsize
    rows = max(1, TARGET_CHUNK_BYTES // max(1, d * itemsize))
    chunk_rows = 1 << (rows.bit_length() - 1)  # a power of two, for aligned batches
    if compression is None:
        compression = "zstd" if dtype == "float32" else "none"
    if compression not in COMPRESSIONS:
        raise InputError(f"compression {compression!r} unknown; choose one of {COMPRESSIONS}")
    return Layout(chunk_rows, chunk_rows * CHUNKS_PER_SHARD, compression)


def _compressors(compression: str, itemsize: int) -> list[Any]:
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

    if compression == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if compression == "blosc":
        return [
            BloscCodec(
                cname="zstd",
                clevel=1,
                shuffle=BloscShuffle.shuffle,
                typesize=itemsize,
                blocksize=1 << 20,
            ),
            Crc32cCodec(),
        ]
    return [Crc32cCodec()]


def create_array(
    root: str | Path | Location,
    relpath: str,
    *,
    d: int,
    dtype: str,
    capacity: int,
    layout: Layout | None = None,
    attributes: dict[str, Any] | None = None,
    dimension_names: tuple[str, str] = ("row", "d"),
) -> zarr.Array:
    """Create (or open, if it exists with the same layout) the array at ``root/relpath``.

    Parameters
    ----------
    d
        Columns (the hook's width).
    dtype
        Storage dtype: ``float16``, ``float32`` or ``bfloat16``.
    capacity
        Initial number of rows; writers grow it with :func:`ensure_capacity`.
    dimension_names
        The names of the two dimensions in the array's metadata (what xarray uses).

    Example
    -------
    >>> import tempfile
    >>> a = create_array(tempfile.mkdtemp(), "a", d=8, dtype="bfloat16", capacity=4)
    >>> str(a.dtype), a.attrs["actstore_dtype"]
    ('uint16', 'bfloat16')
    """
    layout = layout or default_layout(d, dtype)
    loc = Location.parse(root)
    if loc.exists(f"{relpath}/zarr.json"):
        return open_array(root, relpath)
    import zarr

    attrs = {"actstore_dtype": dtype, **(attributes or {})}
    itemsize = STORE_DTYPES[dtype].itemsize
    return zarr.create_array(
        store=loc.zarr_store(relpath),
        shape=(max(capacity, 0), d),
        chunks=(layout.chunk_rows, d),
        shards=(layout.shard_rows, d),
        dtype=_ON_DISK[dtype],
        compressors=_compressors(layout.compression, itemsize),
        fill_value=0,
        attributes=attrs,
        dimension_names=dimension_names,
        config={"write_empty_chunks": True},
    )


def import_zarr() -> None:
    """Import zarr now: a writer calls it before its clock starts, as it loads its model.

    zarr (about 0.1 s of imports) is otherwise imported when the first array is
    created or opened, so light commands (``actstore sql``) never import it.

    Example
    -------
    >>> import_zarr()
    """
    import zarr  # noqa: F401


def create_group(
    root: str | Path | Location, relpath: str, attributes: dict[str, Any] | None = None
) -> None:
    """Make ``root/relpath`` a Zarr v3 group (its ``zarr.json``), unless it is one already.

    Zarr v3 has no implicit groups: without this, zarr and xarray can open the
    arrays only one by one.

    Example
    -------
    >>> import tempfile, zarr
    >>> r = tempfile.mkdtemp(); create_group(r, "arrays/run000001", {"run_id": 1})
    >>> dict(zarr.open_group(f"{r}/arrays/run000001", mode="r").attrs)
    {'run_id': 1}
    """
    import zarr

    loc = Location.parse(root)
    if not loc.exists(f"{relpath}/zarr.json"):
        zarr.create_group(store=loc.zarr_store(relpath), attributes=attributes or {})


def open_array(root: str | Path | Location, relpath: str, mode: str = "r+") -> zarr.Array:
    """Open an existing array.

    Example
    -------
    >>> import tempfile
    >>> r = tempfile.mkdtemp(); _ = create_array(r, "a", d=2, dtype="float32", capacity=1)
    >>> open_array(r, "a", mode="r").shape
    (1, 2)
    """
    # zarr.open_array ignores ``config`` for an existing array (zarr 3.1.6), so it is set
    # after: without write_empty_chunks zarr compares every chunk with the fill value
    # (half the write speed) and leaves out equal ones, and shardio would not apply.
    import zarr
    import zarr.errors

    loc = Location.parse(root)
    try:
        arr = zarr.open_array(store=loc.zarr_store(relpath, read_only=mode == "r"), mode=mode)
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError) as e:
        first = str(e).splitlines()[0] if str(e) else "missing"
        raise CorruptChunkError(
            f"array {relpath} of store {loc.url} cannot be opened ({type(e).__name__}: {first}); "
            "the store is damaged: restore the array's directory from a backup or re-ingest "
            "its run into a new store"
        ) from None
    return arr.with_config({"write_empty_chunks": True})


def logical_dtype(arr: zarr.Array | MappedArray) -> str:
    """The dtype the array's values mean (``bfloat16`` for a uint16-stored array).

    Example
    -------
    >>> import tempfile
    >>> logical_dtype(create_array(tempfile.mkdtemp(), "a", d=2, dtype="float16", capacity=1))
    'float16'
    """
    return str(arr.attrs.get("actstore_dtype", str(arr.dtype)))


def to_disk(data: np.ndarray, dtype: str) -> np.ndarray:
    """Cast ``data`` (N, D) to the storage dtype and return its on-disk view.

    Accepts any float array, or a ``uint16`` array already holding bfloat16 bits.

    Example
    -------
    >>> to_disk(np.array([[1.5]], np.float32), "bfloat16").dtype
    dtype('uint16')
    """
    if dtype == "bfloat16":
        if data.dtype == np.uint16:
            return data
        if data.dtype != STORE_DTYPES["bfloat16"]:
            data = data.astype(STORE_DTYPES["bfloat16"])
        return data.view(np.uint16)
    return data.astype(STORE_DTYPES[dtype], copy=False)


def from_disk(data: np.ndarray, dtype: str) -> np.ndarray:
    """View on-disk data as its logical dtype (no copy).

    Example
    -------
    >>> from_disk(np.array([[16320]], np.uint16), "bfloat16").astype(float)
    array([[1.5]])
    """
    return data.view(STORE_DTYPES["bfloat16"]) if dtype == "bfloat16" else data


def ensure_capacity(arr: zarr.Array, rows: int) -> None:
    """Grow the array to at least ``rows`` rows (doubling, to keep resizes rare).

    Example
    -------
    >>> import tempfile
    >>> a = create_array(tempfile.mkdtemp(), "a", d=2, dtype="float16", capacity=1)
    >>> ensure_capacity(a, 5); a.shape[0] >= 5
    True
    """
    if arr.shape[0] < rows:
        arr.resize((max(rows, 2 * arr.shape[0]), arr.shape[1]))


def write_rows(arr: zarr.Array, start: int, data: np.ndarray) -> None:
    """Write ``data`` (N, D) into rows ``[start, start + N)``, growing the array if needed.

    Whole shards of an uncompressed array (see :mod:`actstore.store.shardio`) are
    written straight to their files, the rest through zarr; the files are the same.

    Example
    -------
    >>> import tempfile
    >>> a = create_array(tempfile.mkdtemp(), "a", d=2, dtype="float32", capacity=0)
    >>> write_rows(a, 0, np.eye(2, dtype=np.float32)); a[:].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if data.ndim != 2 or data.shape[1] != arr.shape[1]:
        raise InputError(
            f"array {arr.path or arr.store}: got rows of shape {data.shape}, expected (N, {arr.shape[1]})"
        )
    stop = start + data.shape[0]
    ensure_capacity(arr, stop)
    disk = to_disk(data, logical_dtype(arr))
    lay = _shardio.raw_layout(arr) if stop > start else None
    if lay is not None and disk.dtype.newbyteorder("<") == lay.dtype:
        # whole shards of a raw array are written directly (byte for byte what zarr
        # writes, several times faster); the partial shards at either end through zarr
        a, b = _shardio.whole_shards(lay, start, stop)
        if a < b:
            if start < a:
                arr[start:a] = disk[: a - start]
            _shardio.write_shards(lay, a, disk[a - start : b - start])
            if b < stop:
                arr[b:stop] = disk[b - start :]
            return
    arr[start:stop] = disk


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted unique rows into maximal contiguous [a, b) runs."""
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return [(int(rows[s]), int(rows[e - 1]) + 1) for s, e in zip(starts, ends, strict=True)]


def missing_shard(name: str, shard: int, shard_rows: int, chunk_rows: int, n_rows: int) -> str:
    """The message for a committed shard file that is absent (a read would give zeros).

    Example
    -------
    >>> missing_shard("arrays/run000001/h", 1, 8, 4, 20)[:61]
    'array arrays/run000001/h: shard file c/1/0 (rows 8-15, chunks'
    """
    a, b = shard * shard_rows, min((shard + 1) * shard_rows, n_rows)
    per = shard_rows // chunk_rows
    last = min(shard * per + per, -(-b // chunk_rows)) - 1
    return (
        f"array {name}: shard file c/{shard}/0 (rows {a}-{b - 1}, chunks {shard * per}-"
        f"{last}) is missing although its rows are committed; the store is "
        "damaged: restore the file from a backup or re-ingest this run into a new store"
    )


#: Shard objects of remote arrays seen to exist (a local file is checked on every read).
_PRESENT: set[tuple[int, str]] = set()


def _require_shards(arr: zarr.Array, rows: np.ndarray, name: str, committed: int) -> None:
    """Raise if a shard file holding ``rows`` (committed rows) is absent: zarr reads zeros."""
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    chunk_rows = arr.chunks[0]
    shard_rows = arr.shards[0] if arr.shards else chunk_rows
    local = isinstance(arr.store, LocalStore)
    prefix = f"{arr.path}/" if arr.path else ""
    for s in np.unique(rows // shard_rows).tolist():
        key = f"{prefix}c/{int(s)}/0"
        if not local and (id(arr.store), key) in _PRESENT:
            continue
        if not sync(arr.store.exists(key)):
            raise CorruptChunkError(missing_shard(name, int(s), shard_rows, chunk_rows, committed))
        if not local:
            _PRESENT.add((id(arr.store), key))


def _locate_corruption(arr: zarr.Array, rows: np.ndarray, name: str, err: Exception) -> Exception:
    chunk_rows = arr.chunks[0]
    shard_rows = arr.shards[0] if arr.shards else chunk_rows
    for c in np.unique(rows // chunk_rows):
        a, b = int(c) * chunk_rows, min((int(c) + 1) * chunk_rows, arr.shape[0])
        try:
            arr[a:b]
        except Exception as e:
            shard = a // shard_rows
            return CorruptChunkError(
                f"array {name}: chunk {int(c)} (rows {a}-{b - 1}, in shard file c/{shard}/0) "
                f"is corrupt ({e}); its data cannot be trusted: re-ingest this run into a new store "
                "or restore the file from a backup"
            )
    return CorruptChunkError(f"array {name}: reading rows failed ({err})")


def read_rows(
    arr: zarr.Array,
    rows: np.ndarray | slice,
    *,
    name: str | None = None,
    out: np.ndarray | None = None,
    committed: int | None = None,
) -> np.ndarray:
    """Read rows (any order, repeats allowed) in their logical dtype.

    Only the chunks that hold the rows are read. A chunk whose checksum fails raises
    :class:`CorruptChunkError` naming the array and chunk; wrong numbers are never
    returned. With ``committed`` (the run's ``arrays.n_rows``), a shard file holding
    one of those rows that is absent raises too (zarr would read it as zeros).

    Example
    -------
    >>> import tempfile
    >>> a = create_array(tempfile.mkdtemp(), "a", d=1, dtype="float32", capacity=0)
    >>> write_rows(a, 0, np.arange(5, dtype=np.float32)[:, None])
    >>> read_rows(a, np.array([4, 0, 4]))[:, 0].tolist()
    [4.0, 0.0, 4.0]
    """
    dtype = logical_dtype(arr)
    name = name or str(arr.store)
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(arr.shape[0]))
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= arr.shape[0]):
        raise InputError(f"array {name}: rows outside 0-{arr.shape[0] - 1} requested")
    uniq, inverse = np.unique(rows, return_inverse=True)
    if committed is not None:  # a committed row's shard may not read as zeros
        _require_shards(arr, uniq[uniq < committed], name, committed)
    buf = np.empty((uniq.size, arr.shape[1]), dtype=arr.dtype)
    runs = _runs(uniq)
    for attempt in range(READ_ATTEMPTS):
        try:
            pos = 0
            if len(runs) <= max(8, uniq.size // 64):
                for a, b in runs:
                    buf[pos : pos + b - a] = arr[a:b]
                    pos += b - a
            elif uniq.size:
                buf[:] = arr.get_orthogonal_selection((uniq, slice(None)))
            break
        except CorruptChunkError:
            raise
        except Exception as e:
            # zarr reads a shard's index and its chunks in separate requests: a writer
            # replacing the shard file (or object) between them gives a checksum mismatch
            # that a second read does not. Damage fails every time.
            if attempt + 1 == READ_ATTEMPTS:
                raise _locate_corruption(arr, uniq, name, e) from e
            time.sleep(0.05 * (attempt + 1))
    result = buf if uniq.size == rows.size and np.array_equal(uniq, rows) else buf[inverse]
    result = from_disk(result, dtype)
    if out is not None:
        out[...] = result
        return out
    return result
