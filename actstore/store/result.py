"""Query results and activation slices, convertible the way DuckDB results are.

:class:`Result` wraps an Arrow table (results are materialised because the
catalog is attached only for the duration of a statement) and offers DuckDB's
verbs: ``.df()`` pandas, ``.pl()`` polars, ``.arrow()``, ``.fetchall()``.
:class:`Acts` is an activation slice: an (N, D) array with one metadata row
per activation row (run, prompt, position, token, labels).

Example
-------
>>> import pyarrow as pa
>>> r = Result(pa.table({"a": [1, 2]}))
>>> r.fetchall(), r.df().shape
([(1,), (2,)], (2, 1))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.errors import InputError

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import torch


class Result:
    """A materialised query result.

    Example
    -------
    >>> Result(pa.table({"x": [3]})).fetchone()
    (3,)
    """

    def __init__(self, table: pa.Table) -> None:
        self._table = table

    @property
    def columns(self) -> list[str]:
        """Column names."""
        return list(self._table.column_names)

    def __len__(self) -> int:
        return int(self._table.num_rows)

    def arrow(self) -> pa.Table:
        """The result as a ``pyarrow.Table``."""
        return self._table

    def df(self) -> pd.DataFrame:
        """The result as a pandas DataFrame."""
        return self._table.to_pandas()

    def pl(self) -> pl.DataFrame:
        """The result as a polars DataFrame."""
        import polars

        out = polars.from_arrow(self._table)
        assert isinstance(out, polars.DataFrame)
        return out

    def fetchall(self) -> list[tuple[Any, ...]]:
        """All rows as tuples."""
        cols = [c.to_pylist() for c in self._table.columns]
        return list(zip(*cols, strict=True)) if cols else []

    def fetchone(self) -> tuple[Any, ...] | None:
        """The first row, or None."""
        rows = Result(self._table.slice(0, 1)).fetchall()
        return rows[0] if rows else None

    def numpy(self) -> dict[str, np.ndarray]:
        """Columns as numpy arrays (DuckDB's ``fetchnumpy``)."""
        return {
            n: c.to_numpy(zero_copy_only=False)
            for n, c in zip(self.columns, self._table.columns, strict=True)
        }

    def __repr__(self) -> str:
        from actstore.store.render import render_table

        return render_table(self._table, max_rows=20)


class Acts:
    """An activation slice: ``values`` (N, D) with row metadata ``meta`` (N rows).

    Attributes
    ----------
    run, hook
        Where the rows come from.
    rows
        The rows' numbers in the run's arrays, aligned with ``values``.
    meta
        Arrow table, one row per activation row: the token (prompt_idx,
        position, token_id, token_text, position_role...) and its prompt's text
        and labels.
    values
        numpy array in the stored dtype (``ml_dtypes.bfloat16`` for bfloat16).
    head_layout
        ``(n_heads, d_head)`` for per-head hooks (``blocks.L.attn.hook_q/k/v/z``),
        whose columns are head-major; else None. See :meth:`heads`.

    Example
    -------
    >>> a = st.acts("backdoored/pairs", "blocks.2.hook_resid_post", where="position_role = 'last'")  # doctest: +SKIP
    >>> a.numpy().shape, a.df()["triggered"].mean()  # doctest: +SKIP
    """

    def __init__(
        self,
        run: str,
        hook: str,
        rows: np.ndarray,
        meta: pa.Table | Callable[[], pa.Table],
        values: np.ndarray,
        heads: Any = None,
    ) -> None:
        self.run = run
        self.hook = hook
        self.rows = rows
        # a callable is the store's metadata query, run on first use of ``meta``
        self._meta: pa.Table | Callable[[], pa.Table] = meta
        self.values = values
        self.head_layout: tuple[int, int] | None = tuple(heads) if heads else None

    def heads(self, dtype: Any = None) -> np.ndarray:
        """The values of a per-head hook as ``(N, H, d_head)`` (TransformerLens' layout).

        ``H`` is the number of query heads for ``hook_q`` / ``hook_z`` and of
        key-value heads for ``hook_k`` / ``hook_v`` (fewer under grouped-query attention).

        Raises
        ------
        InputError
            For a hook that is not per-head.

        Example
        -------
        >>> a = st.acts("main/p", "blocks.1.attn.hook_z", where="position_role = 'last'")  # doctest: +SKIP
        >>> a.shape, a.heads().shape  # doctest: +SKIP
        ((20, 32), (20, 4, 8))
        """
        if self.head_layout is None:
            raise InputError(
                f"hook {self.hook!r} of run {self.run!r} has no head layout; heads() is for "
                "per-head hooks (blocks.L.attn.hook_q, hook_k, hook_v, hook_z): use numpy()"
            )
        return self.numpy(dtype).reshape(len(self), *self.head_layout)

    @property
    def meta(self) -> pa.Table:
        """The rows' metadata (fetched from the catalog the first time it is asked for)."""
        if not isinstance(self._meta, pa.Table):
            self._meta = self._meta()
        return self._meta

    @meta.setter
    def meta(self, table: pa.Table) -> None:
        self._meta = table

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, D)."""
        return tuple(self.values.shape)

    def numpy(self, dtype: Any = None) -> np.ndarray:
        """The (N, D) values, optionally cast (e.g. ``np.float32``)."""
        return self.values if dtype is None else self.values.astype(dtype)

    def torch(self) -> torch.Tensor:
        """The values as a torch tensor (bfloat16 stays bfloat16)."""
        import torch

        if self.values.dtype.name == "bfloat16":
            return torch.from_numpy(self.values.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(self.values))

    def _value_columns(self) -> dict[str, np.ndarray]:
        vals = self.values
        if vals.dtype.name == "bfloat16":
            vals = vals.astype(np.float32)
        return {f"d{i}": vals[:, i] for i in range(vals.shape[1])}

    def arrow(self) -> pa.Table:
        """Metadata columns then one column per dimension (``d0``, ``d1``...)."""
        t = self.meta
        for name, col in self._value_columns().items():
            t = t.append_column(name, pa.array(col))
        return t

    def df(self) -> pd.DataFrame:
        """A pandas DataFrame: one row per token, metadata then ``d0..d{D-1}``."""
        import pandas as pd

        meta = self.meta.to_pandas()
        dims = pd.DataFrame(self._value_columns())
        return pd.concat([meta, dims], axis=1)

    def pl(self) -> pl.DataFrame:
        """A polars DataFrame, laid out as :meth:`df`."""
        import polars

        out = polars.from_arrow(self.arrow())
        assert isinstance(out, polars.DataFrame)
        return out

    def __repr__(self) -> str:
        return f"<Acts run={self.run!r} hook={self.hook!r} shape={self.shape} dtype={self.values.dtype}>"
