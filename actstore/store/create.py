"""Creating a local store atomically: built in a hidden sibling directory, then renamed.

A store is a store once its marker exists; :func:`create_local` makes the whole
directory appear at once, so a creation killed at any point leaves no half-made
store where the store goes.

Example
-------
>>> import tempfile, pathlib, actstore
>>> root = pathlib.Path(tempfile.mkdtemp()) / "s"
>>> st = actstore.open(root, create=True)  # uses create_local
>>> sorted(p.name for p in root.iterdir())[:2]
['actstore.json', 'catalog.duckdb']
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from actstore.errors import NotAStoreError
from actstore.store.format import CATALOG, MARKER
from actstore.store.location import Location
from actstore.store.writer import WriteLock

__all__ = ["create_local"]

#: What a store whose creation was killed can hold (an empty catalog, no marker).
HALF_MADE = frozenset({CATALOG, CATALOG + ".wal", WriteLock.FILE})


def create_local(root: Path, init: Callable[[Location], None]) -> None:
    """Create the store at ``root`` atomically: built in a sibling directory, then renamed.

    ``init`` writes an empty store (catalog, then marker) into a directory. A kill
    at any point leaves either no store (and at most a hidden sibling
    ``.NAME.creating-PID-*``, removed by the next creation once its process is
    gone) or a whole one. A directory holding only what an older, killed creation
    left (an empty catalog without the marker) is finished the same way.
    """
    if root.is_file():
        raise NotAStoreError(f"{root} is a file; a store needs a directory path")
    if root.is_dir():
        left = {p.name for p in root.iterdir()}
        if left and not left <= HALF_MADE:
            raise NotAStoreError(
                f"{root} is a non-empty directory that is not a store; choose a new or "
                "empty directory for the store"
            )
        for name in left:  # a killed creation's empty catalog: made again below
            (root / name).unlink()
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(f".{root.name}.creating-*"):
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = parent / f".{root.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if root.is_symlink():  # renaming onto it would replace the link, not its target
            raise PermissionError
        tmp.mkdir()
    except PermissionError:  # the parent is not ours to write, the (empty) directory may be
        if not root.is_dir():
            raise
        init(Location.parse(root))
        return
    try:
        init(Location.parse(tmp))
        try:
            os.rename(tmp, root)  # replaces an empty directory; fails on a non-empty one
        except OSError:
            if not (root / MARKER).exists():  # not another process's new store
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host).

    Example
    -------
    >>> alive(os.getpid())
    True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
