"""The layer x position heatmap of a patching grid (PNG, matplotlib's Agg backend).

One panel per hook kind: rows are layers, columns positions counted from the end
of the target prompt (the token written under each column when all pairs agree,
``*`` otherwise), each cell the mean normalised metric over pairs (0 = target
unchanged, 1 = source behaviour restored). Source tokens with no counterpart in
the target (the trigger, when patching triggered into clean prompts) get their
own columns on the left, hatched: they cannot be patched, and are shown so.

Example
-------
>>> plot_grid(grid.summary().arrow(), "patch.png")  # doctest: +SKIP
PosixPath('patch.png')
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.errors import InputError

__all__ = ["plot_grid"]


def _kind(hook: str) -> str:
    from actstore.ingest.families import parse_hook

    return parse_hook(hook)[1]


def _column(row: dict[str, Any]) -> tuple[bool, int]:
    """Source-only tokens by source position (first), the others by position from the end."""
    if row["counterpart"] == "source_only":
        return (False, int(row["source_position"]))
    return (True, int(row["pos_from_end"]))


def plot_grid(summary: pa.Table, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the heatmap of a grid's summary (:meth:`PatchGrid.summary`) to ``path``.

    Example
    -------
    >>> import tempfile, pyarrow as pa
    >>> t = pa.table({"hook": ["blocks.0.hook_resid_pre"] * 2, "layer": [0, 0],
    ...               "head": [None, None], "pos_from_end": [-2, -1], "source_position": [None, None],
    ...               "counterpart": ["matched"] * 2, "token": ["a", "b"],
    ...               "mean_metric": [0.1, 0.9], "n_pairs": [3, 3]})
    >>> plot_grid(t, tempfile.mkdtemp() + "/g.png").suffix
    '.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = summary.to_pylist()
    if not rows:
        raise InputError("the patching grid has no cells to plot")
    kinds = sorted({_kind(r["hook"]) for r in rows})
    col_keys = sorted({_column(r) for r in rows})
    tokens: dict[tuple[bool, int], set[str]] = {}
    for r in rows:
        tokens.setdefault(_column(r), set()).add(str(r["token"]))
    labels = []
    for key in col_keys:
        seen = tokens[key]
        tok = next(iter(seen)) if len(seen) == 1 else "*"
        labels.append(f"{tok} ({key[1]})" if key[0] else f"{tok} (source {key[1]}, no counterpart)")
    fig = Figure(figsize=(max(6.0, 0.55 * len(col_keys) + 2.5), 1.2 + 2.6 * len(kinds)), dpi=100)
    FigureCanvasAgg(fig)
    finite = [abs(r["mean_metric"]) for r in rows if r["mean_metric"] is not None]
    vmax = max(1.0, max(finite, default=1.0))
    image: Any = None
    for k, kind in enumerate(kinds):
        mine = [r for r in rows if _kind(r["hook"]) == kind]
        layers = sorted({int(r["layer"]) for r in mine})
        grid_LC = np.full((len(layers), len(col_keys)), np.nan)
        for r in mine:
            if r["mean_metric"] is None:
                continue
            grid_LC[layers.index(int(r["layer"])), col_keys.index(_column(r))] = r["mean_metric"]
        ax = fig.add_subplot(len(kinds), 1, k + 1)
        ax.set_facecolor("#dddddd")
        image = ax.imshow(grid_LC, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for c, key in enumerate(col_keys):
            if not key[0]:
                ax.axvspan(c - 0.5, c + 0.5, facecolor="none", hatch="//", edgecolor="#888888")
        if grid_LC.size <= 400:
            for i, j in np.ndindex(grid_LC.shape):
                v = grid_LC[i, j]
                if not math.isnan(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if abs(v) > 0.6 * vmax else "black",
                    )
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_ylabel(f"layer ({kind})")
        ax.set_xticks(range(len(col_keys)), labels, rotation=60, ha="right", fontsize=8)
    fig.colorbar(image, ax=fig.axes, label="normalised metric (0 target, 1 source)", shrink=0.8)
    fig.suptitle(title or "activation patching")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out
