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
relative to the total (the trace).

Example
-------
>>> res = pca(st, run="backdoored/pairs", hooks="blocks.2.hook_resid_post",
...           where="position_role = 'last'", k=5)  # doctest: +SKIP
>>> res.explained_variance_ratio[:2]  # doctest: +SKIP
>>> res.projections().to_pandas()[["triggered", "pc0"]].groupby("triggered").mean()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from actstore.analysis.results import (
    check_names_free,
    jsonable,
    provenance,
    save_analysis,
    save_direction,
)
from actstore.analysis.rows import (
    Params,
    RunInfo,
    Selection,
    require_rows,
    resolve_hooks,
    run_info,
    select,
)
from actstore.errors import SpecError

if TYPE_CHECKING:
    from actstore.store.store import Store


@dataclass(frozen=True, slots=True, eq=False)
class PCAFit:
    """The principal components of one column space (one hook, or several concatenated)."""

    hooks: tuple[str, ...]
    """The hooks whose columns were analysed (side by side when several)."""
    method: str
    """``exact`` or ``randomized``."""
    n: int
    """Rows used."""
    mean: np.ndarray
    """(D,) column means (zeros-free: the actual mean, centred or not)."""
    components: np.ndarray
    """(K, D) unit principal directions, largest first; each signed so its largest entry is positive."""
    explained_variance: np.ndarray
    """(K,) variance along each component."""
    explained_variance_ratio: np.ndarray
    """(K,) share of the total variance."""
    singular_values: np.ndarray
    """(K,) singular values of the (centred) row matrix."""
    total_variance: float
    """Trace of the covariance (or second moment, uncentred)."""
    projections: np.ndarray | None
    """(N, K) projections of the rows (after centring, if centred), or None."""
    direction_names: tuple[str, ...] = ()
    """Names of the stored components, if saved."""

    @property
    def label(self) -> str:
        """The hooks joined by ``+``."""
        return "+".join(self.hooks)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (no projections; components as direction names when stored).

        Example
        -------
        >>> fit.to_dict()["explained_variance_ratio"][:2]  # doctest: +SKIP
        """
        return {
            "hooks": list(self.hooks),
            "method": self.method,
            "n": self.n,
            "explained_variance": self.explained_variance.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "singular_values": self.singular_values.tolist(),
            "total_variance": self.total_variance,
            "direction_names": list(self.direction_names),
        }


@dataclass(frozen=True, slots=True, eq=False)
class PCAResult:
    """PCA fits (one per hook, or one over concatenated hooks) with the rows' projections."""

    name: str
    """The analysis name."""
    run: str
    """The run analysed."""
    where: str | None
    """The SQL predicate that chose the rows."""
    fits: dict[str, PCAFit]
    """Fit per column space, keyed by :attr:`PCAFit.label`."""
    meta: pa.Table
    """Row metadata (one row per analysed row)."""
    center: bool
    """Whether the rows were centred."""
    analysis_id: int | None = None
    """The stored analysis, if saved."""
    params: dict[str, Any] = field(default_factory=dict)
    """The parameters of the call."""

    def fit(self, hook: str | None = None) -> PCAFit:
        """The fit of ``hook`` (its label), or the only one.

        Example
        -------
        >>> res.fit().components.shape  # doctest: +SKIP
        (10, 64)
        """
        if hook is None:
            if len(self.fits) != 1:
                raise SpecError(f"this PCA has several fits {list(self.fits)}; pass hook=")
            return next(iter(self.fits.values()))
        if hook not in self.fits:
            raise SpecError(f"no PCA fit for {hook!r}; fits: {list(self.fits)}")
        return self.fits[hook]

    @property
    def components(self) -> np.ndarray:
        """(K, D) components of the only fit."""
        return self.fit().components

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """(K,) explained variance ratio of the only fit."""
        return self.fit().explained_variance_ratio

    def projections(
        self, hook: str | None = None, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Row metadata plus ``pc0..pc{K-1}``: each row's coordinates on the components.

        Parameters
        ----------
        hook
            Which fit (default: the only one).
        columns
            Metadata columns to keep (default: all).

        Example
        -------
        >>> res.projections(columns=["prompt_idx", "triggered"]).to_pandas().head()  # doctest: +SKIP
        """
        f = self.fit(hook)
        if f.projections is None:
            raise SpecError("projections were not computed; call pca(..., project=True)")
        t = self.meta if columns is None else self.meta.select(list(columns))
        for i in range(f.projections.shape[1]):
            t = t.append_column(f"pc{i}", pa.array(f.projections[:, i]))
        return t

    def summary(self) -> pa.Table:
        """One row per (fit, component): explained variance, its ratio and the cumulative ratio.

        Example
        -------
        >>> res.summary().to_pylist()[0]["ratio"]  # doctest: +SKIP
        """
        rows = []
        for label, f in self.fits.items():
            cum = np.cumsum(f.explained_variance_ratio)
            for i in range(f.components.shape[0]):
                rows.append(
                    {
                        "hooks": label,
                        "component": i,
                        "explained_variance": float(f.explained_variance[i]),
                        "ratio": float(f.explained_variance_ratio[i]),
                        "cumulative": float(cum[i]),
                        "direction": f.direction_names[i] if f.direction_names else None,
                    }
                )
        return pa.Table.from_pylist(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (no per-row projections).

        Example
        -------
        >>> res.to_dict()["fits"][0]["n"]  # doctest: +SKIP
        """
        return jsonable(
            {
                "name": self.name,
                "run": self.run,
                "where": self.where,
                "center": self.center,
                "analysis_id": self.analysis_id,
                "fits": [f.to_dict() for f in self.fits.values()],
            }
        )


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


def _sign_fix(V_KD: np.ndarray) -> np.ndarray:
    idx = np.argmax(np.abs(V_KD), axis=1)
    signs = np.sign(V_KD[np.arange(V_KD.shape[0]), idx])
    signs[signs == 0] = 1.0
    return V_KD * signs[:, None]


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
    info, hook_list, groups, widths, name = pca_setup(
        store,
        run=run,
        hooks=hooks,
        combine=combine,
        method=method,
        k=k,
        name=name,
        save=save,
        replace=replace,
    )
    call = dict(
        run=run,
        hooks=hook_list,
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
    )
    sel = select(store, run=info, where=where, params=params, hooks=hook_list)
    require_rows(sel, "PCA", 2)
    fits: dict[str, PCAFit] = {}
    for g in groups:
        d = widths[g]
        use = (
            "exact"
            if method == "exact" or (method == "auto" and d <= exact_max_d)
            else "randomized"
        )
        if use == "exact":
            evals, V_KD, mom = _exact(sel, store, g, d, k, center, block_rows)
        else:
            evals, V_KD, mom = _randomized(
                sel, store, g, d, k, center, block_rows, oversample, n_iter, seed
            )
        V_KD = _sign_fix(V_KD)
        mean = mom.mean()
        proj_NK = None
        if project:
            proj_NK = np.empty((sel.n, k))
            for sl, block in sel.blocks(store, g, block_rows=block_rows):
                proj_NK[sl] = ((block - mean) if center else block) @ V_KD.T
        fits["+".join(g)] = make_fit(
            g,
            use,
            n=sel.n,
            mean=mean,
            components=V_KD,
            evals=evals,
            total=mom.total(center),
            denom=mom.denom(center),
            projections=proj_NK,
            name=name,
            k=k,
            save=save,
        )

    result = PCAResult(
        name=name, run=sel.run, where=where, fits=fits, meta=sel.meta, center=center, params=call
    )
    if not save:
        return result
    return save_pca(
        store,
        result,
        sel,
        call=call,
        where=where,
        params=params,
        block_rows=block_rows,
        replace=replace,
    )


def pca_setup(
    store: Store,
    *,
    run: str | int,
    hooks: str | Sequence[str],
    combine: str,
    method: str,
    k: int,
    name: str | None,
    save: bool,
    replace: bool,
) -> tuple[RunInfo, list[str], list[tuple[str, ...]], dict[tuple[str, ...], int], str]:
    """Check a PCA call before any row is read; shared by the in-process and Dask engines.

    Returns the run, its hooks, the hook groups (one per fit), each group's width and the
    analysis name. Raises :class:`SpecError` for bad settings or taken direction names.

    Example
    -------
    >>> info, hooks, groups, widths, name = pca_setup(st, run="r", hooks="blocks.1.hook_resid_post",
    ...     combine="separate", method="auto", k=3, name=None, save=False, replace=False)  # doctest: +SKIP
    """
    if combine not in ("concat", "separate"):
        raise SpecError(f"combine must be 'concat' or 'separate', not {combine!r}")
    if method not in ("auto", "exact", "randomized"):
        raise SpecError(f"method must be 'auto', 'exact' or 'randomized', not {method!r}")
    if k < 1:
        raise SpecError(f"k must be at least 1, not {k}")
    info = run_info(store, run)
    hook_list = resolve_hooks(store, info, hooks)
    groups: list[tuple[str, ...]] = (
        [tuple(hook_list)] if combine == "concat" else [(h,) for h in hook_list]
    )
    name = name or f"pca:{info.name}"
    widths = {g: sum(info.width(h) for h in g) for g in groups}
    for g, d in widths.items():
        if k > d:
            raise SpecError(f"k={k} exceeds the width {d} of {'+'.join(g)}")
    if save:
        names = []
        for g in groups:
            label = "+".join(g)
            names += [f"{name}/pc{i}/{label}" for i in range(k)] + [f"{name}/mean/{label}"]
        check_names_free(store, names, replace=replace)
    return info, hook_list, groups, widths, name


def make_fit(
    hooks: tuple[str, ...],
    method: str,
    *,
    n: int,
    mean: np.ndarray,
    components: np.ndarray,
    evals: np.ndarray,
    total: float,
    denom: float,
    projections: np.ndarray | None,
    name: str,
    k: int,
    save: bool,
) -> PCAFit:
    """Assemble one :class:`PCAFit` from its moments (shared by both engines).

    Example
    -------
    >>> fit = make_fit(("h",), "exact", n=10, mean=np.zeros(2), components=np.eye(2),
    ...                evals=np.array([2.0, 1.0]), total=3.0, denom=9.0, projections=None,
    ...                name="p", k=2, save=False)
    >>> fit.explained_variance_ratio.round(3).tolist()
    [0.667, 0.333]
    """
    label = "+".join(hooks)
    return PCAFit(
        hooks=hooks,
        method=method,
        n=n,
        mean=mean,
        components=components,
        explained_variance=evals,
        explained_variance_ratio=evals / total if total > 0 else np.zeros_like(evals),
        singular_values=np.sqrt(evals * denom),
        total_variance=total,
        projections=projections,
        direction_names=tuple(f"{name}/pc{i}/{label}" for i in range(k)) if save else (),
    )


def save_pca(
    store: Store,
    result: PCAResult,
    sel: Selection,
    *,
    call: dict[str, Any],
    where: str | None,
    params: Any,
    block_rows: int | None,
    replace: bool,
    **extra: Any,
) -> PCAResult:
    """Store a PCA result and its directions with provenance (shared by both engines).

    ``extra`` goes into the provenance (e.g. ``engine="dask"``).

    Example
    -------
    >>> res = save_pca(st, res, sel, call=call, where=None, params=None, block_rows=None, replace=False)  # doctest: +SKIP
    """
    name, center, fits = result.name, result.center, result.fits
    prov = provenance(
        store,
        runs={sel.run: sel.run_id},
        where=where,
        params=params,
        n_rows=sel.n,
        block_rows=block_rows,
        **extra,
    )
    aid = save_analysis(
        store, name=name, kind="pca", params=call, result=result.to_dict(), provenance=prov
    )
    for label, f in fits.items():
        hook = f.hooks[0] if len(f.hooks) == 1 else label
        for i, dn in enumerate(f.direction_names):
            save_direction(
                store,
                name=dn,
                vector=f.components[i],
                hook=hook,
                method="pca",
                run_id=sel.run_id,
                analysis_id=aid,
                params={
                    "component": i,
                    "explained_variance_ratio": f.explained_variance_ratio[i],
                    "center": center,
                    "where": where,
                    "n": f.n,
                },
                replace=replace,
            )
        save_direction(
            store,
            name=f"{name}/mean/{label}",
            vector=f.mean,
            hook=hook,
            method="pca_mean",
            run_id=sel.run_id,
            analysis_id=aid,
            params={"where": where, "n": f.n},
            replace=replace,
        )
    return dataclasses.replace(result, analysis_id=aid)
