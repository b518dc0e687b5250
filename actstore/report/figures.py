"""The report's charts: matplotlib figures as SVG text, byte-identical for identical inputs.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas (no
``pyplot``, no display) and saved as SVG with a fixed hash salt and no date,
so an unchanged page gets an unchanged file. Each function takes plain values
(what :mod:`actstore.report.data` and the stored analysis records hold).

Example
-------
>>> svg = histogram({"triggered": [0.5, 0.7], "not triggered": []}, title="feature 3")
>>> svg.lstrip().startswith("<?xml")
True
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown")


def _plain(text: Any) -> str:
    """Text from the store, shown literally (matplotlib would parse ``$...$`` as math)."""
    return str(text).replace("$", r"\$")


def _figure(size: tuple[float, float], bottom: float = 0.14) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    # fixed margins: tight_layout measures every text and costs more than the drawing
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=bottom)
    return fig


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "actstore-report", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def histogram(groups: Mapping[str, Sequence[float]], *, title: str, bins: int = 30) -> str:
    """Histogram of a feature's nonzero activations, one colour per group, log counts.

    Example
    -------
    >>> "svg" in histogram({"all": [1.0, 2.0]}, title="f")
    True
    """
    fig = _figure((5.2, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    values = [np.asarray(v, float) for v in groups.values()]
    allv = np.concatenate(values) if values else np.zeros(0)
    if allv.size:
        edges = np.linspace(float(allv.min()), float(allv.max()) or 1.0, bins + 1)
        if edges[0] == edges[-1]:
            edges = np.linspace(edges[0] - 0.5, edges[0] + 0.5, bins + 1)
        for i, (name, v) in enumerate(groups.items()):
            if len(v):
                counts, _ = np.histogram(np.asarray(v, float), bins=edges)
                ax.stairs(
                    counts,
                    edges,
                    fill=True,
                    alpha=0.55,
                    color=_COLORS[i % len(_COLORS)],
                    label=_plain(f"{name} ({len(v)})"),
                )
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "never fires", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("activation (nonzero tokens)")
    ax.set_ylabel("tokens")
    ax.set_title(_plain(title), fontsize=9)
    return _svg(fig)


def grouped_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str,
) -> str:
    """Vertical bars per category (a run), one bar per series (a label value).

    Example
    -------
    >>> "svg" in grouped_bars(["a", "b"], {"x": [0.1, None]}, title="t", ylabel="freq")
    True
    """
    n = max(1, len(series))
    fig = _figure((min(7.5, max(4.5, 0.3 * len(categories) * n + 1.5)), 4.2), bottom=0.38)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(categories))
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if x is None else float(x) for x in vals])
        ax.bar(xs + (i - (n - 1) / 2) * width, v, width, label=_plain(name), color=_COLORS[i % 6])
    ax.set_xticks(xs)
    ax.set_xticklabels([_plain(c) for c in categories], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(_plain(title), fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _svg(fig)


def auroc_by_layer(layers: Sequence[Mapping[str, Any]], *, title: str, held_out: bool) -> str:
    """AUROC of each method by layer over the random-direction band (mean to percentile, max).

    ``layers`` are the stored contrast result's ``layers`` entries.

    Example
    -------
    >>> L = [{"layer": 0, "auroc": {"m": 0.9}, "random": {"mean": 0.5, "percentile": 0.6,
    ...       "max": 0.7, "q": 95}}]
    >>> "svg" in auroc_by_layer(L, title="t", held_out=True)
    True
    """
    xs = np.array(
        [e.get("layer") if e.get("layer") is not None else i for i, e in enumerate(layers)], float
    )
    fig = _figure((6.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    rnd = [e.get("random") or {} for e in layers]
    if rnd and all("mean" in r for r in rnd):
        lo = np.array([np.nan if r["mean"] is None else r["mean"] for r in rnd], float)
        hi = np.array([np.nan if r.get("percentile") is None else r["percentile"] for r in rnd])
        mx = np.array([np.nan if r.get("max") is None else r["max"] for r in rnd], float)
        q = rnd[0].get("q", 95)
        ax.fill_between(xs, lo, hi.astype(float), color="0.82", label=f"random: mean to p{q:g}")
        ax.plot(xs, mx, ls=":", color="0.5", label="random: max")
    methods: list[str] = []
    for e in layers:
        methods += [m for m in (e.get("auroc") or {}) if m not in methods]
    for m in methods:
        ys = [(e.get("auroc") or {}).get(m) for e in layers]
        ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=_plain(m))
    ax.axhline(0.5, color="0.6", lw=0.8)
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(xs)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out AUROC" if held_out else "AUROC (in-sample)")
    ax.set_title(_plain(title), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return _svg(fig)


def scatter(
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[Any] | None,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    label_name: str | None,
) -> str:
    """Points coloured by a label (one colour per distinct value, a legend).

    Example
    -------
    >>> "svg" in scatter([0, 1], [1, 0], [True, False], title="t", xlabel="a", ylabel="b",
    ...                   label_name="triggered")
    True
    """
    fig = _figure((5.2, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    X, Y = np.asarray(x, float), np.asarray(y, float)
    if labels is None:
        ax.scatter(X, Y, s=9, alpha=0.7)
    else:
        lab = np.array([str(v) for v in labels])
        for i, value in enumerate(sorted(set(lab.tolist()))):
            m = lab == value
            ax.scatter(
                X[m],
                Y[m],
                s=9,
                alpha=0.7,
                color=_COLORS[i % 6],
                label=_plain(f"{label_name}={value}"),
            )
        ax.legend(fontsize=8)
    ax.set_xlabel(_plain(xlabel))
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title), fontsize=9)
    return _svg(fig)


def heatmap(
    matrix: Sequence[Sequence[float | None]],
    *,
    title: str,
    xlabels: Sequence[str] | None = None,
    ylabels: Sequence[str] | None = None,
) -> str:
    """A matrix as a colour grid with a colour bar (patching grids, similarity matrices).

    Example
    -------
    >>> "svg" in heatmap([[0.0, 1.0], [0.5, None]], title="t")
    True
    """
    M = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], float)
    fig = _figure((max(4.0, 0.35 * M.shape[1] + 2.5), max(3.0, 0.3 * M.shape[0] + 1.8)), 0.16)
    ax = fig.add_subplot(1, 1, 1)
    finite = M[np.isfinite(M)]
    lim = float(np.abs(finite).max()) if finite.size else 1.0
    signed = finite.size and finite.min() < 0
    im = ax.imshow(
        M,
        aspect="auto",
        cmap="RdBu_r" if signed else "viridis",
        vmin=-lim if signed else None,
        vmax=lim if signed else None,
    )
    fig.colorbar(im, ax=ax)
    for labels, setter, ticks in (
        (xlabels, ax.set_xticklabels, ax.set_xticks),
        (ylabels, ax.set_yticklabels, ax.set_yticks),
    ):
        if labels is not None:
            ticks(np.arange(len(labels)))
            setter([_plain(v) for v in labels], fontsize=7)
    ax.set_title(_plain(title), fontsize=9)
    return _svg(fig)


def lines(
    x: Sequence[Any],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
) -> str:
    """One line per numeric series over a shared x (steering curves, trajectories, sweeps).

    Example
    -------
    >>> "svg" in lines([0, 1, 2], {"rate": [0.1, 0.4, None]}, title="t", xlabel="alpha")
    True
    """
    numeric_x = all(isinstance(v, int | float) and not isinstance(v, bool) for v in x)
    fig = _figure((5.6, 3.6), bottom=0.14 if numeric_x else 0.3)
    ax = fig.add_subplot(1, 1, 1)
    numeric_x = all(isinstance(v, int | float) and not isinstance(v, bool) for v in x)
    xs = np.asarray(x, float) if numeric_x else np.arange(len(x))
    for i, (name, ys) in enumerate(series.items()):
        v = np.array([np.nan if y is None else float(y) for y in ys])
        ax.plot(xs, v, marker="o", ms=3, color=_COLORS[i % 6], label=_plain(name))
    if not numeric_x:
        ax.set_xticks(xs)
        ax.set_xticklabels([_plain(v) for v in x], rotation=30, ha="right", fontsize=7)
    ax.set_xlabel(_plain(xlabel))
    ax.set_title(_plain(title), fontsize=9)
    if series:
        ax.legend(fontsize=8)
    return _svg(fig)
