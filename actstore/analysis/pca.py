"""PCA of activation rows, streamed block by block so memory does not grow with the rows.

Rows come from a SQL predicate (:func:`actstore.analysis.rows.select`); columns
from one hook, several hooks side by side (``combine="concat"``), or each hook
on its own (``combine="separate"``).

Two algorithms, both reading the rows in blocks:

``exact``
    one pass accumulates ``X^T X`` and the column sums in float64 (after
    subtracting the first block's mean, so that a large common offset does not
    cancel catastrophically), then eigendecomposes the D x D covariance.
    Memory: a few D x D float64 matrices, so for widths up to a few thousand;
    time: 2 N D^2 flops (compute-bound on these 2-core machines: about 3 s for
    65536 rows of width 512).
``randomized``
    a streamed randomized range finder on the covariance operator
    (Halko, Martinsson & Tropp 2011): each pass computes ``C Q`` for a D x L
    block ``Q`` (L = k + oversampling) as ``sum_b B^T (B Q)`` minus the mean
    correction; ``n_iter`` power iterations sharpen the subspace and a final
    Rayleigh-Ritz step on ``Q^T C Q`` gives the components. Memory: D x L;
    time: ``n_iter + 2`` passes of 4 N D L flops each.

``method="auto"`` chooses exact up to ``exact_max_d`` columns. A last pass
projects every row on the components; the projections come back with the
rows' metadata (labels, positions) for plotting and SQL.

Explained variance is ``s_i^2 / (n - 1)`` for centred PCA (as sklearn) and
``s_i^2 / n`` without centring (the uncentred second moment); its ratio is
relative to the total (the trace). The result types, their assembly and storage
are in :mod:`actstore.analysis.pca_result`, shared with the Dask engine.

Example
-------
>>> res = pca(st, run="backdoored/pairs", hooks="blocks.2.hook_resid_post",
...           where="position_role = 'last'", k=5)  # doctest: +SKIP
>>> res.explained_variance_ratio[:2]  # doctest: +SKIP
>>> res.projections().to_pandas()[["triggered", "pc0"]].groupby("triggered").mean()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from actstore.analysis.pca_result import (
    PCAFit,
    PCAPlan,
    PCAResult,
    make_fit,
    pca_setup,
    save_pca,
    sign_fix,
)
from actstore.analysis.rows import Params, Selection

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["PCAFit", "PCAPlan", "PCAResult", "make_fit", "pca", "pca_setup", "save_pca"]


class _Moments:
    """Streamed column sums (after a shift) for the mean and the total variance."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(d)
        self.s2 = np.zeros(d)

    def shifted(self, block: np.ndarray, center: bool) -> np.ndarray:
        if self.shift is None:
            self.shift = block.mean(axis=0) if center else np.zeros(block.shape[1])
        b = block - self.shift if center else block
        self.n += b.shape[0]
        self.s1 += b.sum(axis=0)
        self.s2 += np.einsum("ij,ij->j", b, b)
        return b

    def apply(self, block: np.ndarray, center: bool) -> np.ndarray:
        return block - self.shift if center else block

    def mean(self) -> np.ndarray:
        assert self.shift is not None
        return self.shift + self.s1 / self.n

    def denom(self, center: bool) -> float:
        return float(self.n - 1) if center else float(self.n)

    def total(self, center: bool) -> float:
        diag = self.s2 - self.s1**2 / self.n if center else self.s2
        return float(diag.sum() / self.denom(center))


def _exact(
    sel: Selection,
    store: Store,
    hooks: Sequence[str],
    d: int,
    k: int,
    center: bool,
    block_rows: int | None,
) -> tuple[np.ndarray, np.ndarray, _Moments]:
    mom = _Moments(d)
    S_DD = np.zeros((d, d))
    for _, block in sel.blocks(store, hooks, block_rows=block_rows):
        b = mom.shifted(block, center)
        S_DD += b.T @ b
    if center:
        S_DD -= np.outer(mom.s1, mom.s1) / mom.n
    C_DD = S_DD / mom.denom(center)
    evals, evecs = np.linalg.eigh(C_DD)
    top = np.argsort(evals)[::-1][:k]
    return np.clip(evals[top], 0.0, None), evecs[:, top].T, mom


def _cov_times(
    sel: Selection,
    store: Store,
    hooks: Sequence[str],
    Q_DL: np.ndarray,
    center: bool,
    block_rows: int | None,
    mom: _Moments | None,
) -> tuple[np.ndarray, _Moments]:
    """C @ Q in one pass; the first pass (``mom`` None) also gathers the moments."""
    first = mom is None
    m = _Moments(Q_DL.shape[0]) if mom is None else mom
    Z_DL = np.zeros_like(Q_DL)
    for _, block in sel.blocks(store, hooks, block_rows=block_rows):
        b = m.shifted(block, center) if first else m.apply(block, center)
        Z_DL += b.T @ (b @ Q_DL)
    if center:
        Z_DL -= np.outer(m.s1, m.s1 @ Q_DL) / m.n
    return Z_DL / m.denom(center), m


def _randomized(
    sel: Selection,
    store: Store,
    hooks: Sequence[str],
    d: int,
    k: int,
    center: bool,
    block_rows: int | None,
    oversample: int,
    n_iter: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, _Moments]:
    n_cols = min(d, k + oversample)
    omega_DL = np.random.default_rng(seed).standard_normal((d, n_cols))
    Z_DL, mom = _cov_times(sel, store, hooks, omega_DL, center, block_rows, None)
    for _ in range(n_iter):
        Q_DL, _ = np.linalg.qr(Z_DL)
        Z_DL, _ = _cov_times(sel, store, hooks, Q_DL, center, block_rows, mom)
    # Rayleigh-Ritz on the span of the last iterate
    Q_DL, _ = np.linalg.qr(Z_DL)
    CQ_DL, _ = _cov_times(sel, store, hooks, Q_DL, center, block_rows, mom)
    T_LL = Q_DL.T @ CQ_DL
    evals, W = np.linalg.eigh((T_LL + T_LL.T) / 2)
    top = np.argsort(evals)[::-1][:k]
    return np.clip(evals[top], 0.0, None), (Q_DL @ W[:, top]).T, mom


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
) -> PCAResult:
    """Principal components of the activation rows a SQL predicate selects.

    Parameters
    ----------
    store
        The store.
    run
        Run name or id.
    hooks
        A hook, a list of hooks or a glob pattern (``"blocks.*.hook_resid_post"``).
    where, params
        SQL predicate over ``labeled_tokens`` choosing the rows, and its bound parameters.
    k
        Number of components.
    center
        Subtract the column means first (usual PCA); False gives the uncentred SVD.
    combine
        ``"separate"``: one PCA per hook; ``"concat"``: one PCA over the hooks' columns side by side.
    method
        ``"exact"`` (streamed covariance), ``"randomized"`` (streamed range finder) or
        ``"auto"`` (exact up to ``exact_max_d`` columns).
    oversample, n_iter, seed
        Randomized method: extra columns, power iterations, random seed.
    block_rows
        Rows read per block (default: about 64 MiB of float64); memory does not depend on the rows.
    project
        Also compute each row's projections (one more pass).
    name
        Analysis name (default ``pca:{run}``); components are stored as directions
        ``{name}/pc{i}/{hooks}`` and the mean as ``{name}/mean/{hooks}``.
    save
        Store the analysis and the directions in the catalog.
    replace
        Overwrite directions of the same names.

    Returns
    -------
    PCAResult

    Example
    -------
    >>> res = pca(st, run="r", hooks=["blocks.1.hook_resid_post"], where="position_role = 'last'", k=3)  # doctest: +SKIP
    >>> res.summary()  # doctest: +SKIP
    """
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
    )
    sel = plan.sel
    fits: dict[str, PCAFit] = {}
    for g in plan.groups:
        d = plan.widths[g]
        use = plan.method_for(g)
        if use == "exact":
            evals, V_KD, mom = _exact(sel, store, g, d, k, center, block_rows)
        else:
            evals, V_KD, mom = _randomized(
                sel, store, g, d, k, center, block_rows, oversample, n_iter, seed
            )
        V_KD = sign_fix(V_KD)
        mean = mom.mean()
        proj_NK = None
        if project:
            proj_NK = np.empty((sel.n, k))
            for sl, block in sel.blocks(store, g, block_rows=block_rows):
                proj_NK[sl] = ((block - mean) if center else block) @ V_KD.T
        fits["+".join(g)] = plan.fit(
            g,
            use,
            mean=mean,
            components=V_KD,
            evals=evals,
            total=mom.total(center),
            denom=mom.denom(center),
            projections=proj_NK,
        )
    return plan.finish(store, fits)
