"""Analyses on Dask: PCA/SVD and contrast statistics over ``dask.array`` views of a run's arrays.

The in-process analyses (:mod:`actstore.analysis.pca`, :mod:`~actstore.analysis.contrast`)
stream blocks through one process. Here the same computations are expressed on
a ``dask.array`` view of the Zarr arrays, so that the blocks are read and
reduced by Dask workers: threads of this process by default, a
``dask.distributed.LocalCluster``, or any cluster a ``distributed.Client``
points at (the workers must see the store: its directory on a shared file
system, or its ``s3://``/``gs://`` URL; they read the Zarr chunks themselves, and
only D x D partial sums travel).

The view (:func:`to_dask`) is built the way every analysis picks rows: SQL over
``labeled_tokens`` chooses the rows (a :class:`~actstore.analysis.rows.Selection`,
bounded by the committed ``n_rows``), then ``dask.array.from_zarr`` over the
committed rows ``[:n_rows]`` is indexed by that row index and converted to float
block by block. The tasks use only numpy, zarr and dask, so workers start fast and
need neither actstore nor torch.

:func:`pca` takes the same parameters as :func:`actstore.analysis.pca.pca` plus
``engine`` and ``client``, and returns the same :class:`~actstore.analysis.pca.PCAResult`
(stored the same way). ``exact`` accumulates ``X^T X`` and the column sums in one
pass after a shift by the first block's mean; ``randomized`` runs the same streamed
range finder with the same random start. :func:`contrast_stats` gives the class
means, the between/within variance ratio and the mean-difference direction of
:func:`~actstore.analysis.contrast.contrast` (unpaired; the probes and AUROCs stay
in-process) from one pass of per-class sums. Both equal the in-process results
within float64 rounding.

Example
-------
>>> from distributed import Client, LocalCluster
>>> from actstore.analysis import dask as adask
>>> with Client(LocalCluster(n_workers=2, threads_per_worker=1)) as client:  # doctest: +SKIP
...     res = adask.pca(st, run="backdoored/pairs", hooks="blocks.2.hook_resid_post", k=5,
...                     client=client)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import ml_dtypes
import numpy as np

from actstore.analysis.pca import pca as local_pca
from actstore.analysis.pca_result import PCAFit, PCAResult, pca_setup, sign_fix
from actstore.analysis.rows import (
    Params,
    RunInfo,
    Selection,
    default_block_rows,
    resolve_hooks,
    run_info,
    select,
)
from actstore.errors import ActstoreError, InputError, SpecError

if TYPE_CHECKING:
    import dask.array as da

    from actstore.store.store import Store

Engine = Literal["dask", "local"]
"""``dask``: compute on Dask; ``local``: the in-process streamed implementation."""


class MissingDependencyError(ActstoreError, ImportError):
    """An optional dependency (here Dask) is not installed."""


def _dask_array_module() -> Any:
    try:
        import dask.array
    except ImportError as e:  # pragma: no cover - dask is installed where this is tested
        raise MissingDependencyError(
            "the dask engine needs Dask: pip install 'dask[array]' distributed "
            "(or pass engine='local')"
        ) from e
    return dask.array


def local_client(n_workers: int = 2, threads_per_worker: int = 1, **cluster: Any) -> Any:
    """A ``distributed.Client`` on a new ``LocalCluster`` of worker processes (close it after).

    Parameters
    ----------
    n_workers, threads_per_worker
        Worker processes and threads in each.
    **cluster
        Other ``LocalCluster`` arguments (``memory_limit``, ``dashboard_address``...).

    Example
    -------
    >>> with local_client(2) as client:  # doctest: +SKIP
    ...     pca(st, run="r", hooks="blocks.1.hook_resid_post", k=3, client=client)
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError(
            "a local Dask cluster needs dask.distributed: pip install distributed"
        ) from e
    opts = {
        "processes": True,
        "dashboard_address": None,
        "silence_logs": logging.WARNING,
        **cluster,
    }
    before = dict(os.environ)
    try:
        local = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **opts)
    finally:  # each nanny sets its workers' variables (distributed.nanny.pre-spawn-environ:
        # MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS=1...) in this process's environment; they
        # would reach every process it starts later (an ingest with one thread)
        os.environ.clear()
        os.environ.update(before)
    return Client(local)


def _compute(client: Any, *xs: Any) -> tuple[Any, ...]:
    import dask

    if client is None:
        return tuple(dask.compute(*xs))
    return tuple(dask.compute(*xs, scheduler=client))


def _view(
    store: Store,
    info: RunInfo,
    hooks: Sequence[str],
    rows: np.ndarray,
    block_rows: int | None,
    dtype: Any,
) -> da.Array:
    dam = _dask_array_module()
    n = min(int(info.row(h)["n_rows"]) for h in hooks)
    chunk = max(int(info.row(h)["chunk_rows"]) for h in hooks)
    if block_rows is None:  # whole Zarr chunks per Dask block
        step = default_block_rows(sum(info.width(h) for h in hooks))
        step = max(chunk, step // chunk * chunk)
    elif int(block_rows) < 1:
        raise InputError(f"block_rows must be a positive number of rows, not {block_rows}")
    else:
        step = int(block_rows)
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise InputError(f"rows outside the {n} committed rows of run {info.name!r}")
    contiguous = rows.size == 0 or int(rows[-1]) - int(rows[0]) + 1 == rows.size
    cols = []
    for h in hooks:
        meta = info.row(h)
        loc = store.location  # a path, or an fsspec URL each worker opens itself
        x = dam.from_zarr(
            loc.url_for(meta["path"]),
            storage_options=dict(loc.storage_options) or None,
            chunks=(step, int(meta["d"])),
        )[:n]
        if contiguous:
            x = x[int(rows[0]) : int(rows[0]) + rows.size] if rows.size else x[:0]
        else:
            x = x[rows]
        if meta["dtype"] == "bfloat16":  # stored as its uint16 bits
            x = x.view(ml_dtypes.bfloat16)
        # plain numpy casts (not actstore's torch path): workers then import only
        # numpy, zarr and dask, and the cast costs little next to the D x D products
        cols.append(x.astype(np.dtype(dtype)))
    return cols[0] if len(cols) == 1 else dam.concatenate(cols, axis=1)


def to_dask(
    store: Store,
    *,
    run: str | int,
    hooks: str | Sequence[str],
    where: str | None = None,
    params: Params = None,
    dtype: Any = np.float64,
    block_rows: int | None = None,
) -> tuple[da.Array, Selection]:
    """A lazy ``(N, D)`` Dask array of the rows a SQL predicate selects, and the selection.

    Several hooks are placed side by side. Nothing is read until the array is computed.

    Parameters
    ----------
    run, hooks, where, params
        As for every analysis: the run, hook(s) or a glob, and the SQL predicate over
        ``labeled_tokens`` with its bound parameters.
    dtype
        Float dtype of the blocks (stored float16/bfloat16 are converted blockwise).
    block_rows
        Rows per Dask block (default: about 64 MiB of float64, in whole Zarr chunks).

    Example
    -------
    >>> X, sel = to_dask(st, run="r", hooks="blocks.1.hook_resid_post", where="triggered")  # doctest: +SKIP
    >>> X.mean(axis=0).compute().shape  # doctest: +SKIP
    (64,)
    """
    info = run_info(store, run)
    hook_list = resolve_hooks(store, info, hooks)
    sel = select(store, run=info, where=where, params=params, hooks=hook_list)
    return _view(store, info, hook_list, sel.rows, block_rows, dtype), sel


# -- PCA -------------------------------------------------------------------------------


@dataclass
class _Stats:
    n: int
    shift: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    center: bool

    @property
    def denom(self) -> float:
        return float(self.n - 1) if self.center else float(self.n)

    @property
    def mean(self) -> np.ndarray:
        return self.shift + self.s1 / self.n

    @property
    def total(self) -> float:
        diag = self.s2 - self.s1**2 / self.n if self.center else self.s2
        return float(diag.sum() / self.denom)


def _shifted(X: da.Array, center: bool, client: Any) -> tuple[da.Array, np.ndarray]:
    """X minus the first block's mean (so a large common offset does not cancel)."""
    if not center:
        return X, np.zeros(X.shape[1])
    (shift,) = _compute(client, X[: X.chunks[0][0]].mean(axis=0))
    return X - shift, np.asarray(shift, np.float64)


def _exact(X: da.Array, k: int, center: bool, client: Any) -> tuple[np.ndarray, np.ndarray, _Stats]:
    Xs, shift = _shifted(X, center, client)
    S_DD, s1 = _compute(client, Xs.T @ Xs, Xs.sum(axis=0))
    st = _Stats(X.shape[0], shift, np.asarray(s1), np.diag(S_DD).copy(), center)
    if center:
        S_DD = S_DD - np.outer(s1, s1) / st.n
    evals, evecs = np.linalg.eigh(S_DD / st.denom)
    top = np.argsort(evals)[::-1][:k]
    return np.clip(evals[top], 0.0, None), evecs[:, top].T, st


def _randomized(
    X: da.Array, k: int, center: bool, oversample: int, n_iter: int, seed: int, client: Any
) -> tuple[np.ndarray, np.ndarray, _Stats]:
    d = X.shape[1]
    omega_DL = np.random.default_rng(seed).standard_normal((d, min(d, k + oversample)))
    Xs, shift = _shifted(X, center, client)
    Z_DL, s1, s2 = _compute(client, Xs.T @ (Xs @ omega_DL), Xs.sum(axis=0), (Xs**2).sum(axis=0))
    st = _Stats(X.shape[0], shift, np.asarray(s1), np.asarray(s2), center)

    def cov_times(Q_DL: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        Z = raw if raw is not None else _compute(client, Xs.T @ (Xs @ Q_DL))[0]
        if center:
            Z = Z - np.outer(st.s1, st.s1 @ Q_DL) / st.n
        return np.asarray(Z / st.denom)

    Z_DL = cov_times(omega_DL, Z_DL)
    for _ in range(n_iter):
        Z_DL = cov_times(np.linalg.qr(Z_DL)[0])
    Q_DL, _ = np.linalg.qr(Z_DL)
    T_LL = Q_DL.T @ cov_times(Q_DL)
    evals, W = np.linalg.eigh((T_LL + T_LL.T) / 2)
    top = np.argsort(evals)[::-1][:k]
    return np.clip(evals[top], 0.0, None), (Q_DL @ W[:, top]).T, st


def pca(
    store: Store,
    *,
    run: str | int,
    hooks: str | Sequence[str],
    where: str | None = None,
    params: Params = None,
    k: int = 10,
    center: bool = True,
    combine: Literal["concat", "separate"] = "separate",
    method: Literal["auto", "exact", "randomized"] = "auto",
    exact_max_d: int = 4096,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    block_rows: int | None = None,
    project: bool = True,
    name: str | None = None,
    save: bool = True,
    replace: bool = False,
    engine: Engine = "dask",
    client: Any = None,
) -> PCAResult:
    """:func:`actstore.analysis.pca.pca` computed on Dask (or in-process with ``engine="local"``).

    Parameters
    ----------
    store, run, hooks, where, params, k, center, combine, method, exact_max_d, oversample, n_iter, seed, project, name, save, replace
        As for :func:`actstore.analysis.pca.pca`.
    block_rows
        Rows per Dask block (a task reads and reduces one block).
    engine
        ``"dask"`` (default) or ``"local"`` (the in-process implementation).
    client
        A ``distributed.Client`` (e.g. :func:`local_client`) or a Dask scheduler name
        (``"threads"``, ``"synchronous"``); None: Dask's default (the active
        distributed client if there is one, else threads).

    Returns
    -------
    PCAResult
        As the in-process PCA (``params["engine"]`` records the engine).

    Example
    -------
    >>> res = pca(st, run="r", hooks="blocks.2.hook_resid_post", k=3, client=client)  # doctest: +SKIP
    >>> res.explained_variance_ratio  # doctest: +SKIP
    """
    if engine == "local":
        return local_pca(
            store,
            run=run,
            hooks=hooks,
            where=where,
            params=params,
            k=k,
            center=center,
            combine=combine,
            method=method,
            exact_max_d=exact_max_d,
            oversample=oversample,
            n_iter=n_iter,
            seed=seed,
            block_rows=block_rows,
            project=project,
            name=name,
            save=save,
            replace=replace,
        )
    if engine != "dask":
        raise SpecError(f"engine must be 'dask' or 'local', not {engine!r}")
    plan = pca_setup(
        store,
        run=run,
        hooks=hooks,
        where=where,
        params=params,
        k=k,
        center=center,
        combine=combine,
        method=method,
        exact_max_d=exact_max_d,
        oversample=oversample,
        n_iter=n_iter,
        seed=seed,
        block_rows=block_rows,
        project=project,
        name=name,
        save=save,
        replace=replace,
        engine="dask",
    )
    fits: dict[str, PCAFit] = {}
    for g in plan.groups:
        X = _view(store, plan.info, g, plan.sel.rows, block_rows, np.float64)
        use = plan.method_for(g)
        if use == "exact":
            evals, V_KD, st = _exact(X, k, center, client)
        else:
            evals, V_KD, st = _randomized(X, k, center, oversample, n_iter, seed, client)
        V_KD = sign_fix(V_KD)
        mean = st.mean
        proj_NK = None
        if project:
            (proj_NK,) = _compute(client, ((X - mean) if center else X) @ V_KD.T)
        fits["+".join(g)] = plan.fit(
            g,
            use,
            mean=mean,
            components=V_KD,
            evals=evals,
            total=st.total,
            denom=st.denom,
            projections=None if proj_NK is None else np.asarray(proj_NK),
        )
    # stored exactly as the in-process PCA stores its result
    return plan.finish(store, fits, engine="dask")


def __getattr__(name: str) -> Any:
    # contrast statistics live in their own module; reachable here as part of this API
    if name in ("ContrastStatsLayer", "ContrastStatsResult", "contrast_stats"):
        from actstore.analysis import dask_contrast

        return getattr(dask_contrast, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
