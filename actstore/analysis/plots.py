"""Plots of analysis results, saved as PNG with matplotlib's Agg backend.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, never
through ``pyplot``, so plotting neither needs a display nor changes the
caller's matplotlib state.

- :func:`plot_pca`: rows on two principal components, coloured by a label;
- :func:`plot_auroc_by_layer`: held-out AUROC per layer for each method, over
  the random-direction baseline (a band from its mean to its percentile, and its max);
- :func:`plot_feature_effects`: horizontal bars of a per-feature statistic
  (reward correlation, change between checkpoints, cosine with a direction).

Example
-------
>>> plot_auroc_by_layer(contrast_result, "auroc.png")  # doctest: +SKIP
PosixPath('auroc.png')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.errors import InputError


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def plot_pca(
    result: Any,
    path: str | os.PathLike[str],
    *,
    color: str | None = None,
    hook: str | None = None,
    components: tuple[int, int] = (0, 1),
    title: str | None = None,
) -> Path:
    """Scatter the rows of a PCA on two components, coloured by a metadata column.

    Parameters
    ----------
    result
        A :class:`~actstore.analysis.pca.PCAResult` computed with ``project=True``.
    path
        The PNG to write.
    color
        A column of the rows' metadata (a label such as ``triggered``); a column with
        few distinct values gets one colour each and a legend, a numeric one a colour bar.
    hook
        Which fit, when there are several.
    components
        The two components (0-based).

    Example
    -------
    >>> plot_pca(res, "pca.png", color="triggered")  # doctest: +SKIP
    """
    table = result.projections(hook)
    a, b = components
    x = table.column(f"pc{a}").to_numpy()
    y = table.column(f"pc{b}").to_numpy()
    fit = result.fit(hook)
    fig = _figure((6.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    if color is None:
        ax.scatter(x, y, s=8, alpha=0.7)
    else:
        if color not in table.column_names:
            raise InputError(f"color={color!r} is not a row column; columns: {table.column_names}")
        values = table.column(color).to_pylist()
        distinct = sorted({str(v) for v in values})
        numeric = pa.types.is_floating(table.schema.field(color).type) or (
            pa.types.is_integer(table.schema.field(color).type) and len(distinct) > 10
        )
        if numeric:
            c = np.array([np.nan if v is None else float(v) for v in values])
            sc = ax.scatter(x, y, s=8, alpha=0.8, c=c, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=color)
        else:
            labels = np.array([str(v) for v in values])
            for value in distinct:
                m = labels == value
                ax.scatter(x[m], y[m], s=8, alpha=0.7, label=f"{color}={value}")
            ax.legend(loc="best", fontsize=8)
    ratio = fit.explained_variance_ratio
    ax.set_xlabel(f"PC{a} ({100 * ratio[a]:.1f}%)")
    ax.set_ylabel(f"PC{b} ({100 * ratio[b]:.1f}%)")
    ax.set_title(title or f"{result.run}: {fit.label}", fontsize=9)
    return _save(fig, path)


def plot_auroc_by_layer(
    result: Any,
    path: str | os.PathLike[str],
    *,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Held-out AUROC of each method by layer, over the random-direction baseline band.

    Parameters
    ----------
    result
        A :class:`~actstore.analysis.contrast.ContrastResult`.
    path
        The PNG to write.
    methods
        Methods to draw (default: all fitted).

    Example
    -------
    >>> plot_auroc_by_layer(res, "auroc.png")  # doctest: +SKIP
    """
    layers = list(result.layers)
    xs = np.array(
        [e.layer if e.layer is not None else i for i, e in enumerate(layers)], dtype=float
    )
    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    lo = np.array([e.random.mean for e in layers])
    hi = np.array([e.random.percentile for e in layers])
    mx = np.array([e.random.max for e in layers])
    q = layers[0].random.q if layers else 95.0
    ax.fill_between(xs, lo, hi, color="0.8", label=f"random: mean to p{q:g}")
    ax.plot(xs, mx, ls=":", color="0.5", label="random: max")
    names = list(methods) if methods is not None else list(layers[0].directions) if layers else []
    for m in names:
        ax.plot(xs, [e.auroc.get(m, np.nan) for e in layers], marker="o", label=m)
    ax.axhline(0.5, color="0.6", lw=0.8)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out AUROC" if result.held_out else "AUROC (in-sample)")
    ax.set_xticks(xs)
    ax.set_title(title or f"{result.name} ({result.run})", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _effects_table(result: Any) -> tuple[pa.Table, str, str]:
    if isinstance(result, pa.Table):
        table = result
    elif hasattr(result, "features") and isinstance(getattr(result, "features", None), pa.Table):
        return result.features, "delta_mean", "feature"
    elif hasattr(result, "cosines"):
        return result.summary(), "cosine", "feature"
    elif hasattr(result, "table"):
        table = result.table
    else:
        raise InputError(
            f"cannot plot feature effects of {type(result).__name__}; pass a reward, diff or "
            "SAE-decomposition result, or an Arrow table"
        )
    label = "direction" if "direction" in table.column_names else "feature"
    value = "spearman_r" if "spearman_r" in table.column_names else table.column_names[-1]
    return table, value, label


def plot_feature_effects(
    result: Any,
    path: str | os.PathLike[str],
    *,
    value: str | None = None,
    label: str | None = None,
    k: int = 20,
    title: str | None = None,
) -> Path:
    """Horizontal bars of the ``k`` features with the largest ``|value|``.

    Parameters
    ----------
    result
        A reward-correlation result (default value ``spearman_r``), a checkpoint
        diff with SAE features (``delta_mean``), an SAE decomposition (``cosine``),
        or an Arrow table.
    path
        The PNG to write.
    value, label
        Columns for the bar length and the bar label.
    k
        Bars drawn.

    Example
    -------
    >>> plot_feature_effects(reward_result, "features.png", k=15)  # doctest: +SKIP
    """
    table, default_value, default_label = _effects_table(result)
    value = value or default_value
    label = label or default_label
    for col in (value, label):
        if col not in table.column_names:
            raise InputError(f"column {col!r} not in the result; columns: {table.column_names}")
    vals = np.array([np.nan if v is None else float(v) for v in table.column(value).to_pylist()])
    names = [str(v) for v in table.column(label).to_pylist()]
    order = np.argsort(-np.nan_to_num(np.abs(vals), nan=-1.0), kind="stable")[:k][::-1]
    fig = _figure((6.5, max(2.5, 0.3 * len(order) + 1.0)))
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:red" if vals[i] < 0 else "tab:blue" for i in order]
    ax.barh(np.arange(len(order)), vals[order], color=colors)
    ax.set_yticks(np.arange(len(order)))
    ax.set_yticklabels([f"{label} {names[i]}" if label == "feature" else names[i] for i in order])
    ax.axvline(0.0, color="0.4", lw=0.8)
    ax.set_xlabel(value)
    ax.set_title(title or getattr(result, "name", "feature effects"), fontsize=9)
    return _save(fig, path)
