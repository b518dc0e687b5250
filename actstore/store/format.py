"""The on-disk layout of a store and its format version.

A store is a directory::

    STORE/
      actstore.json          marker: {"format": "actstore", "format_version": 1, ...}
      catalog.duckdb         every table (models ... edits), see catalog.py
      arrays/run000001/blocks.3.hook_resid_post/   one Zarr v3 array per (run, hook)
      features/run000001/sae000001/part-000000000000.parquet   sparse SAE features

The marker is written first when a store is created and is the only file read
before the format version is known, so a newer format is refused before anything
is misread. ``docs/FORMAT.md`` describes every part for readers without actstore.

Example
-------
>>> array_relpath(3, "blocks.0.hook_resid_post")
'arrays/run000003/blocks.0.hook_resid_post'
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from actstore.errors import FormatVersionError, NotAStoreError
from actstore.store.location import Location

FORMAT_NAME = "actstore"
FORMAT_VERSION = 1
MARKER = "actstore.json"
CATALOG = "catalog.duckdb"
ARRAYS_DIR = "arrays"
FEATURES_DIR = "features"


def array_relpath(run_id: int, hook: str) -> str:
    """Path of the Zarr array of ``hook`` in run ``run_id``, relative to the store.

    ``:`` (from ``module:`` hooks) becomes ``~`` so the path is portable.

    Example
    -------
    >>> array_relpath(1, "module:model.layers.0")
    'arrays/run000001/module~model.layers.0'
    """
    return f"{run_group_relpath(run_id)}/{hook.replace(':', '~').replace('/', '~')}"


def run_group_relpath(run_id: int) -> str:
    """Path of run ``run_id``'s Zarr group (holding its arrays), relative to the store.

    Example
    -------
    >>> run_group_relpath(1)
    'arrays/run000001'
    """
    return f"{ARRAYS_DIR}/run{run_id:06d}"


def feature_dir_relpath(run_id: int, sae_id: int) -> str:
    """Directory of the sparse feature parts of SAE ``sae_id`` in run ``run_id``.

    Example
    -------
    >>> feature_dir_relpath(1, 2)
    'features/run000001/sae000002'
    """
    return f"{FEATURES_DIR}/run{run_id:06d}/sae{sae_id:06d}"


def write_marker(root: Path | Location, store_id: str | None = None) -> None:
    """Write the format marker of a new store (atomically).

    ``store_id`` (default: a new random id) tells this store apart from any other
    that has lived, or will live, at the same path or URL.

    Example
    -------
    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> write_marker(d); read_marker(d)["format_version"]
    1
    """
    from actstore import __version__

    body = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"actstore {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store_id": store_id or uuid.uuid4().hex,
    }
    Location.parse(root).write_bytes(MARKER, (json.dumps(body, indent=2) + "\n").encode())


def read_marker(root: Path | Location) -> dict[str, Any]:
    """Read and check the marker of the store at ``root``.

    Raises
    ------
    NotAStoreError
        ``root`` is missing, a file, or a directory without a valid marker.
    FormatVersionError
        The store was written by a newer format than this actstore reads.

    Example
    -------
    >>> read_marker(Path("/nonexistent"))  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    actstore.errors.NotAStoreError: ...
    """
    loc = Location.parse(root)
    if loc.is_file():
        raise NotAStoreError(
            f"{root} is a file, not a store directory; pass a directory path "
            "(a new one is created by `actstore ingest` or actstore.open(path, create=True))"
        )
    marker = loc.url_for(MARKER)
    if not loc.is_file(MARKER):
        raise NotAStoreError(
            f"{root} is not an actstore store (no {MARKER}); create one with "
            "`actstore ingest JOB.toml` or actstore.open(path, create=True)"
        )
    try:
        body = loc.read_json(MARKER)
    except (OSError, ValueError) as e:
        raise NotAStoreError(f"{marker} is unreadable ({e}); is {root} an actstore store?") from e
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise NotAStoreError(f"{marker} does not describe an actstore store")
    version = body.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise FormatVersionError(f"{marker} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"store {root} uses format v{version}, but this actstore reads format "
            f"v{FORMAT_VERSION} at most; upgrade actstore (pip install -U actstore) to read it"
        )
    return body
