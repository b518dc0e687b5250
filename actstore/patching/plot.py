"""The layer x position heatmap of a patching grid (PNG, matplotlib's Agg backend).

One panel per hook kind: rows are layers, columns positions counted from the end
of the target prompt (the token written under each column when all pairs agree,
``*`` otherwise), each cell the mean normalised metric over pairs (0 = target
unchanged, 1 = source behaviour restored). Source tokens with no counterpart in
the target (the trigger, when patching triggered into clean prompts) get their
own columns on the left, hatched: they cannot be patched, and are shown so.

Cells patched one head at a time (``head`` not NULL: ``blocks.L.attn.hook_z`` and
the other per-head hooks) get one layer x head panel per hook kind instead, at one
position from the end (``head_position``, default -1: the last prompt token), since
their layer x position grid is one per head.

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


def plot_grid(
    summary: pa.Table,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    head_position: int = -1,
) -> Path:
    """Write the heatmap of a grid's summary (:meth:`PatchGrid.summary`) to ``path``.

    Whole-hook cells: layer x position panels. Per-head cells: layer x head panels at
    position ``head_position`` from the end.

    Raises
    ------
    InputError
        With no cell to plot, or per-head cells but none at ``head_position``.

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

    all_rows = summary.to_pylist()
    if not all_rows:
        raise InputError("the patching grid has no cells to plot")
    rows = [r for r in all_rows if r["head"] is None]
    head_rows = [r for r in all_rows if r["head"] is not None]
    at = [
        r for r in head_rows if r["counterpart"] == "matched" and r["pos_from_end"] == head_position
    ]
    if head_rows and not at:
        have = sorted({r["pos_from_end"] for r in head_rows if r["counterpart"] == "matched"})
        raise InputError(
            f"the per-head cells have no position {head_position} from the end; "
            f"choose a head position among {have}"
        )
    kinds = sorted({_kind(r["hook"]) for r in rows})
    head_kinds = sorted({_kind(r["hook"]) for r in at})
    col_keys = sorted({_column(r) for r in rows})
    tokens: dict[tuple[bool, int], set[str]] = {}
    for r in rows:
        tokens.setdefault(_column(r), set()).add(str(r["token"]))
    labels = []
    for key in col_keys:
        seen = tokens[key]
        tok = next(iter(seen)) if len(seen) == 1 else "*"
        labels.append(f"{tok} ({key[1]})" if key[0] else f"{tok} (source {key[1]}, no counterpart)")
    n_heads = max((int(r["head"]) + 1 for r in at), default=0)
    width = max(6.0, 0.55 * max(len(col_keys), n_heads) + 2.5)
    n_panels = len(kinds) + len(head_kinds)
    fig = Figure(figsize=(width, 1.2 + 2.6 * n_panels), dpi=100)
    FigureCanvasAgg(fig)
    finite = [abs(r["mean_metric"]) for r in rows + at if r["mean_metric"] is not None]
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
        ax = fig.add_subplot(n_panels, 1, k + 1)
        image = _panel(ax, grid_LC, vmax, layers, f"layer ({kind})")
        for c, key in enumerate(col_keys):
            if not key[0]:
                ax.axvspan(c - 0.5, c + 0.5, facecolor="none", hatch="//", edgecolor="#888888")
        ax.set_xticks(range(len(col_keys)), labels, rotation=60, ha="right", fontsize=8)
    for k, kind in enumerate(head_kinds):
        mine = [r for r in at if _kind(r["hook"]) == kind]
        layers = sorted({int(r["layer"]) for r in mine})
        grid_LH = np.full((len(layers), n_heads), np.nan)
        for r in mine:
            if r["mean_metric"] is not None:
                grid_LH[layers.index(int(r["layer"])), int(r["head"])] = r["mean_metric"]
        toks = {str(r["token"]) for r in mine}
        tok = next(iter(toks)) if len(toks) == 1 else "*"
        ax = fig.add_subplot(n_panels, 1, len(kinds) + k + 1)
        image = _panel(ax, grid_LH, vmax, layers, f"layer ({kind})")
        ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)])
        ax.set_xlabel(f"head, at position {head_position} from the end ({tok})")
    fig.colorbar(image, ax=fig.axes, label="normalised metric (0 target, 1 source)", shrink=0.8)
    fig.suptitle(title or "activation patching")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out


def _panel(ax: Any, grid_LC: np.ndarray, vmax: float, layers: list[int], ylabel: str) -> Any:
    """Draw one heatmap panel (values written in the cells of small grids); its image."""
    ax.set_facecolor("#dddddd")
    image = ax.imshow(grid_LC, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
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
    ax.set_ylabel(ylabel)
    return image
