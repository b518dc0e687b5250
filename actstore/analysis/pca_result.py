"""A PCA result: its types, how a fit is assembled from moments, and how it is stored.

Shared by the in-process engine (:mod:`actstore.analysis.pca`) and the Dask one
(:mod:`actstore.analysis.dask`): :func:`pca_setup` checks a call before any row is
read, :func:`make_fit` turns eigenpairs and moments into a :class:`PCAFit`, and
:func:`save_pca` stores a :class:`PCAResult` and its directions with provenance.

Example
-------
>>> fit = make_fit(("h",), "exact", n=3, mean=np.zeros(2), components=np.eye(2),
...                evals=np.array([3.0, 1.0]), total=4.0, denom=2.0, projections=None,
...                name="p", k=2, save=False)
>>> fit.explained_variance_ratio.tolist()
[0.75, 0.25]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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


def sign_fix(V_KD: np.ndarray) -> np.ndarray:
    """Flip each row of ``V_KD`` so that its largest-magnitude entry is positive.

    Example
    -------
    >>> sign_fix(np.array([[0.1, -2.0], [3.0, 1.0]])).tolist()
    [[-0.1, 2.0], [3.0, 1.0]]
    """
    idx = np.argmax(np.abs(V_KD), axis=1)
    signs = np.sign(V_KD[np.arange(V_KD.shape[0]), idx])
    signs[signs == 0] = 1.0
    return V_KD * signs[:, None]


@dataclass(frozen=True, slots=True, eq=False)
class PCAPlan:
    """A checked PCA call: its run, hook groups and widths, selected rows and settings.

    Made by :func:`pca_setup`; an engine computes each group's eigenpairs and moments,
    turns them into fits with :meth:`fit`, and hands them to :meth:`finish`.
    """

    info: RunInfo
    hooks: list[str]
    groups: list[tuple[str, ...]]
    widths: dict[tuple[str, ...], int]
    name: str
    sel: Selection
    call: dict[str, Any]
    """The call's parameters as stored with the result."""
    save: bool
    replace: bool

    def method_for(self, group: tuple[str, ...]) -> str:
        """``exact`` or ``randomized`` for a group (``auto``: exact up to ``exact_max_d``).

        Example
        -------
        >>> plan.method_for(("blocks.1.hook_resid_post",))  # doctest: +SKIP
        'exact'
        """
        method = self.call["method"]
        auto_exact = method == "auto" and self.widths[group] <= self.call["exact_max_d"]
        return "exact" if method == "exact" or auto_exact else "randomized"

    def fit(
        self,
        group: tuple[str, ...],
        method: str,
        *,
        mean: np.ndarray,
        components: np.ndarray,
        evals: np.ndarray,
        total: float,
        denom: float,
        projections: np.ndarray | None,
    ) -> PCAFit:
        """One group's :class:`PCAFit` (see :func:`make_fit`).

        Example
        -------
        >>> plan.fit(g, "exact", mean=m, components=V, evals=e, total=t, denom=n - 1,
        ...          projections=None)  # doctest: +SKIP
        """
        return make_fit(
            group,
            method,
            n=self.sel.n,
            mean=mean,
            components=components,
            evals=evals,
            total=total,
            denom=denom,
            projections=projections,
            name=self.name,
            k=self.call["k"],
            save=self.save,
        )

    def finish(self, store: Store, fits: dict[str, PCAFit], **extra: Any) -> PCAResult:
        """The :class:`PCAResult` of the fits, stored (with ``extra`` in its provenance) if saving.

        Example
        -------
        >>> res = plan.finish(st, fits)  # doctest: +SKIP
        """
        call = self.call
        result = PCAResult(
            name=self.name,
            run=self.sel.run,
            where=call["where"],
            fits=fits,
            meta=self.sel.meta,
            center=call["center"],
            params=call,
        )
        if not self.save:
            return result
        return save_pca(
            store,
            result,
            self.sel,
            call=call,
            where=call["where"],
            params=call["params"],
            block_rows=call["block_rows"],
            replace=self.replace,
            **extra,
        )


def pca_setup(
    store: Store,
    *,
    run: str | int,
    hooks: str | Sequence[str],
    where: str | None,
    params: Params,
    k: int,
    center: bool,
    combine: str,
    method: str,
    exact_max_d: int,
    oversample: int,
    n_iter: int,
    seed: int,
    block_rows: int | None,
    project: bool,
    name: str | None,
    save: bool,
    replace: bool,
    **extra: Any,
) -> PCAPlan:
    """Check a PCA call and select its rows; shared by the in-process and Dask engines.

    Raises :class:`SpecError` for bad settings or taken direction names, before any
    row is read. ``extra`` joins the stored parameters (e.g. ``engine="dask"``).

    Example
    -------
    >>> plan = pca_setup(st, run="r", hooks="blocks.1.hook_resid_post", where=None,
    ...     params=None, k=3, center=True, combine="separate", method="auto",
    ...     exact_max_d=4096, oversample=10, n_iter=4, seed=0, block_rows=None,
    ...     project=True, name=None, save=False, replace=False)  # doctest: +SKIP
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
        **extra,
    )
    sel = select(store, run=info, where=where, params=params, hooks=hook_list)
    require_rows(sel, "PCA", 2)
    return PCAPlan(info, hook_list, groups, widths, name, sel, call, save, replace)


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
