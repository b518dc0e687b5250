"""actstore: an activation store and query engine for interpretability research.

Capture residual, attention, MLP and SAE feature activations of Hugging Face
models into a store of Zarr arrays, Parquet features and a DuckDB catalog, then
select rows with SQL and analyse them. Importing actstore also adds the named
queries and array functions (``actstore.queries``) to every store's SQL session.

Example
-------
>>> import tempfile, actstore
>>> st = actstore.open(tempfile.mkdtemp(), create=True)
>>> st.sql("SELECT count(*) FROM runs").fetchall()
[(0,)]
"""

__version__ = "0.1.0"

from actstore import queries
from actstore.errors import ActstoreError
from actstore.store import Acts, Result, Store, open

__all__ = ["Acts", "ActstoreError", "Result", "Store", "__version__", "open", "queries"]
