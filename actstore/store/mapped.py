"""Raw sharded arrays opened from their ``zarr.json`` alone, for reads without zarr.

:meth:`Store.acts` reads the rows of a raw sharded array (16-bit data, codecs
``bytes`` + ``crc32c``, see :mod:`actstore.store.shardio`) from its memory-mapped
shard files (:mod:`actstore.store.access`); zarr itself is not used for those
bytes, only to open the array and say where its shard files are. Importing zarr
(and its fsspec, numcodecs and asyncio) takes a quarter of a second, several times
a first read of 10,000 rows. :func:`open_mapped` reads the array's ``zarr.json``
(the Zarr v3 metadata document) and applies the same layout rules
(:func:`actstore.store.shardio.layout_from_metadata`) as zarr's parsed metadata
does, so such a read never imports zarr. An array with any other layout, a
metadata document the rules do not cover, or a store off the local disk gets
None, and is opened with zarr as before.

What the returned :class:`MappedArray` offers is what the reader needs of a
``zarr.Array``: ``shape``, ``dtype``, ``attrs``, ``path`` and the ``layout``.

Example
-------
>>> import tempfile
>>> from actstore.store import arrays
>>> root = tempfile.mkdtemp()
>>> _ = arrays.create_array(root, "a", d=8, dtype="bfloat16", capacity=0)
>>> m = open_mapped(root, "a")
>>> m.shape, str(m.dtype), m.attrs["actstore_dtype"], m.layout.chunk_rows
((0, 8), 'uint16', 'bfloat16', 65536)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actstore.store.location import Location
from actstore.store.shardio import RawShardLayout, layout_from_metadata

__all__ = ["MappedArray", "open_mapped"]

_FILLS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclass(frozen=True)
class MappedArray:
    """A raw sharded 2-D array as its ``zarr.json`` describes it (read-only)."""

    path: str
    """The array's path inside the store (``arrays/run000001/...``)."""
    layout: RawShardLayout
    """Where its rows are in its shard files."""
    attrs: Mapping[str, Any]
    """The array's attributes (``actstore_dtype``, ``hook``, ``heads``, ...)."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, d)`` as the metadata says.

        Example
        -------
        >>> import tempfile
        >>> from actstore.store import arrays
        >>> r = tempfile.mkdtemp(); _ = arrays.create_array(r, "a", d=2, dtype="float16", capacity=3)
        >>> open_mapped(r, "a").shape
        (3, 2)
        """
        return (self.layout.n_rows, self.layout.d)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The on-disk dtype (``uint16`` for bfloat16 bits).

        Example
        -------
        >>> import tempfile
        >>> from actstore.store import arrays
        >>> r = tempfile.mkdtemp(); _ = arrays.create_array(r, "a", d=2, dtype="float16", capacity=3)
        >>> str(open_mapped(r, "a").dtype)
        'float16'
        """
        return self.layout.dtype


def open_mapped(root: str | Path | Location, relpath: str) -> MappedArray | None:
    """The raw sharded array at ``relpath`` from its ``zarr.json``, or None.

    None where the store is not on the local disk, the document is missing or
    unreadable, or it describes another layout: open the array with zarr
    (``actstore.store.arrays.open_array``) then, which reports a damaged one.

    Example
    -------
    >>> import tempfile
    >>> from actstore.store import arrays
    >>> r = tempfile.mkdtemp()
    >>> _ = arrays.create_array(r, "a16", d=4, dtype="float16", capacity=0)
    >>> _ = arrays.create_array(r, "a32", d=4, dtype="float32", capacity=0)
    >>> open_mapped(r, "a16").layout.d, open_mapped(r, "a32")  # float32 is compressed
    (4, None)
    """
    loc = Location.parse(root)
    if not loc.is_local:
        return None
    directory = loc.local_path / relpath
    try:
        md = json.loads((directory / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(md, dict) or md.get("zarr_format") != 3 or md.get("node_type") != "array":
        return None
    dtype, fill, shape = md.get("data_type"), md.get("fill_value"), md.get("shape")
    if not isinstance(dtype, str) or not isinstance(shape, list):
        return None
    fill = _FILLS.get(fill, fill) if isinstance(fill, str) else fill
    if isinstance(fill, bool) or not isinstance(fill, int | float):
        return None
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        return None
    if np_dtype.kind not in "fiu":
        return None
    try:
        fill = np_dtype.type(fill)  # as zarr parses it
    except (OverflowError, ValueError):
        return None
    lay = layout_from_metadata(md, directory, np_dtype, [int(x) for x in shape], fill)
    attrs = md.get("attributes")
    if lay is None or not isinstance(attrs, dict):
        return None
    return MappedArray(relpath, lay, attrs)
