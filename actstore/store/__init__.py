"""The on-disk format: a DuckDB catalog, Zarr arrays and Parquet feature parts.

``open`` and ``Store`` are the entry points; ``objects`` adds catalog objects,
``writer`` appends batches atomically. See ``docs/FORMAT.md``.
"""

from actstore.store.result import Acts, Result
from actstore.store.store import Store, open

__all__ = ["Acts", "Result", "Store", "open"]
