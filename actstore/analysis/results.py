"""Stored results: directions and analysis records in the catalog, with how they were made.

Every analysis writes one row to ``analyses`` (its kind, parameters, a JSON
summary of its result, and provenance: the SQL predicate and bound parameters,
the runs, row counts, block size, library versions and the catalog's commit
sequence number at the time) and, where it finds directions, rows to
``directions`` that point back at that analysis. Edits and later analyses load
directions by name with :func:`load_direction`.

Example
-------
>>> d = load_direction(st, "trigger/mean_diff/blocks.2.hook_resid_post")  # doctest: +SKIP
>>> d.vector.shape, d.method, d.analysis_id  # doctest: +SKIP
((64,), 'mean_diff', 3)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa

from actstore.errors import InputError, NotFoundError, SpecError
from actstore.store import objects
from actstore.store.ids import as_id

if TYPE_CHECKING:
    from actstore.store.store import Store


def jsonable(obj: Any) -> Any:
    """Convert numpy values, tuples and non-finite floats to plain JSON values (NaN -> None).

    Example
    -------
    >>> jsonable({"a": np.float32(0.5), "b": (1, float("nan")), "c": np.arange(2)})
    {'a': 0.5, 'b': [1, None], 'c': [0, 1]}
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, pa.Table):
        return jsonable(obj.to_pylist())
    return obj


def versions() -> dict[str, str]:
    """Versions of the libraries an analysis result depends on.

    Example
    -------
    >>> sorted(versions())[:2]
    ['actstore', 'numpy']
    """
    from importlib import metadata

    import actstore

    out = {"actstore": actstore.__version__, "numpy": np.__version__}
    for key, dist in (("scipy", "scipy"), ("sklearn", "scikit-learn"), ("torch", "torch")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - all are dependencies
            out[key] = "not installed"
    return out


def provenance(
    store: Store,
    *,
    runs: Mapping[str, int],
    where: str | None,
    params: Any = None,
    n_rows: int | Mapping[str, int] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The provenance record stored with an analysis.

    Parameters
    ----------
    runs
        Run name -> run id of every run read.
    where, params
        The SQL predicate that chose the rows and its bound parameters.
    n_rows
        Rows used (a count, or counts by role: ``{"train": .., "test": ..}``).
    extra
        Anything else that determines the result (block size, seeds...).

    Example
    -------
    >>> provenance(st, runs={"r": 1}, where="triggered", n_rows=10)["where"]  # doctest: +SKIP
    'triggered'
    """
    seq = store.sql("SELECT value FROM meta WHERE key = 'commit_seq'").fetchall()
    return jsonable(
        {
            "runs": dict(runs),
            "run_ids": sorted(set(runs.values())),
            "where": where,
            "sql_params": params,
            "n_rows": n_rows,
            "store": str(store.root),
            "commit_seq": int(seq[0][0]) if seq else None,
            "versions": versions(),
            **extra,
        }
    )


def check_names_free(store: Store, names: Iterable[str], *, replace: bool) -> None:
    """Fail early (before computing) if a direction name is taken and ``replace`` is off.

    Example
    -------
    >>> check_names_free(st, ["trigger/mean_diff/h"], replace=False)  # doctest: +SKIP
    """
    wanted = list(names)
    if replace or not wanted:
        return
    taken = {r[0] for r in store.sql("SELECT name FROM directions").fetchall()}
    clash = [n for n in wanted if n in taken]
    if clash:
        raise InputError(
            f"direction name(s) {clash} already exist in the store; pass another name= or "
            "replace=True to overwrite them"
        )


def save_analysis(
    store: Store,
    *,
    name: str,
    kind: str,
    params: Mapping[str, Any],
    result: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> int:
    """Store an analysis record (values made JSON-safe); return its ``analysis_id``.

    Example
    -------
    >>> save_analysis(st, name="x", kind="pca", params={}, result={}, provenance={})  # doctest: +SKIP
    1
    """
    return objects.add_analysis(
        store,
        name=name,
        kind=kind,
        params=jsonable(params),
        result=jsonable(result),
        provenance=jsonable(provenance),
    )


def save_direction(
    store: Store,
    *,
    name: str,
    vector: np.ndarray,
    hook: str,
    method: str,
    run_id: int | None,
    analysis_id: int | None,
    params: Mapping[str, Any],
    replace: bool,
) -> int:
    """Store one direction (JSON-safe params); return its ``direction_id``.

    Example
    -------
    >>> save_direction(st, name="d", vector=np.ones(4), hook="h", method="mean_diff",
    ...                run_id=1, analysis_id=1, params={}, replace=False)  # doctest: +SKIP
    1
    """
    return objects.add_direction(
        store,
        name=name,
        vector=np.asarray(vector, np.float64),
        hook=hook,
        method=method,
        run_id=run_id,
        analysis_id=analysis_id,
        params=jsonable(params),
        replace=replace,
    )


@dataclass(frozen=True, slots=True, eq=False)
class Direction:
    """A stored direction and how it was made."""

    name: str
    """Unique name in the store."""
    vector: np.ndarray
    """The (D,) vector as stored (not necessarily unit length)."""
    hook: str
    """The hook whose activations it lives in (``""`` if unknown)."""
    method: str
    """How it was made (``mean_diff``, ``logistic``, ``pca``...)."""
    run_id: int | None
    """The run it was fitted on."""
    analysis_id: int | None
    """The analysis that made it."""
    params: dict[str, Any]
    """The method's parameters and scores."""

    @property
    def unit(self) -> np.ndarray:
        """The vector scaled to unit length.

        Example
        -------
        >>> Direction("d", np.array([3.0, 4.0]), "", "", None, None, {}).unit.tolist()
        [0.6, 0.8]
        """
        return self.vector / np.linalg.norm(self.vector)


def load_direction(store: Store, name: str) -> Direction:
    """Load a stored direction by name (the error lists the stored ones).

    Example
    -------
    >>> load_direction(st, "trigger/mean_diff/blocks.2.hook_resid_post").hook  # doctest: +SKIP
    'blocks.2.hook_resid_post'
    """
    vec, rec = objects.get_direction(store, name)
    params = rec.get("params")
    return Direction(
        name=str(rec["name"]),
        vector=vec,
        hook=str(rec.get("hook") or ""),
        method=str(rec.get("method") or ""),
        run_id=rec.get("run_id"),
        analysis_id=rec.get("analysis_id"),
        params=json.loads(params) if isinstance(params, str) else dict(params or {}),
    )


def resolve_vectors(
    store: Store | None, direction: str | Direction | np.ndarray | Sequence[Any]
) -> list[tuple[str, np.ndarray, str]]:
    """(label, vector, hook) for a direction given by name, :class:`Direction`, array or a list.

    A 2-D array is several directions (one per row).

    Example
    -------
    >>> resolve_vectors(None, np.eye(2))[1][0]
    'v1'
    """
    if isinstance(direction, Direction):
        return [(direction.name, direction.vector, direction.hook)]
    if isinstance(direction, str):
        if store is None:
            raise InputError(f"direction {direction!r} is a stored name; pass the store too")
        d = load_direction(store, direction)
        return [(d.name, d.vector, d.hook)]
    if isinstance(direction, np.ndarray):
        arr = np.asarray(direction, np.float64)
        if arr.ndim == 1:
            return [("v0", arr, "")]
        if arr.ndim == 2:
            return [(f"v{i}", row, "") for i, row in enumerate(arr)]
        raise InputError(f"a direction array must be (D,) or (K, D), not {arr.shape}")
    out: list[tuple[str, np.ndarray, str]] = []
    for i, item in enumerate(direction):
        got = resolve_vectors(store, item)
        if isinstance(item, np.ndarray) and item.ndim == 1:
            got = [(f"v{i}", got[0][1], "")]
        out.extend(got)
    return out


def list_directions(store: Store) -> pa.Table:
    """Every stored direction without its vector: name, hook, d, method, run, analysis.

    Example
    -------
    >>> list_directions(st).column_names[:3]  # doctest: +SKIP
    ['direction_id', 'name', 'hook']
    """
    return store.sql(
        "SELECT direction_id, name, hook, d, method, run_id, analysis_id, params, created_at "
        "FROM directions ORDER BY direction_id"
    ).arrow()


@dataclass(frozen=True, slots=True)
class AnalysisRecord:
    """A stored analysis: what was computed, with which parameters, from what."""

    analysis_id: int
    """Key."""
    name: str
    """The name given (not unique: re-running keeps the earlier record)."""
    kind: str
    """``pca``, ``contrast``, ``reward_correlation``, ``checkpoint_diff``, ``unembed``, ``sae_decompose``."""
    params: dict[str, Any]
    """The entry function's parameters."""
    result: dict[str, Any]
    """The result's ``to_dict()``."""
    provenance: dict[str, Any]
    """Rows, runs, SQL, versions."""


def get_analysis(store: Store, name_or_id: str | int) -> AnalysisRecord:
    """The latest analysis record of a name (or the one with an id).

    Example
    -------
    >>> get_analysis(st, "trigger").result["layers"][0]["auroc"]  # doctest: +SKIP
    """
    if as_id(name_or_id) is not None:
        rows = store.sql(
            "SELECT * FROM analyses WHERE analysis_id = ?", [as_id(name_or_id)]
        ).arrow()
    else:
        rows = store.sql(
            "SELECT * FROM analyses WHERE name = ? ORDER BY analysis_id DESC LIMIT 1", [name_or_id]
        ).arrow()
    if rows.num_rows == 0:
        names = sorted({r[0] for r in store.sql("SELECT name FROM analyses").fetchall()})
        raise NotFoundError(f"analysis {name_or_id!r} not in the store; stored analyses: {names}")
    r = rows.to_pylist()[0]
    return AnalysisRecord(
        analysis_id=int(r["analysis_id"]),
        name=str(r["name"]),
        kind=str(r["kind"]),
        params=json.loads(r["params"] or "{}"),
        result=json.loads(r["result"] or "{}"),
        provenance=json.loads(r["provenance"] or "{}"),
    )


def list_analyses(store: Store, kind: str | None = None) -> pa.Table:
    """Stored analyses (id, name, kind, created_at), optionally of one kind.

    Example
    -------
    >>> list_analyses(st, "contrast").num_rows  # doctest: +SKIP
    """
    if kind is None:
        return store.sql(
            "SELECT analysis_id, name, kind, created_at FROM analyses ORDER BY analysis_id"
        ).arrow()
    return store.sql(
        "SELECT analysis_id, name, kind, created_at FROM analyses WHERE kind = ? "
        "ORDER BY analysis_id",
        [kind],
    ).arrow()


class _PerHook(Protocol):
    @property
    def hook(self) -> str: ...


H = TypeVar("H", bound=_PerHook)


def layer_of(layers: Sequence[H], hook: str | None, what: str) -> H:
    """The entry of ``hook`` among a result's per-hook ``layers`` (default: the only one).

    ``what`` names the result in errors (``"this contrast"``).

    Example
    -------
    >>> from types import SimpleNamespace as NS
    >>> layer_of([NS(hook="a"), NS(hook="b")], "b", "this result").hook
    'b'
    """
    if hook is None:
        if len(layers) != 1:
            raise SpecError(f"{what} covers {len(layers)} hooks; pass hook=")
        return layers[0]
    for entry in layers:
        if entry.hook == hook:
            return entry
    raise SpecError(f"hook {hook!r} not in {what}; it has {[e.hook for e in layers]}")
