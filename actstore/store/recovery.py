"""What a killed writer leaves behind, removed before the next writer starts.

A writer makes nothing visible until its commit (see :mod:`actstore.store.writer`),
so a process killed mid-batch leaves only files no reader looks at:

* feature parts written but not yet listed in ``feature_files``;
* shard files being written under a temporary name (``c/S/0.<uuid>.partial``, see
  :class:`actstore.store.shardio.ShardStream`), which are renamed into place whole.

:func:`recover` removes both; it runs with the store's write lock held (when a
writer is opened, and by :meth:`actstore.Store.recover`), so no live writer owns them.

Example
-------
>>> import tempfile, actstore
>>> recover(actstore.open(tempfile.mkdtemp(), create=True))
[]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actstore.store import shardio as _shardio
from actstore.store.format import FEATURES_DIR

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["recover"]


def recover(store: Store) -> list[str]:
    """Remove uncommitted feature parts and half-written shard files; return their paths.

    Example
    -------
    >>> recover(st)  # doctest: +SKIP
    ['features/run000001/sae000001/part-000000000300-b000007.parquet']
    """
    removed = _shard_temporaries(store)
    files = store.location.files(FEATURES_DIR)
    if not files:
        return removed
    known = set(store.catalog.read("SELECT path FROM feature_files").column("path").to_pylist())
    for rel in files:
        if rel not in known:
            store.location.remove(rel)
            removed.append(rel)
    return removed


def _shard_temporaries(store: Store) -> list[str]:
    if not store.location.is_local:  # remote stores are written through their own path
        return []
    root = store.location.local_path
    removed = []
    for p in sorted((root / "arrays").glob(f"run*/*/c/*/{_shardio.TEMPORARY_GLOB}")):
        p.unlink(missing_ok=True)
        removed.append(p.relative_to(root).as_posix())
    return removed
