"""Contrast statistics on Dask: class means, variance ratio and mean difference.

The Dask counterpart of the statistics :func:`actstore.analysis.contrast.contrast`
computes in-process: per-class sums over a ``dask.array`` view of a run's arrays
(:func:`actstore.analysis.dask.to_dask`), in one pass, giving the class means, the
between/within variance ratio and the mean-difference direction. Unpaired; the
probes and AUROCs stay in-process. Equal to the in-process values within float64
rounding.

Example
-------
>>> from actstore.analysis import dask as adask
>>> res = adask.contrast_stats(st, run="backdoored/pairs", hooks="blocks.2.hook_resid_post",
...                            group="triggered", client=client)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.analysis.groups import labelled_rows
from actstore.analysis.results import (
    check_names_free,
    jsonable,
    layer_of,
    provenance,
    save_analysis,
    save_direction,
)
from actstore.analysis.rows import (
    Params,
    Selection,
    resolve_hooks,
    run_info,
)
from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.store.store import Store

from actstore.analysis.dask import Engine, _compute, _dask_array_module, _shifted, _view

# -- contrast statistics ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class ContrastStatsLayer:
    """Class statistics of two groups of rows at one hook."""

    hook: str
    """The hook."""
    layer: int | None
    """Its layer."""
    n: tuple[int, int]
    """Rows (positive, negative)."""
    n_train: tuple[int, int]
    """Training rows (positive, negative): those the mean difference is fitted on."""
    mean_pos: np.ndarray
    """(D,) mean of the positive rows (all rows)."""
    mean_neg: np.ndarray
    """(D,) mean of the negative rows (all rows)."""
    mean_diff: np.ndarray
    """(D,) mean(positive) - mean(negative) over the training rows: contrast's ``mean_diff``."""
    variance_ratio: float
    """Between-group over within-group variance over all the rows (as contrast's)."""
    direction_name: str | None = None
    """The stored mean-difference direction, if saved."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the direction by name and norm).

        Example
        -------
        >>> layer.to_dict()["variance_ratio"]  # doctest: +SKIP
        """
        return {
            "hook": self.hook,
            "layer": self.layer,
            "n": list(self.n),
            "n_train": list(self.n_train),
            "mean_diff_norm": float(np.linalg.norm(self.mean_diff)),
            "variance_ratio": self.variance_ratio,
            "direction_name": self.direction_name,
        }


@dataclass(frozen=True, slots=True, eq=False)
class ContrastStatsResult:
    """:func:`contrast_stats` over several hooks."""

    name: str
    """The analysis name (prefix of the stored directions)."""
    run: str
    """The run."""
    groups: dict[str, str | None]
    """How the groups were defined: ``group`` or ``positive``/``negative``."""
    where: str | None
    """The SQL predicate that chose the rows."""
    split: str | None
    """The split used for the mean difference."""
    layers: tuple[ContrastStatsLayer, ...]
    """One entry per hook, in the order given."""
    n_dropped: int = 0
    """Selected rows in neither group."""
    analysis_id: int | None = None
    """The stored analysis, if saved."""
    params: dict[str, Any] = field(default_factory=dict)
    """The call's parameters."""

    def layer(self, hook: str | None = None) -> ContrastStatsLayer:
        """The entry of ``hook`` (default: the only one).

        Example
        -------
        >>> res.layer("blocks.2.hook_resid_post").variance_ratio  # doctest: +SKIP
        """
        return layer_of(self.layers, hook, "these contrast statistics")

    def summary(self) -> pa.Table:
        """One row per hook: counts, the variance ratio and the mean difference's norm.

        Example
        -------
        >>> res.summary().to_pandas()  # doctest: +SKIP
        """
        return pa.Table.from_pylist(
            [
                {
                    "hook": e.hook,
                    "layer": e.layer,
                    "n_pos": e.n[0],
                    "n_neg": e.n[1],
                    "variance_ratio": e.variance_ratio,
                    "mean_diff_norm": float(np.linalg.norm(e.mean_diff)),
                    "direction": e.direction_name,
                }
                for e in self.layers
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON.

        Example
        -------
        >>> res.to_dict()["layers"][0]["variance_ratio"]  # doctest: +SKIP
        """
        return jsonable(
            {
                "name": self.name,
                "run": self.run,
                "groups": self.groups,
                "where": self.where,
                "split": self.split,
                "n_dropped": self.n_dropped,
                "analysis_id": self.analysis_id,
                "layers": [e.to_dict() for e in self.layers],
            }
        )


def _cell_sums(
    store: Store,
    sel: Selection,
    hook: str,
    cell_N: np.ndarray,
    block_rows: int | None,
    engine: Engine,
    client: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shift (D,), per-cell sums of shifted rows (4, D) and of their squared norms (4,)."""
    onehot_NC = np.zeros((sel.n, 4))
    onehot_NC[np.arange(sel.n), cell_N] = 1.0
    if engine == "local":
        shift = None
        sums_CD = np.zeros((4, sel.info.width(hook)))
        sq_C = np.zeros(4)
        for sl, block in sel.blocks(store, [hook], block_rows=block_rows):
            if shift is None:
                shift = block.mean(axis=0)
            b = block - shift
            sums_CD += onehot_NC[sl].T @ b
            sq_C += onehot_NC[sl].T @ np.einsum("ij,ij->i", b, b)
        assert shift is not None
        return shift, sums_CD, sq_C
    dam = _dask_array_module()
    X = _view(store, sel.info, [hook], sel.rows, block_rows, np.float64)
    Xs, shift = _shifted(X, True, client)
    G = dam.from_array(onehot_NC, chunks=(X.chunks[0], 4))
    sums_CD, sq_C = _compute(client, G.T @ Xs, G.T @ (Xs**2).sum(axis=1))
    return shift, np.asarray(sums_CD), np.asarray(sq_C)


def contrast_stats(
    store: Store,
    *,
    run: str | int,
    hooks: str | Sequence[str],
    group: str | None = None,
    positive: str | None = None,
    negative: str | None = None,
    where: str | None = None,
    params: Params = None,
    split: str | None = "random",
    test_fraction: float = 0.25,
    seed: int = 0,
    block_rows: int | None = None,
    name: str | None = None,
    save: bool = True,
    replace: bool = False,
    engine: Engine = "dask",
    client: Any = None,
) -> ContrastStatsResult:
    """Class means, between/within variance ratio and mean-difference direction, on Dask.

    The groups, rows and split are chosen exactly as by
    :func:`actstore.analysis.contrast.contrast`, so ``mean_diff`` equals its
    ``mean_diff`` direction and ``variance_ratio`` its variance ratio (within
    float rounding). One pass over the rows per hook.

    Parameters
    ----------
    group, positive, negative, where, params, split, test_fraction, seed
        As for :func:`~actstore.analysis.contrast.contrast` (no matched pairs here).
    block_rows
        Rows per block.
    name, save, replace
        Analysis name (default ``contrast_stats:{group}``); store the analysis and the
        directions ``{name}/mean_diff/{hook}``; overwrite directions of those names.
    engine, client
        As for :func:`pca`.

    Returns
    -------
    ContrastStatsResult

    Example
    -------
    >>> res = contrast_stats(st, run="r", hooks="blocks.*.hook_resid_post", group="triggered",
    ...                      where="position_role = 'last'", client=client)  # doctest: +SKIP
    >>> res.summary().to_pandas()[["hook", "variance_ratio"]]  # doctest: +SKIP
    """
    if engine not in ("dask", "local"):
        raise SpecError(f"engine must be 'dask' or 'local', not {engine!r}")
    info = run_info(store, run)
    hook_list = resolve_hooks(store, info, hooks)
    name = name or f"contrast_stats:{group if group is not None else positive}"
    if save:
        check_names_free(store, [f"{name}/mean_diff/{h}" for h in hook_list], replace=replace)
    lab = labelled_rows(
        store,
        run=info,
        hooks=hook_list,
        where=where,
        params=params,
        group=group,
        positive=positive,
        negative=negative,
        split=split,
        test_fraction=test_fraction,
        seed=seed,
    )
    y, train = lab.y, lab.train
    if not (y[train].any() and (~y[train]).any()):
        raise InputError(
            "both groups need training rows; the training split holds only "
            f"{'positive' if y[train].all() else 'negative'} rows: check group=/positive=/"
            "negative= and the split"
        )
    cell_N = 2 * y.astype(np.int64) + train.astype(np.int64)  # 0/1: negative, 2/3: positive
    n_C = np.bincount(cell_N, minlength=4).astype(np.float64)
    call = dict(
        run=run,
        hooks=hook_list,
        group=group,
        positive=positive,
        negative=negative,
        where=where,
        params=params,
        split=split,
        test_fraction=test_fraction,
        seed=seed,
        block_rows=block_rows,
        engine=engine,
    )
    layers = []
    for hook in hook_list:
        shift, sums_CD, sq_C = _cell_sums(store, lab.sel, hook, cell_N, block_rows, engine, client)
        n_pos, n_neg = n_C[2] + n_C[3], n_C[0] + n_C[1]
        s_pos, s_neg = sums_CD[2] + sums_CD[3], sums_CD[0] + sums_CD[1]
        mu_pos, mu_neg = s_pos / n_pos, s_neg / n_neg  # shifted coordinates
        mu = (s_pos + s_neg) / (n_pos + n_neg)
        between = n_pos * float(np.sum((mu_pos - mu) ** 2)) + n_neg * float(
            np.sum((mu_neg - mu) ** 2)
        )
        within = (sq_C[2] + sq_C[3] - n_pos * float(mu_pos @ mu_pos)) + (
            sq_C[0] + sq_C[1] - n_neg * float(mu_neg @ mu_neg)
        )
        layers.append(
            ContrastStatsLayer(
                hook=hook,
                layer=info.layer(hook),
                n=(int(n_pos), int(n_neg)),
                n_train=(int(n_C[3]), int(n_C[1])),
                mean_pos=shift + mu_pos,
                mean_neg=shift + mu_neg,
                mean_diff=sums_CD[3] / n_C[3] - sums_CD[1] / n_C[1],
                variance_ratio=between / within if within > 0 else float("inf"),
                direction_name=f"{name}/mean_diff/{hook}" if save else None,
            )
        )
    result = ContrastStatsResult(
        name=name,
        run=lab.sel.run,
        groups={"group": group, "positive": positive, "negative": negative},
        where=where,
        split=split,
        layers=tuple(layers),
        n_dropped=lab.n_dropped,
        params=call,
    )
    if not save:
        return result
    prov = provenance(
        store,
        runs={lab.sel.run: lab.sel.run_id},
        where=where,
        params=params,
        n_rows={"train": int(train.sum()), "all": lab.sel.n, "dropped": lab.n_dropped},
        engine=engine,
    )
    aid = save_analysis(
        store,
        name=name,
        kind="contrast_stats",
        params=call,
        result=result.to_dict(),
        provenance=prov,
    )
    for e in layers:
        assert e.direction_name is not None
        save_direction(
            store,
            name=e.direction_name,
            vector=e.mean_diff,
            hook=e.hook,
            method="mean_diff",
            run_id=lab.sel.run_id,
            analysis_id=aid,
            params={
                "group": group,
                "positive": positive,
                "negative": negative,
                "where": where,
                "n_train": list(e.n_train),
                "variance_ratio": e.variance_ratio,
            },
            replace=replace,
        )
    return dataclasses.replace(result, analysis_id=aid)
