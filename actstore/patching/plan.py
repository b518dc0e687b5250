"""A patching request, checked and resolved: runs, pairs, alignments, cells, metric tokens.

Exact patching (:mod:`actstore.patching.grid`) and attribution patching
(:mod:`actstore.patching.attribution`) take the same request; :func:`make_plan`
checks all of it against the store before any model is loaded or any byte is
written, and returns a :class:`Plan`: the target and source runs, the pairs
with their prompts' tokens and stored rows, each pair's alignment, the cells to
compute, and the metric's token ids. :func:`cell_table` and :func:`pair_table`
turn computed values into the rows of ``patch_cells`` / ``patch_pairs``.

Example
-------
>>> plan = make_plan(st, run="backdoored/pairs", hooks="blocks.*.hook_resid_pre")  # doctest: +SKIP
>>> len(plan.pairs), len(plan.cells)  # doctest: +SKIP
(8, 368)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from actstore.errors import InputError
from actstore.patching.metric import MetricSpec, normalise
from actstore.patching.pairs import ALIGNMENTS, Alignment, Pair, align, check_predicate, find_pairs
from actstore.patching.tables import CELL_SCHEMA, PAIR_SCHEMA, check_new_name

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = [
    "Cell",
    "Plan",
    "Prompt",
    "cell_table",
    "load_model",
    "make_plan",
    "pair_table",
    "prompts_of",
    "run_record",
]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a run: its token ids, and per position the stored row, text and role."""

    prompt_idx: int
    ids: list[int]
    rows: list[int | None]
    texts: list[str]
    roles: list[str]
    from_end: list[int]


def run_record(st: Store, run: str | int) -> dict[str, Any]:
    """The run's catalog record with its checkpoint and layer count (edited runs refused).

    Example
    -------
    >>> run_record(st, "backdoored/pairs")["n_layers"]  # doctest: +SKIP
    4
    """
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


def prompts_of(st: Store, rid: int, prompt_idx: Sequence[int]) -> dict[int, Prompt]:
    """The prompts of run ``rid`` with those indices: token ids, stored rows, texts, roles.

    Example
    -------
    >>> prompts_of(st, 1, [0])[0].ids  # doctest: +SKIP
    [2, 10, 11, 12, 13, 17, 27, 14, 5, 6]
    """
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


def load_model(rec: Mapping[str, Any], device: str) -> Any:
    """Load a run's checkpoint (its recorded weights, else an error).

    Example
    -------
    >>> model = load_model(run_record(st, "backdoored/pairs"), "cpu")  # doctest: +SKIP
    """
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


@dataclass(frozen=True)
class Cell:
    """One cell to compute: pair index, hook, target and source positions, source row, head.

    ``head`` is None for the whole hook, else the head whose ``d_head`` columns alone
    are patched (per-head hooks, :attr:`Plan.heads`).
    """

    pair: int  # index into the pairs list
    hook: str
    target_position: int
    source_position: int
    source_row: int  # the source run's stored row at source_position
    head: int | None = None

    @property
    def key(self) -> tuple[int, str, int, int | None]:
        """``(pair, hook, target position, head)``: the key of its value in :func:`cell_table`.

        Example
        -------
        >>> Cell(0, "blocks.0.attn.hook_z", 5, 6, 41, head=2).key
        (0, 'blocks.0.attn.hook_z', 5, 2)
        """
        return (self.pair, self.hook, self.target_position, self.head)


def source_values(st: Store, run: str, hook: str, rows: list[int]) -> dict[int, torch.Tensor]:
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


@dataclass
class Plan:
    """A checked request (see the module docstring)."""

    store: Store
    target: dict[str, Any]
    source: dict[str, Any]
    spec: MetricSpec
    hooks: list[str]
    name: str
    pairs: list[Pair]
    tprompts: dict[int, Prompt]
    sprompts: dict[int, Prompt]
    chosen: dict[int, set[int]]
    alignments: list[Alignment]
    cells: list[Cell]
    good: list[int]
    bad: list[int]
    params: dict[str, Any]
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Hook -> ``(heads, d_head)`` of the hooks patched one head at a time."""

    def heads_of(self, hook: str) -> list[int | None]:
        """The heads of ``hook``'s cells: ``[0 .. H-1]`` patched per head, else ``[None]``.

        Example
        -------
        >>> plan.heads_of("blocks.0.attn.hook_z"), plan.heads_of("blocks.0.hook_resid_pre")  # doctest: +SKIP
        ([0, 1, 2, 3], [None])
        """
        if hook in self.heads:
            return list(range(self.heads[hook][0]))
        return [None]

    @property
    def t_ids(self) -> list[list[int]]:
        """Each pair's target token ids."""
        return [self.tprompts[p.target_prompt].ids for p in self.pairs]

    @property
    def s_ids(self) -> list[list[int]]:
        """Each pair's source token ids."""
        return [self.sprompts[p.source_prompt].ids for p in self.pairs]


def make_plan(
    st: Store,
    *,
    kind: str,
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
    name: str | None = None,
    replace: bool = False,
    per_head: bool = False,
) -> Plan:
    """Check a patching request against the store and resolve it (see :func:`patch_grid`).

    ``per_head``: the hooks stored with a head layout (``blocks.L.attn.hook_q/k/v/z``,
    the array attribute ``heads``) get one cell per head instead of one per hook.

    Raises
    ------
    InputError, RunNotFoundError, HookNotFoundError, SpecError
        For any bad argument.

    Example
    -------
    >>> plan = make_plan(st, kind="patch_grid", run="backdoored/pairs")  # doctest: +SKIP
    """
    from actstore.ingest.families import expand_hooks, parse_hook
    from actstore.ingest.models import load_tokenizer

    spec = metric if isinstance(metric, MetricSpec) else MetricSpec.parse(metric)
    if alignment not in ALIGNMENTS:
        raise InputError(f"alignment {alignment!r} is not one of {', '.join(ALIGNMENTS)}")
    tgt = run_record(st, run)
    src = run_record(st, source_run) if source_run is not None else tgt
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
    heads: dict[str, tuple[int, int]] = {}
    if per_head:
        for h in hook_names:
            layout = st.array(src["name"], h)[0].attrs.get("heads")
            if layout:
                heads[h] = (int(layout[0]), int(layout[1]))
    name = name or f"{kind}:{tgt['name']}:{hooks if isinstance(hooks, str) else ','.join(hooks)}"
    found = find_pairs(
        st,
        int(tgt["prompt_set_id"]),
        pairs=pairs,
        source=source,
        target=target,
        where=where,
        same_prompt=src["run_id"] != tgt["run_id"],
    )
    tprompts = prompts_of(st, int(tgt["run_id"]), [p.target_prompt for p in found])
    sprompts = prompts_of(st, int(src["run_id"]), [p.source_prompt for p in found])
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
    cells: list[Cell] = []
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
            cells.extend(
                Cell(k, h, t, s, int(row), head)
                for h in hook_names
                for head in (range(heads[h][0]) if h in heads else [None])
            )
    good, bad = spec.token_ids(tok, [p.labels for p in found])
    if not replace:
        check_new_name(st, name, kind)
    limits = {h: int(st.array_info(src["name"], h)["n_rows"]) for h in hook_names}
    for c in cells:
        if c.source_row >= limits[c.hook]:
            raise InputError(
                f"source run {src['name']!r} has no committed {c.hook!r} row for prompt "
                f"{found[c.pair].source_prompt}; finish its ingest first"
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
        "per_head": sorted(heads),
    }
    return Plan(
        st,
        tgt,
        src,
        spec,
        hook_names,
        name,
        found,
        tprompts,
        sprompts,
        chosen,
        alignments,
        cells,
        good,
        bad,
        params,
        heads,
    )


def pair_table(plan: Plan, m_target: torch.Tensor, m_source: torch.Tensor) -> pa.Table:
    """The ``patch_pairs`` rows of a plan, given the unpatched metrics (without the key columns).

    Example
    -------
    >>> pair_table(plan, m_target, m_source).num_rows  # doctest: +SKIP
    8
    """
    found, good, bad = plan.pairs, plan.good, plan.bad
    t_ids, s_ids = plan.t_ids, plan.s_ids
    return pa.table(
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


def cell_table(
    plan: Plan,
    values: Mapping[tuple[int, str, int, int | None], float],
    m_target: torch.Tensor,
    m_source: torch.Tensor,
) -> pa.Table:
    """The ``patch_cells`` rows of a plan (without the key columns).

    Parameters
    ----------
    values
        (pair index, hook, target position, head) -> the raw (patched, or estimated)
        metric (:attr:`Cell.key`; head None for a whole-hook cell).
    m_target, m_source
        Each pair's unpatched metrics, for the normalisation.

    Example
    -------
    >>> cell_table(plan, values, m_target, m_source).num_rows  # doctest: +SKIP
    400
    """
    found, alignments, hook_names = plan.pairs, plan.alignments, plan.hooks
    tprompts, sprompts, chosen = plan.tprompts, plan.sprompts, plan.chosen
    tgt, src = plan.target, plan.source
    from actstore.ingest.families import parse_hook

    keys = list(values)
    normed = normalise(
        torch.tensor([values[x] for x in keys], dtype=torch.float64),
        m_target[[x[0] for x in keys]],
        m_source[[x[0] for x in keys]],
    ).tolist()
    norms = {x: (None if v != v else float(v)) for x, v in zip(keys, normed, strict=True)}
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
            for h, head in ((hk, x) for hk in hook_names for x in plan.heads_of(hk)):
                raw = norm = None
                if tpos is not None and spos is not None:
                    raw = values.get((k, h, tpos, head))
                    norm = norms[(k, h, tpos, head)] if raw is not None else None
                cols["run"].append(tgt["name"])
                cols["source_run"].append(src["name"])
                cols["pair"].append(p.key)
                cols["hook"].append(h)
                cols["layer"].append(parse_hook(h)[0])
                cols["head"].append(head)
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
    return pa.table(
        cols, schema=pa.schema([f for f in CELL_SCHEMA if f.name not in ("analysis_id", "name")])
    )


def provenance(plan: Plan, device: str) -> dict[str, Any]:
    """The provenance of a patching result (runs, checkpoints, device, commit, versions).

    Example
    -------
    >>> provenance(plan, "cpu")["device"]  # doctest: +SKIP
    'cpu'
    """
    st, tgt, src = plan.store, plan.target, plan.source
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
