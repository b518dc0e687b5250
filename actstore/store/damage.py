"""A quick survey of a store's files against its catalog: what is missing or truncated.

``actstore info`` (:meth:`actstore.Store.info`) reports it, so a damaged store
says so in its summary instead of failing there: every committed feature part
must exist with the size its ``feature_files`` row records, and every array
listed in ``arrays`` must have its ``zarr.json`` and a shard file for each shard
below ``n_rows``. The survey only lists and stats files (checksums are verified
when the data is read: ``actstore.store.part_check``, ``actstore.store.access``).

Example
-------
>>> import tempfile, actstore
>>> survey(actstore.open(tempfile.mkdtemp() + "/s", create=True))
[]
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from actstore.store import part_check

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["survey"]


def _size(store: Store, rel: str) -> int | None:
    loc = store.location
    if loc.is_local:
        p = loc.local_path / rel
        return p.stat().st_size if p.is_file() else None
    return loc.fs.size(loc.path(rel)) if loc.exists(rel) else None


def survey(store: Store) -> list[str]:
    """One line per missing or truncated file the catalog says is committed.

    Example
    -------
    >>> survey(st)  # doctest: +SKIP
    ["feature part features/run000001/sae000001/part-...parquet of run 'r', SAE 's' is missing"]
    """
    out: list[str] = []
    with store.session.connection() as con:
        parts = part_check.parts_of(con)
        arrays = con.execute(
            "SELECT r.name, a.hook, a.path, a.n_rows FROM cat.main.arrays a "
            "JOIN cat.main.runs r USING (run_id) ORDER BY a.run_id, a.hook"
        ).fetchall()
    for p in parts:
        size = _size(store, p.path)
        what = f"feature part {p.path} of run {p.run!r}, SAE {p.sae!r}"
        if size is None:
            out.append(f"{what} is missing")
        elif p.n_bytes is not None and size != p.n_bytes:
            out.append(f"{what} has {size} bytes, {p.n_bytes} were committed")
    for run, hook, path, n_rows in arrays:
        what = f"array {path} (run {run!r}, hook {hook!r})"
        try:
            meta = json.loads(store.location.read_bytes(f"{path}/zarr.json"))
        except (OSError, ValueError) as e:
            out.append(f"{what}: zarr.json is missing or unreadable ({type(e).__name__})")
            continue
        try:
            # the chunk grid's chunks are the storage objects (shards, when sharded)
            shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        except (KeyError, IndexError, TypeError, ValueError):
            out.append(f"{what}: zarr.json does not describe a chunk grid")
            continue
        n_shards = -(-int(n_rows or 0) // shard_rows)
        gone = [s for s in range(n_shards) if _size(store, f"{path}/c/{s}/0") is None]
        if gone:
            out.append(
                f"{what}: shard file(s) {', '.join(f'c/{s}/0' for s in gone[:5])}"
                f"{' ...' if len(gone) > 5 else ''} missing below its {n_rows} committed rows"
            )
    return out
