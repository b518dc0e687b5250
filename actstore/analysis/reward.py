"""Feature-reward correlation: which features (or directions) track a reward, and how well.

Features are either SAE features, read from the sparse ``features`` view (an
absent entry is a zero and is counted as one), or dense directions: the
projection of each row on a stored direction (unit length) at the direction's
hook. The unit of analysis is the prompt (``level="prompt"``: a feature's
value is its mean or max over the prompt's selected tokens, zeros included)
or the token (``level="token"``).

For every feature that is ever nonzero: Pearson r and Spearman rho with the
reward, two-sided p-values (t test with n-2 degrees of freedom, as scipy
reports), Benjamini-Hochberg q-values over the features tested, the mean,
the share of units where it is active, and the share of high-reward units
(reward at or above the ``high_quantile`` quantile) where it is active.
A ridge regression from all the features to the reward, fitted on a training
split and scored on held-out units, gives R^2 and Kendall's tau between
predicted and actual reward (the reward-model interpretation recipe).

The reward is a SQL expression over ``labeled_tokens`` (a label column such
as ``reward``) or a scorer of the ``scores`` table (mean over samples).

Example
-------
>>> res = reward_correlation(st, run="rm/prompts", reward="reward", sae="rm_l6", aggregate="max")  # doctest: +SKIP
>>> res.summary(10).to_pandas()  # doctest: +SKIP
>>> res.ridge.r2_test, res.ridge.kendall_tau  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from scipy import sparse, stats

from actstore.analysis.metrics import (
    bh_adjust,
    dense_correlations,
    r_pvalue,
    sparse_correlations,
)
from actstore.analysis.results import (
    jsonable,
    load_direction,
    provenance,
    save_analysis,
)
from actstore.analysis.rows import Params, Selection, select, sql_with_tables
from actstore.analysis.sae import sae_record
from actstore.analysis.splits import split_expression, split_masks
from actstore.errors import InputError, SpecError
from actstore.store import selections as _selections

if TYPE_CHECKING:
    from actstore.store.store import Store


@dataclass(frozen=True, slots=True)
class RidgeFit:
    """Held-out quality of a ridge regression from features to reward."""

    alpha: float
    """L2 strength."""
    n_train: int
    """Training units."""
    n_test: int
    """Held-out units."""
    r2_train: float
    """R^2 on the training units."""
    r2_test: float
    """R^2 on the held-out units."""
    kendall_tau: float
    """Kendall's tau (tau-b) between predicted and actual held-out reward."""
    kendall_p: float
    """Its two-sided p-value."""
    held_out: bool
    """False when scored in-sample (``split="none"``)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values.

        Example
        -------
        >>> res.ridge.to_dict()["r2_test"]  # doctest: +SKIP
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True, eq=False)
class RewardResult:
    """Per-feature correlations with a reward, and a ridge regression over all of them."""

    name: str
    """The analysis name."""
    run: str
    """The run."""
    source: str
    """``sae:<name>`` or ``directions``."""
    level: str
    """``prompt`` or ``token``."""
    aggregate: str
    """``mean`` or ``max`` over a prompt's selected tokens (prompt level)."""
    n_units: int
    """Prompts (or tokens) analysed."""
    n_inactive: int
    """Features never active on the selected rows (not tested)."""
    table: pa.Table
    """One row per tested feature, most significant first (by Spearman q, then |rho|)."""
    ridge: RidgeFit | None
    """The ridge regression (None if not fitted)."""
    analysis_id: int | None = None
    """The stored analysis, if saved."""
    params: dict[str, Any] = field(default_factory=dict)
    """The call's parameters."""

    def summary(self, k: int = 20) -> pa.Table:
        """The ``k`` most significant features.

        Example
        -------
        >>> res.summary(5).column("feature").to_pylist()  # doctest: +SKIP
        """
        return self.table.slice(0, k)

    def to_dict(self, top: int = 100) -> dict[str, Any]:
        """Plain values, with the ``top`` most significant features.

        Example
        -------
        >>> res.to_dict()["ridge"]["kendall_tau"]  # doctest: +SKIP
        """
        return jsonable(
            {
                "name": self.name,
                "run": self.run,
                "source": self.source,
                "level": self.level,
                "aggregate": self.aggregate,
                "n_units": self.n_units,
                "n_tested": self.table.num_rows,
                "n_inactive": self.n_inactive,
                "ridge": self.ridge.to_dict() if self.ridge else None,
                "features": self.table.slice(0, top).to_pylist(),
                "analysis_id": self.analysis_id,
            }
        )


@dataclass(frozen=True, slots=True, eq=False)
class _Units:
    """Rows grouped into units (prompts or tokens), with the reward per unit."""

    unit_of_row: np.ndarray  # (N,) unit index of each selected row
    n_tokens: np.ndarray  # (U,) selected rows per unit
    reward: np.ndarray  # (U,)
    test: np.ndarray  # (U,) held-out units
    held_out: bool
    keys: np.ndarray  # (U,) prompt_idx (prompt level) or row (token level)


def _units(
    store: Store,
    sel: Selection,
    *,
    level: str,
    scorer: str | None,
    split: str | None,
    test_fraction: float,
    seed: int,
) -> tuple[_Units, Selection]:
    if scorer is not None:
        got = store.sql(
            "SELECT prompt_idx, avg(value) AS v FROM scores WHERE run_id = ? AND scorer = ? "
            "GROUP BY prompt_idx",
            [sel.run_id, scorer],
        ).numpy()
        if got["prompt_idx"].size == 0:
            have = [r[0] for r in store.sql("SELECT DISTINCT scorer FROM scores").fetchall()]
            raise InputError(
                f"no scores of scorer {scorer!r} for run {sel.run!r}; scorers: {have or 'none'}"
            )
        lookup = dict(zip(got["prompt_idx"].tolist(), got["v"].tolist(), strict=True))
        row_reward = np.array(
            [lookup.get(int(p), np.nan) for p in sel.column("prompt_idx")], dtype=np.float64
        )
    else:
        row_reward = np.asarray(
            sel.meta.column("_reward").cast(pa.float64()).to_numpy(zero_copy_only=False),
            np.float64,
        )
    keep = np.isfinite(row_reward)
    if not keep.all():
        sel = sel.take(keep)
        row_reward = row_reward[keep]
    if sel.n < 3:
        raise InputError(
            f"reward correlation: {sel.n} selected rows of run {sel.run!r} have a reward; "
            "need at least 3 (check where=, reward= / scorer=)"
        )
    _, test_r, held_out = split_masks(
        sel, split, unit="prompt_idx", test_fraction=test_fraction, seed=seed
    )
    if level == "token":
        n = sel.n
        return (
            _Units(np.arange(n), np.ones(n, np.int64), row_reward, test_r, held_out, sel.rows),
            sel,
        )
    prompts = sel.column("prompt_idx").astype(np.int64)
    keys, unit_of_row = np.unique(prompts, return_inverse=True)
    unit_of_row = unit_of_row.ravel()
    n_tok = np.bincount(unit_of_row, minlength=keys.size)
    reward = np.bincount(unit_of_row, row_reward, minlength=keys.size) / n_tok
    test = np.zeros(keys.size, dtype=bool)
    test[unit_of_row[test_r]] = (
        True  # a prompt's rows share a side for every split but a row-level SQL one
    )
    return _Units(unit_of_row, n_tok, reward, test, held_out, keys), sel


def _aggregate_dense(values_NK: np.ndarray, u: _Units, aggregate: str) -> np.ndarray:
    order = np.argsort(u.unit_of_row, kind="stable")
    starts = np.searchsorted(u.unit_of_row[order], np.arange(u.n_tokens.size))
    ufunc = np.add if aggregate == "mean" else np.maximum
    out = ufunc.reduceat(values_NK[order], starts, axis=0)
    return out / u.n_tokens[:, None] if aggregate == "mean" else out


def _direction_values(
    store: Store, sel: Selection, names: Sequence[str], block_rows: int | None
) -> tuple[np.ndarray, list[str]]:
    dirs = [load_direction(store, n) for n in names]
    hooks = sel.info.hooks
    values_NK = np.zeros((sel.n, len(dirs)))
    by_hook: dict[str, list[int]] = {}
    for i, d in enumerate(dirs):
        if d.hook not in hooks:
            raise InputError(
                f"direction {d.name!r} lives in hook {d.hook!r}, which run {sel.run!r} does not "
                f"store (it has {hooks})"
            )
        by_hook.setdefault(d.hook, []).append(i)
    for hook, idx in by_hook.items():
        U_DK = np.stack([dirs[i].unit for i in idx], axis=1)
        for sl, block in sel.blocks(store, [hook], block_rows=block_rows):
            if block.shape[1] != U_DK.shape[0]:
                raise InputError(
                    f"hook {hook!r} has width {block.shape[1]}; its directions have {U_DK.shape[0]}"
                )
            values_NK[sl, idx] = block @ U_DK
    return values_NK, [d.name for d in dirs]


def _sae_values(
    store: Store, sel: Selection, u: _Units, sae: str | int, level: str, aggregate: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, str]:
    """(unit, feature, value) nonzeros per unit, d_sae, SAE name."""
    rec = sae_record(store, sae)
    sid = int(rec["sae_id"])
    has = store.sql(
        "SELECT count(*) FROM feature_files WHERE run_id = ? AND sae_id = ?", [sel.run_id, sid]
    ).fetchall()[0][0]
    if not has:
        saes = store.sql(
            "SELECT DISTINCT s.name FROM feature_files f JOIN saes s USING (sae_id) WHERE f.run_id = ?",
            [sel.run_id],
        ).fetchall()
        raise InputError(
            f"run {sel.run!r} has no features of SAE {rec['name']!r}; SAEs with features in this "
            f"run: {[r[0] for r in saes] or 'none'}"
        )
    _selections.require_rows(store, sel.run_id, sid, sel.rows, what="reward_correlation")
    rows_t = pa.table({"row": pa.array(sel.rows), "unit": pa.array(u.unit_of_row.astype(np.int64))})
    if level == "token":
        got = sql_with_tables(
            store,
            f"""SELECT s.unit, f.feature, f.value::DOUBLE AS v FROM features f
                JOIN _sel s ON f."row" = s."row" WHERE f.run_id = {sel.run_id} AND f.sae_id = {sid}""",
            _sel=rows_t,
        )
        unit = got.column("unit").to_numpy()
        feat = got.column("feature").to_numpy().astype(np.int64)
        val = got.column("v").to_numpy()
    else:
        got = sql_with_tables(
            store,
            f"""SELECT s.unit, f.feature, sum(f.value::DOUBLE) AS s, max(f.value::DOUBLE) AS mx,
                       count(*) AS nz
                FROM features f JOIN _sel s ON f."row" = s."row"
                WHERE f.run_id = {sel.run_id} AND f.sae_id = {sid} GROUP BY ALL""",
            _sel=rows_t,
        )
        unit = got.column("unit").to_numpy()
        feat = got.column("feature").to_numpy().astype(np.int64)
        if aggregate == "mean":
            val = got.column("s").to_numpy() / u.n_tokens[unit]
        else:  # the implicit zeros take part in the max
            mx = got.column("mx").to_numpy()
            partial = got.column("nz").to_numpy() < u.n_tokens[unit]
            val = np.where(partial, np.maximum(mx, 0.0), mx)
    return unit, feat, val, int(rec["d_sae"]), str(rec["name"])


def _ridge(
    X_UF: Any, reward: np.ndarray, test: np.ndarray, held_out: bool, alpha: float
) -> tuple[RidgeFit, np.ndarray]:
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    train = ~test if held_out else np.ones_like(test)
    evaluate = test if held_out else train
    model = Ridge(alpha=alpha)
    model.fit(X_UF[train], reward[train])
    pred = model.predict(X_UF[evaluate])
    tau = stats.kendalltau(pred, reward[evaluate])
    fit = RidgeFit(
        alpha=alpha,
        n_train=int(train.sum()),
        n_test=int(evaluate.sum()),
        r2_train=float(r2_score(reward[train], model.predict(X_UF[train]))),
        r2_test=float(r2_score(reward[evaluate], pred)),
        kendall_tau=float(tau.statistic),
        kendall_p=float(tau.pvalue),
        held_out=held_out,
    )
    return fit, np.asarray(model.coef_, np.float64)


def reward_correlation(
    store: Store,
    *,
    run: str | int,
    reward: str | None = None,
    scorer: str | None = None,
    sae: str | int | None = None,
    directions: Sequence[str] | None = None,
    where: str | None = None,
    params: Params = None,
    level: Literal["prompt", "token"] = "prompt",
    aggregate: Literal["mean", "max"] = "mean",
    split: str | None = "random",
    test_fraction: float = 0.25,
    seed: int = 0,
    alpha: float = 1.0,
    ridge: bool = True,
    high_quantile: float = 0.9,
    top: int = 100,
    block_rows: int | None = None,
    name: str | None = None,
    save: bool = True,
) -> RewardResult:
    """Correlate SAE features or dense directions with a reward, per prompt or per token.

    Parameters
    ----------
    store
        The store.
    run
        Run name or id.
    reward
        SQL expression over ``labeled_tokens`` giving the reward (e.g. a label column ``"reward"``).
    scorer
        Instead of ``reward``: a scorer in the ``scores`` table (its mean over samples per prompt).
    sae
        An SAE (name or id) whose features the run stores.
    directions
        Instead of ``sae``: stored direction names; a row's value is its projection
        on the unit direction at the direction's hook.
    where, params
        SQL predicate choosing the rows (e.g. ``"NOT is_completion"``) and bound parameters.
    level
        ``"prompt"`` (aggregate over the prompt's selected tokens) or ``"token"``.
    aggregate
        ``"mean"`` or ``"max"`` over a prompt's tokens, absent SAE entries counting as zeros.
    split, test_fraction, seed
        Held-out split for the ridge regression (see :mod:`actstore.analysis.splits`; by prompt).
    alpha, ridge
        Ridge L2 strength; set ``ridge=False`` to skip the regression.
    high_quantile
        Reward quantile above which a unit counts as high-reward for ``frac_active_high``.
    top
        Features kept in the stored record (the returned table has all).
    block_rows
        Rows per block when projecting on directions.
    name, save
        Analysis name (default ``reward:{reward or scorer}``) and whether to store it.

    Returns
    -------
    RewardResult

    Example
    -------
    >>> res = reward_correlation(st, run="r", reward="reward", sae="sae2", aggregate="max")  # doctest: +SKIP
    >>> res.summary(5)  # doctest: +SKIP
    """
    if (reward is None) == (scorer is None):
        raise SpecError("give the reward as exactly one of reward= (SQL) or scorer= (scores table)")
    if (sae is None) == (directions is None):
        raise SpecError("give exactly one of sae= (SAE features) or directions= (stored names)")
    if level not in ("prompt", "token"):
        raise SpecError(f"level must be 'prompt' or 'token', not {level!r}")
    if aggregate not in ("mean", "max"):
        raise SpecError(f"aggregate must be 'mean' or 'max', not {aggregate!r}")
    cols: dict[str, str] = {}
    if reward is not None:
        cols["reward"] = reward
    expr = split_expression(split)
    if expr is not None:
        cols["split"] = expr
    sel = select(store, run=run, where=where, params=params, columns=cols)
    u, sel = _units(
        store, sel, level=level, scorer=scorer, split=split, test_fraction=test_fraction, seed=seed
    )
    n_units = u.reward.size
    if directions is not None:
        values_NK, labels = _direction_values(store, sel, list(directions), block_rows)
        X_UK = values_NK if level == "token" else _aggregate_dense(values_NK, u, aggregate)
        pearson, spearman = dense_correlations(X_UK, u.reward)
        X_model: Any = X_UK
        col_id: dict[str, Any] = {"direction": labels}
        sums = X_UK.sum(axis=0)
        nnz_mask = None
        source = "directions"
    else:
        assert sae is not None
        unit, feat, val, d_sae, sae_name = _sae_values(store, sel, u, sae, level, aggregate)
        keep = val != 0
        unit, feat, val = unit[keep], feat[keep], val[keep]
        active_ids = np.unique(feat)
        col_of = np.searchsorted(active_ids, feat)
        X_model = sparse.csr_matrix((val, (unit, col_of)), shape=(n_units, active_ids.size))
        pearson, spearman = sparse_correlations(
            n_units, unit, col_of, val, u.reward, active_ids.size
        )
        col_id = {"feature": active_ids.astype(np.int64)}
        sums = np.bincount(col_of, val, minlength=active_ids.size)
        nnz_mask = X_model
        source = f"sae:{sae_name}"
    n_cols = int(pearson.size)
    high = u.reward >= np.quantile(u.reward, high_quantile)
    if nnz_mask is not None:
        act = (nnz_mask != 0).astype(np.float64)
        frac_active = np.asarray(act.sum(axis=0)).ravel() / n_units
        frac_high = np.asarray(act[high].sum(axis=0)).ravel() / max(int(high.sum()), 1)
    else:  # "active" means nothing for a dense projection
        frac_active = frac_high = np.full(n_cols, np.nan)
    p_pearson = r_pvalue(pearson, n_units)
    p_spearman = r_pvalue(spearman, n_units)
    fit: RidgeFit | None = None
    coef = np.full(n_cols, np.nan)
    if ridge and n_cols:
        fit, coef = _ridge(X_model, u.reward, u.test, u.held_out, alpha)
    table = pa.table(
        {
            **col_id,
            "n": np.full(n_cols, n_units),
            "mean": sums / n_units,
            "frac_active": frac_active,
            "frac_active_high": frac_high,
            "pearson_r": pearson,
            "pearson_p": p_pearson,
            "pearson_q": bh_adjust(p_pearson),
            "spearman_r": spearman,
            "spearman_p": p_spearman,
            "spearman_q": bh_adjust(p_spearman),
            "ridge_coef": coef,
        }
    )
    order = np.lexsort(
        (-np.nan_to_num(np.abs(spearman), nan=-1.0), np.nan_to_num(bh_adjust(p_spearman), nan=2.0))
    )
    table = table.take(order)
    n_inactive = 0 if directions is not None else int(d_sae) - n_cols
    name = name or f"reward:{reward if reward is not None else scorer}"
    call = dict(
        run=run,
        reward=reward,
        scorer=scorer,
        sae=sae,
        directions=directions,
        where=where,
        params=params,
        level=level,
        aggregate=aggregate,
        split=split,
        test_fraction=test_fraction,
        seed=seed,
        alpha=alpha,
        ridge=ridge,
        high_quantile=high_quantile,
        top=top,
    )
    result = RewardResult(
        name=name,
        run=sel.run,
        source=source,
        level=level,
        aggregate=aggregate,
        n_units=n_units,
        n_inactive=n_inactive,
        table=table,
        ridge=fit,
        params=call,
    )
    if not save:
        return result
    prov = provenance(
        store,
        runs={sel.run: sel.run_id},
        where=where,
        params=params,
        n_rows={"rows": sel.n, "units": n_units, "test_units": int(u.test.sum())},
        unit_split_seed=seed,
    )
    aid = save_analysis(
        store,
        name=name,
        kind="reward_correlation",
        params=call,
        result=result.to_dict(top),
        provenance=prov,
    )
    return dataclasses.replace(result, analysis_id=aid)
