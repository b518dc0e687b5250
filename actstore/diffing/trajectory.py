"""Trajectories: chosen measures along a series of checkpoints, as a table and a plot.

A series is an ordered list of runs over one prompt set: training snapshots
(``backdoored_step25/pairs`` ... ``backdoored/pairs``), or an interpolation
(``interp@0/pairs`` ... ``interp@1/pairs``). For each run, at one hook and the rows
a predicate picks (default: the last prompt token):

``rate_a``, ``rate_b``
    the behaviour rate (mean of a scorer's flag, first sample) on prompts in group
    A (``group``, e.g. ``triggered``) and on the rest (NULL without that scorer);
``auroc``
    held-out AUROC of the run's own mean-difference direction (group A minus the
    rest): fitted on a random half of the prompts, scored on the other half;
``cos_final``
    cosine of that direction with the final run's (the last of the series, or ``final``);
``cka_final``
    linear CKA of the run's activations with the final run's, row by row.

``x`` is the series coordinate: given, or read from the labels when every run has
one (``@alpha`` of an interpolation, ``_step{K}`` of a snapshot), else the index
(a snapshot series ending in the final run, which has no step, is indexed: give
``x`` for the real steps). The table is stored as an analysis
(kind ``trajectory``) and :meth:`Trajectory.plot` draws every measure against ``x``.

Example
-------
>>> t = trajectory(st, [f"interp@{a}/pairs" for a in (0, 0.25, 0.5, 0.75, 1)],
...                hook="blocks.2.hook_resid_post")  # doctest: +SKIP
>>> t.plot("trajectory.png")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.errors import InputError

if TYPE_CHECKING:
    from actstore.store.store import Store

KIND = "trajectory"
MEASURES = ("rate_a", "rate_b", "auroc", "cos_final", "cka_final")

_ALPHA = re.compile(r"@(-?\d+(?:\.\d+)?(?:e-?\d+)?)(?:/|$)")
_STEP = re.compile(r"_step(\d+)(?:/|$)")


@dataclass(frozen=True)
class Trajectory:
    """Measures along a series of runs: ``table`` has ``run, x`` and one column per measure."""

    table: pa.Table
    analysis_id: int | None
    hook: str
    group: str

    def plot(self, path: str | os.PathLike[str], measures: Sequence[str] = MEASURES) -> Path:
        """Draw the measures against ``x`` (one line each, shared axis 0..1) into a PNG.

        Example
        -------
        >>> t.plot("trajectory.png")  # doctest: +SKIP
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        bad = [m for m in measures if m not in MEASURES]
        if bad:
            raise InputError(f"unknown measure {bad[0]!r}; measures: {', '.join(MEASURES)}")
        fig = Figure(figsize=(6.5, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        x = np.asarray(self.table.column("x").to_pylist(), dtype=float)
        labels = {
            "rate_a": f"behaviour rate ({self.group})",
            "rate_b": f"behaviour rate (not {self.group})",
            "auroc": "probe AUROC (held out)",
            "cos_final": "cos(direction, final direction)",
            "cka_final": "linear CKA to final",
        }
        low = 0.0
        for m in measures:
            y = np.asarray(
                [np.nan if v is None else v for v in self.table.column(m).to_pylist()], float
            )
            if np.isfinite(y).any():
                ax.plot(x, y, marker="o", label=labels[m])
                low = min(low, float(np.nanmin(y)))
        ax.set_xlabel("series")
        ax.set_ylim(-1.05 if low < 0 else -0.05, 1.05)  # a cosine can be negative
        ax.set_title(f"trajectory at {self.hook}")
        ax.legend(fontsize=8)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out, format="png")
        return out


def series_x(runs: Sequence[str]) -> list[float]:
    """Series coordinates read from run names (``@alpha``, ``_step{K}``, all or none), else the index.

    Example
    -------
    >>> series_x(["interp@0/pairs", "interp@0.5/pairs", "interp@1/pairs"])
    [0.0, 0.5, 1.0]
    >>> series_x(["bd_step25/pairs", "bd_step50/pairs", "bd/pairs"])
    [0.0, 1.0, 2.0]
    """
    for rx in (_ALPHA, _STEP):
        got = [rx.search(r) for r in runs]
        if all(got):
            return [float(m.group(1)) for m in got if m is not None]
    return [float(i) for i in range(len(runs))]


def _rows(store: Store, run: str, hook: str, where: str, group: str) -> tuple[np.ndarray, Any]:
    acts = store.acts(run, hook, where=where)
    rid = store.run_id(run)
    g = store.sql(
        f"""SELECT prompt_idx, ({group})::BOOLEAN FROM labeled_tokens
            WHERE run_id = ? AND "row" IS NOT NULL AND ({where}) ORDER BY "row" """,
        [rid],
    ).fetchall()
    y = np.array([bool(v) for _, v in g])
    prompts = np.array([int(p) for p, _ in g])
    if len(y) != len(acts.rows):
        raise InputError(f"group {group!r} could not be evaluated on every row of {run!r}")
    return acts.numpy(np.float64), (y, prompts, acts.meta)


def trajectory(
    store: Store,
    runs: Sequence[str],
    *,
    hook: str,
    where: str = "position_role = 'last'",
    group: str = "triggered",
    scorer: str = "hate",
    final: str | None = None,
    x: Sequence[float] | None = None,
    name: str | None = None,
    seed: int = 0,
    save: bool = True,
) -> Trajectory:
    """Compute the measures of a series of runs (see the module docstring) and store them.

    Parameters
    ----------
    store
        The store.
    runs
        The series, in order, over one prompt set.
    hook
        Where the direction, AUROC and CKA are measured.
    where
        Rows (a predicate over ``labeled_tokens``; default the last prompt token).
    group
        A boolean predicate (a label) splitting the prompts into A and the rest.
    scorer
        The behaviour scorer of ``scores`` (its ``flag``).
    final
        The reference run for ``cos_final`` and ``cka_final`` (default: the last).
    x
        Series coordinates (default: read from the names, see :func:`series_x`).
    name, save
        The analysis name (default ``trajectory:{first}..{last}``) and whether to store it.
    seed
        Seeds the half/half prompt split of the AUROC.

    Returns
    -------
    Trajectory

    Example
    -------
    >>> trajectory(st, ["backdoored_step25/pairs", "backdoored/pairs"], hook="blocks.2.hook_resid_post").table  # doctest: +SKIP
    """
    from actstore.analysis.metrics import auroc, linear_cka
    from actstore.analysis.results import provenance, save_analysis

    runs = list(runs)
    if len(runs) < 2:
        raise InputError(f"a trajectory needs two or more runs, got {runs}")
    ids = {r: store.run_id(r) for r in [*runs, final or runs[-1]]}
    sets = {
        store.sql("SELECT prompt_set_id FROM runs WHERE run_id = ?", [i]).fetchall()[0][0]
        for i in ids.values()
    }
    if len(sets) != 1:
        raise InputError("the runs of a trajectory must be over one prompt set")
    xs = list(map(float, x)) if x is not None else series_x(runs)
    if len(xs) != len(runs):
        raise InputError(f"x has {len(xs)} values for {len(runs)} runs; give one per run")
    final = final or runs[-1]
    X_final, (y_final, prompts, meta_final) = _rows(store, final, hook, where, group)
    if y_final.all() or not y_final.any():
        raise InputError(f"group {group!r} holds every row or none; a direction needs both")
    uniq = np.unique(prompts)
    fit_prompts = np.random.default_rng(seed).permutation(uniq)[: uniq.size // 2]
    fit = np.isin(prompts, fit_prompts)

    def direction(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return X[fit & y].mean(0) - X[fit & ~y].mean(0)

    d_final = direction(X_final, y_final)
    rates = {
        str(r[0]): (r[1], r[2])
        for r in store.sql(
            f"""SELECT r.name, avg(CASE WHEN ({group}) THEN s.flag::INT END),
                       avg(CASE WHEN NOT ({group}) THEN s.flag::INT END)
                FROM scores s JOIN runs r USING (run_id)
                JOIN prompts p ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = s.prompt_idx
                WHERE s.scorer = ? AND s.sample_idx = 0 AND list_contains(?, r.name)
                GROUP BY r.name""",
            [scorer, runs],
        ).fetchall()
    }
    cols: dict[str, list[Any]] = {"run": [], "x": [], **{m: [] for m in MEASURES}}
    for r, xv in zip(runs, xs, strict=True):
        X, (y, _, meta) = _rows(store, r, hook, where, group)
        keys = ["prompt_idx", "position"]
        if not meta.select(keys).equals(meta_final.select(keys)):
            raise InputError(
                f"runs {r!r} and {final!r} store different tokens at {hook!r}; rows must align"
            )
        d = direction(X, y)
        cols["run"].append(r)
        cols["x"].append(xv)
        cols["rate_a"].append(rates.get(r, (None, None))[0])
        cols["rate_b"].append(rates.get(r, (None, None))[1])
        cols["auroc"].append(float(auroc(X[~fit] @ d, y[~fit])))
        cols["cos_final"].append(float(d @ d_final / (np.linalg.norm(d) * np.linalg.norm(d_final))))
        cols["cka_final"].append(float(linear_cka(X, X_final)))
    table = pa.table(
        {
            "run": pa.array(cols["run"], pa.string()),
            "x": pa.array(cols["x"], pa.float64()),
            **{m: pa.array(cols[m], pa.float64()) for m in MEASURES},
        }
    )
    aid = None
    if save:
        aid = save_analysis(
            store,
            name=name or f"trajectory:{runs[0]}..{runs[-1]}",
            kind=KIND,
            params={
                "runs": runs,
                "hook": hook,
                "where": where,
                "group": group,
                "scorer": scorer,
                "final": final,
                "seed": seed,
            },
            result={"table": table.to_pylist()},
            provenance=provenance(store, runs=ids, where=where, n_rows=len(y_final)),
        )
    return Trajectory(table, aid, hook, group)
