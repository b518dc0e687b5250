"""Sparse SAE feature activations: (row, feature, value) parts in Parquet.

An SAE's L0 is tens of features out of thousands, so only nonzeros are stored,
one Parquet part per committed flush of a (run, SAE), sorted by (row, feature),
zstd-compressed. A part is written under a temporary name and renamed into
place (in object storage: uploaded in one piece); it exists for readers only once the catalog's ``feature_files`` lists it,
which happens in the same transaction as the rows' tokens. Aggregates must count
the implicit zeros: see ``actstore.queries``.

Example
-------
>>> import tempfile, numpy as np
>>> root = tempfile.mkdtemp()
>>> rel, n_bytes, crc = write_part(root, run_id=1, sae_id=1, first_row=0,
...                  rows=np.array([0, 0, 2]), features=np.array([5, 9, 5]),
...                  values=np.array([1.0, 0.5, 2.0], np.float32))
>>> read_part(root, rel).num_rows
3
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.errors import InputError
from actstore.store.format import feature_dir_relpath
from actstore.store.location import Location
from actstore.store.part_check import checksum

#: Columns of every part. ``run_id`` and ``sae_id`` are constant within a part
#: (they cost nothing after dictionary encoding) so a glob of parts is self-describing.
SCHEMA = pa.schema(
    [
        ("run_id", pa.int32()),
        ("sae_id", pa.int32()),
        ("row", pa.int64()),
        ("feature", pa.int32()),
        ("value", pa.float32()),
    ]
)


def part_relpath(run_id: int, sae_id: int, first_row: int, first_batch: int = 0) -> str:
    """The path of the part that starts at ``first_row`` with batch ``first_batch``.

    Example
    -------
    >>> part_relpath(1, 2, 300, 7)
    'features/run000001/sae000002/part-000000000300-b000007.parquet'
    """
    return f"{feature_dir_relpath(run_id, sae_id)}/part-{first_row:012d}-b{first_batch:06d}.parquet"


def encode_part(
    *,
    run_id: int,
    sae_id: int,
    first_row: int,
    first_batch: int = 0,
    rows: np.ndarray,
    features: np.ndarray,
    values: np.ndarray,
) -> tuple[str, bytes]:
    """The path and the Parquet bytes of one part (what :func:`write_part` writes).

    The writer records ``len(data)`` and the crc32c of ``data`` in ``feature_files``
    (``actstore.store.part_check``).

    Example
    -------
    >>> rel, data = encode_part(run_id=1, sae_id=1, first_row=0, rows=np.array([0]),
    ...                         features=np.array([3]), values=np.array([1.0]))
    >>> rel, data[:4]
    ('features/run000001/sae000001/part-000000000000-b000000.parquet', b'PAR1')
    """
    rows = np.asarray(rows, np.int64)
    features = np.asarray(features, np.int32)
    values = np.asarray(values, np.float32)
    if not rows.shape == features.shape == values.shape or rows.ndim != 1:
        raise InputError(
            f"feature rows, features and values must be 1-D and equally long; got "
            f"{rows.shape}, {features.shape}, {values.shape}"
        )
    keep = values != 0
    rows, features, values = rows[keep], features[keep], values[keep]
    order = np.lexsort((features, rows))
    n = rows.size
    table = pa.table(
        {
            "run_id": pa.array(np.full(n, run_id, np.int32)),
            "sae_id": pa.array(np.full(n, sae_id, np.int32)),
            "row": pa.array(rows[order]),
            "feature": pa.array(features[order]),
            "value": pa.array(values[order]),
        },
        schema=SCHEMA,
    )
    import pyarrow.parquet as pq  # on first use: light commands do without

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", row_group_size=1 << 20)
    return part_relpath(run_id, sae_id, first_row, first_batch), buf.getvalue().to_pybytes()


def write_part(
    root: str | Path | Location,
    *,
    run_id: int,
    sae_id: int,
    first_row: int,
    first_batch: int = 0,
    rows: np.ndarray,
    features: np.ndarray,
    values: np.ndarray,
) -> tuple[str, int, int]:
    """Write one part atomically: its path relative to ``root``, its size and crc32c.

    Rows are global row numbers of the run. Zero values are dropped. ``first_batch``
    (the first batch the part commits) keeps names unique when a batch stores no rows.

    Example
    -------
    >>> import tempfile
    >>> write_part(tempfile.mkdtemp(), run_id=1, sae_id=1, first_row=0,
    ...            rows=np.array([0]), features=np.array([3]), values=np.array([1.0]))[0]
    'features/run000001/sae000001/part-000000000000-b000000.parquet'
    """
    rel, data = encode_part(
        run_id=run_id,
        sae_id=sae_id,
        first_row=first_row,
        first_batch=first_batch,
        rows=rows,
        features=features,
        values=values,
    )
    with Location.parse(root).open_output(rel) as f:
        f.write(data)
    return rel, len(data), checksum(data)


def record_parts(con: Any, parts: Sequence[Sequence[Any]]) -> None:
    """Insert committed parts into ``feature_files``, with their size and crc32c.

    Each entry is ``(run_id, sae_id, path, first_row, n_rows, n_nonzero, n_bytes,
    crc32c)``, in the caller's catalog transaction. A catalog made before part
    checksums were recorded gains their columns here.

    Example
    -------
    >>> record_parts(con, [(1, 1, rel, 0, 128, 40, n_bytes, crc)])  # doctest: +SKIP
    """
    con.execute("ALTER TABLE feature_files ADD COLUMN IF NOT EXISTS n_bytes BIGINT")
    con.execute("ALTER TABLE feature_files ADD COLUMN IF NOT EXISTS crc32c BIGINT")
    con.executemany(
        "INSERT INTO feature_files (run_id, sae_id, path, first_row, n_rows, "
        "n_nonzero, n_bytes, crc32c) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [list(p) for p in parts],
    )


def read_part(root: str | Path | Location, relpath: str) -> pa.Table:
    """Read one part.

    Example
    -------
    >>> import tempfile
    >>> r = tempfile.mkdtemp()
    >>> rel, _, _ = write_part(r, run_id=1, sae_id=1, first_row=0, rows=np.array([1]),
    ...                        features=np.array([2]), values=np.array([3.0]))
    >>> read_part(r, rel).column("feature").to_pylist()
    [2]
    """
    import pyarrow.parquet as pq

    loc = Location.parse(root)
    if loc.is_local:
        return pq.read_table(loc.path(relpath), schema=SCHEMA)
    with loc.fs.open(loc.path(relpath), "rb") as f:
        return pq.read_table(f, schema=SCHEMA)
