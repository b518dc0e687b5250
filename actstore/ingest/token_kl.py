"""Per-token output diffs computed in the capture forward pass of the second run.

A job's ``[[token_diffs]]`` entries ask for the per-token diff of
:func:`actstore.diffing.token_diff` at ingest: while checkpoint ``b``'s runs are
captured, each batch's capture forward pass runs whole (its logits give ``b``'s
side) and checkpoint ``a``'s model, loaded once per job, runs the same batch for
its logits only; ``b`` never runs twice and no vocabulary is stored::

    [[token_diffs]]
    a = "base"          # an earlier [[checkpoints]] label (its runs are ingested first)
    b = "backdoored"    # the run whose capture pass computes the diff
    name = ""           # default "{a}/{prompts}_vs_{b}/{prompts}", as token_diff names it

Each batch's rows go into the ``token_diffs`` table in the same catalog commit as
the batch itself, so an interrupted ingest resumes without duplicating or losing a
row; the ``analyses`` row (kind ``token_diff``) is made when run ``b`` starts and its
summary is written when the run completes. The rows equal what ``token_diff`` stores
for the same two runs (same columns, ids and conventions). Edited runs
(``actstore edit``) make no token diffs: diff a run and its edit with ``token_diff``.

This module also holds the math and the row layout that ``token_diff`` uses (one
implementation): :func:`next_token_diff` and :func:`diff_rows`.

Example
-------
>>> lp_BSV = torch.log_softmax(torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]), -1)
>>> kl_BS, lpa_BS, lpb_BS, am_a_BS, am_b_BS = next_token_diff(lp_BSV, lp_BSV, torch.tensor([[1, 0]]))
>>> kl_BS.abs().max().item(), am_b_BS.tolist()
(0.0, [[1, 0]])
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from actstore.errors import InputError, SpecError

if TYPE_CHECKING:
    from actstore.ingest.plan import Plan, PromptSet
    from actstore.store.store import Store

TABLE_DDL = """CREATE TABLE IF NOT EXISTS token_diffs (
    analysis_id INTEGER, run_id_a INTEGER, run_id_b INTEGER, prompt_set_id INTEGER,
    prompt_idx INTEGER, position INTEGER, token_id INTEGER, next_token_id INTEGER,
    is_completion BOOLEAN, kl DOUBLE, logp_a DOUBLE, logp_b DOUBLE, dlogp DOUBLE,
    argmax_a INTEGER, argmax_b INTEGER)"""
"""The catalog table of per-token diffs (created by the first token diff)."""

KIND = "token_diff"
"""The ``analyses.kind`` of a token diff."""

SCHEMA = pa.schema(
    [
        ("prompt_idx", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("next_token_id", pa.int32()),
        ("is_completion", pa.bool_()),
        ("kl", pa.float64()),
        ("logp_a", pa.float64()),
        ("logp_b", pa.float64()),
        ("dlogp", pa.float64()),
        ("argmax_a", pa.int32()),
        ("argmax_b", pa.int32()),
    ]
)
"""The per-token columns of ``token_diffs`` (the ids are added when they are stored)."""

IDS = ("analysis_id", "run_id_a", "run_id_b", "prompt_set_id")
"""The id columns of ``token_diffs``, before :data:`SCHEMA`'s."""


@dataclass(frozen=True)
class TokenDiffSpec:
    """One ``[[token_diffs]]`` entry: diff checkpoint ``a``'s predictions against ``b``'s."""

    a: str
    """The first checkpoint's label (listed before ``b``, so its runs exist when ``b`` runs)."""
    b: str
    """The second checkpoint's label: its capture pass computes the diff."""
    name: str = ""
    """The analysis name (default ``{a}/{prompts}_vs_{b}/{prompts}``); several prompt sets: ``{name}/{prompts}``."""

    def analysis_name(self, prompt_set: str, n_prompt_sets: int) -> str:
        """The name of the diff over one prompt set.

        Example
        -------
        >>> TokenDiffSpec("base", "bd").analysis_name("pairs", 1)
        'base/pairs_vs_bd/pairs'
        """
        if not self.name:
            return f"{self.a}/{prompt_set}_vs_{self.b}/{prompt_set}"
        return self.name if n_prompt_sets == 1 else f"{self.name}/{prompt_set}"


def check_specs(specs: Sequence[TokenDiffSpec], labels: Sequence[str]) -> None:
    """Refuse token diffs naming unknown checkpoints, or ``a`` not listed before ``b``.

    Example
    -------
    >>> check_specs([TokenDiffSpec("base", "bd")], ["base", "bd"])
    """
    seen: set[tuple[str, str]] = set()
    for s in specs:
        for side, label in (("a", s.a), ("b", s.b)):
            if label not in labels:
                raise SpecError(
                    f"token_diffs: {side} = {label!r} is not a checkpoint of the job; "
                    f"checkpoints: {list(labels)}"
                )
        if s.a == s.b:
            raise SpecError(f"token_diffs: a and b are both {s.a!r}; name two checkpoints")
        if labels.index(s.a) > labels.index(s.b):
            raise SpecError(
                f"token_diffs: checkpoint {s.a!r} (a) is listed after {s.b!r} (b); list a first "
                "in [[checkpoints]] so its runs exist when b's capture pass makes the diff"
            )
        if (s.a, s.b) in seen:
            raise SpecError(f"token_diffs: {s.a!r} vs {s.b!r} is listed twice; list it once")
        seen.add((s.a, s.b))


def next_token_diff(
    lp_a_BSV: torch.Tensor, lp_b_BSV: torch.Tensor, ids_BS: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """KL(p_b || p_a), log p of the next token under each, and each argmax, per position.

    ``lp_*_BSV`` are next-token log-probabilities of one batch; the next token of
    column ``t`` is ``ids_BS[:, t + 1]`` (the last column's is meaningless).

    Example
    -------
    >>> lp = torch.log_softmax(torch.zeros(1, 2, 3), -1)
    >>> [t.shape for t in next_token_diff(lp, lp, torch.zeros(1, 2, dtype=torch.long))]
    [torch.Size([1, 2]), torch.Size([1, 2]), torch.Size([1, 2]), torch.Size([1, 2]), torch.Size([1, 2])]
    """
    kl_BS = (lp_b_BSV.exp() * (lp_b_BSV - lp_a_BSV)).sum(-1)
    nxt_BS = torch.zeros_like(ids_BS)
    nxt_BS[:, :-1] = ids_BS[:, 1:]
    lpa_BS = lp_a_BSV.gather(-1, nxt_BS[..., None])[..., 0]
    lpb_BS = lp_b_BSV.gather(-1, nxt_BS[..., None])[..., 0]
    return kl_BS, lpa_BS, lpb_BS, lp_a_BSV.argmax(-1), lp_b_BSV.argmax(-1)


def diff_rows(
    diff: Sequence[torch.Tensor],
    seqs: Sequence[Sequence[int]],
    offsets: Sequence[int],
    n_prompt: Sequence[int],
    prompt_idx: Sequence[int],
) -> pa.Table:
    """The :data:`SCHEMA` rows of one batch from :func:`next_token_diff`'s tensors.

    Sequence ``b`` sits at columns ``offsets[b]...`` of the batch; its tokens from
    ``n_prompt[b]`` on are a completion. The last token has no next token (NULL).

    Example
    -------
    >>> lp = torch.log_softmax(torch.zeros(1, 2, 3), -1)
    >>> diff_rows(next_token_diff(lp, lp, torch.tensor([[1, 2]])), [[1, 2]], [0], [2], [5]).num_rows
    2
    """
    kl_BS, lpa_BS, lpb_BS, am_a, am_b = (t.detach().cpu() for t in diff)
    cols: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for b, seq in enumerate(seqs):
        n, n_p, off = len(seq), n_prompt[b], offsets[b]
        for t in range(n):
            last, c = t == n - 1, off + t
            cols["prompt_idx"].append(prompt_idx[b])
            cols["position"].append(t)
            cols["token_id"].append(int(seq[t]))
            cols["next_token_id"].append(None if last else int(seq[t + 1]))
            cols["is_completion"].append(t >= n_p)
            cols["kl"].append(max(float(kl_BS[b, c]), 0.0))  # rounding can go below 0
            la = None if last else float(lpa_BS[b, c])
            lb = None if last else float(lpb_BS[b, c])
            cols["logp_a"].append(la)
            cols["logp_b"].append(lb)
            cols["dlogp"].append(None if la is None or lb is None else lb - la)
            cols["argmax_a"].append(int(am_a[b, c]))
            cols["argmax_b"].append(int(am_b[b, c]))
    return pa.table(cols, schema=SCHEMA)


def with_ids(rows: pa.Table, analysis_id: int, rid_a: int, rid_b: int, pset_id: int) -> pa.Table:
    """``token_diffs`` rows: the id columns, then :data:`SCHEMA`'s.

    Example
    -------
    >>> with_ids(SCHEMA.empty_table(), 1, 2, 3, 1).column_names[:2]
    ['analysis_id', 'run_id_a']
    """
    n = rows.num_rows
    ids = [pa.array([v] * n, pa.int32()) for v in (analysis_id, rid_a, rid_b, pset_id)]
    return pa.table([*ids, *rows.columns], names=[*IDS, *rows.column_names])


def summary_sql(con: Any, analysis_id: int) -> dict[str, Any]:
    """``n_prompts``, ``n_tokens``, ``mean_kl``, ``max_kl`` of a stored diff (as ``token_diff`` records).

    Example
    -------
    >>> summary_sql(con, 3)["n_tokens"]  # doctest: +SKIP
    4212
    """
    n_p, n_t, mean, mx = con.execute(
        """SELECT count(DISTINCT prompt_idx), count(*),
                  avg(kl) FILTER (WHERE isfinite(kl)), max(kl) FILTER (WHERE isfinite(kl))
           FROM token_diffs WHERE analysis_id = ?""",
        [analysis_id],
    ).fetchall()[0]
    fin = [float(mean), float(mx)] if mean is not None else [None, None]
    return {"n_prompts": int(n_p), "n_tokens": int(n_t), "mean_kl": fin[0], "max_kl": fin[1]}


def _json(obj: Any) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return json.dumps(clean(obj))


_EXISTING = "SELECT analysis_id, params FROM analyses WHERE name = ? AND kind = ?"


def _parsed(rows: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    return [(int(r[0]), json.loads(r[1] or "{}")) for r in rows]


def _ours(params: dict[str, Any], run_a: str, run_b: str) -> bool:
    return bool(
        params.get("computed") == "capture"
        and params.get("run_a") == run_a
        and params.get("run_b") == run_b
    )


def taken(store: Store, name: str, run_a: str, run_b: str) -> bool:
    """Whether a token diff named ``name`` is stored that is not the capture diff of these runs.

    Example
    -------
    >>> taken(st, "base/pairs_vs_bd/pairs", "base/pairs", "bd/pairs")  # doctest: +SKIP
    False
    """
    hits = _parsed(store.sql(_EXISTING, [name, KIND]).fetchall())
    return any(not _ours(p, run_a, run_b) for _, p in hits)


def check_store(store: Store, specs: Sequence[TokenDiffSpec], prompt_sets: Sequence[str]) -> None:
    """Refuse a diff whose name is taken by another analysis (before anything is written).

    Example
    -------
    >>> check_store(st, job.token_diffs, ["pairs"])  # doctest: +SKIP
    """
    for s in specs:
        for ps in prompt_sets:
            name = s.analysis_name(ps, len(prompt_sets))
            if taken(store, name, f"{s.a}/{ps}", f"{s.b}/{ps}"):
                raise InputError(
                    f"a token diff named {name!r} is already stored and was not made by this "
                    "job's capture; set another name = in [[token_diffs]]"
                )


@dataclass
class RunDiffs:
    """The token diffs one run's capture pass makes: per batch, the rows of each."""

    store: Any
    run_id_b: int
    prompt_set_id: int
    diffs: list[tuple[int, int, Any]]
    """(analysis id, run id of a, a's model) per diff."""

    def batch(
        self,
        ids_BS: torch.Tensor,
        mask_BS: torch.Tensor,
        pos_BS: torch.Tensor,
        offsets: Sequence[int],
        batch: Sequence[Any],
        logits_BSV: torch.Tensor,
    ) -> dict[str, pa.Table]:
        """The batch's ``token_diffs`` rows, from its capture logits and a's forward pass.

        Example
        -------
        >>> extra = diffs.batch(ids, mask, pos, offs.tolist(), batch, logits)  # doctest: +SKIP
        """
        lp_b_BSV = logits_BSV.float().log_softmax(-1)
        out = []
        for aid, rid_a, model in self.diffs:
            with torch.inference_mode():
                lg = model(input_ids=ids_BS, attention_mask=mask_BS, position_ids=pos_BS).logits
            rows = diff_rows(
                next_token_diff(lg.float().log_softmax(-1), lp_b_BSV, ids_BS),
                [tp.all_ids for tp in batch],
                list(offsets),
                [tp.n_prompt for tp in batch],
                [tp.prompt_idx for tp in batch],
            )
            out.append(with_ids(rows, aid, rid_a, self.run_id_b, self.prompt_set_id))
        return {"token_diffs": pa.concat_tables(out)}

    def finish(self) -> None:
        """Write each diff's summary (its rows are all committed).

        Example
        -------
        >>> diffs.finish()  # doctest: +SKIP
        """
        write_summaries(self.store, [aid for aid, _, _ in self.diffs])


def write_summaries(store: Store, analysis_ids: Sequence[int]) -> None:
    """Write the summaries (``analyses.result``, ``n_rows``) of diffs whose rows are all stored.

    Example
    -------
    >>> write_summaries(st, [3])  # doctest: +SKIP
    """
    from actstore.store.writer import bump_commit_seq

    with store.catalog.write() as con:
        for aid in analysis_ids:
            summary = summary_sql(con, aid)
            prov = json.loads(
                con.execute(
                    "SELECT provenance FROM analyses WHERE analysis_id = ?", [aid]
                ).fetchall()[0][0]
            )
            prov["n_rows"] = summary["n_tokens"]
            con.execute(
                "UPDATE analyses SET result = ?, provenance = ? WHERE analysis_id = ?",
                [_json(summary), _json(prov), aid],
            )
        bump_commit_seq(con)


def capture_diffs(store: Store, run_b: str) -> list[tuple[int, str, dict[str, Any]]]:
    """(analysis id, name, params) of the diffs that run ``run_b``'s capture pass made.

    Example
    -------
    >>> capture_diffs(st, "backdoored/pairs")  # doctest: +SKIP
    [(1, 'base/pairs_vs_backdoored/pairs', {...})]
    """
    has = store.sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'token_diffs'"
    ).fetchall()[0][0]
    if not has:
        return []
    rows = store.sql(
        "SELECT analysis_id, name, params FROM analyses WHERE kind = ? ORDER BY analysis_id",
        [KIND],
    ).fetchall()
    out = [(int(r[0]), str(r[1]), json.loads(r[2] or "{}")) for r in rows]
    return [(a, n, p) for a, n, p in out if p.get("computed") == "capture" and p["run_b"] == run_b]


def record_analysis(
    store: Store,
    name: str,
    runs: tuple[tuple[str, int], tuple[str, int]],
    *,
    prompt_set: str,
    completion: bool,
) -> int:
    """The ``analyses`` row of a capture-pass diff: found (a resumed run) or made; its id.

    Example
    -------
    >>> record_analysis(st, "a_vs_b", (("base/p", 1), ("bd/p", 2)), prompt_set="p", completion=False)  # doctest: +SKIP
    3
    """
    from actstore.ingest.models import library_versions
    from actstore.store.writer import bump_commit_seq

    (run_a, rid_a), (run_b, rid_b) = runs
    with store.catalog.write() as con:
        con.execute(TABLE_DDL)
        for aid, params in _parsed(con.execute(_EXISTING, [name, KIND]).fetchall()):
            if _ours(params, run_a, run_b):  # a resumed run: its committed rows stay
                return aid
        nxt = con.execute("SELECT coalesce(max(analysis_id), 0) + 1 FROM analyses")
        aid = int(nxt.fetchall()[0][0])
        seq = con.execute("SELECT value FROM meta WHERE key = 'commit_seq'").fetchall()
        params = {
            "run_a": run_a,
            "run_b": run_b,
            "where": None,
            "completion": completion,
            "computed": "capture",
        }
        prov = {
            "runs": {run_a: rid_a, run_b: rid_b},
            "run_ids": sorted({rid_a, rid_b}),
            "where": None,
            "sql_params": None,
            "n_rows": 0,
            "store": str(store.root),
            "commit_seq": int(seq[0][0]) if seq else None,
            "versions": library_versions(),
            "prompt_set": prompt_set,
        }
        empty = {"n_prompts": 0, "n_tokens": 0, "mean_kl": None, "max_kl": None}
        con.execute(
            "INSERT INTO analyses VALUES (?, ?, ?, ?, ?, ?, now())",
            [aid, name, KIND, _json(params), _json(empty), _json(prov)],
        )
        bump_commit_seq(con)
    return aid


@dataclass
class TokenDiffs:
    """A job's token diffs: prepares each run's :class:`RunDiffs`, loads each ``a`` model once."""

    plan: Plan
    models: dict[str, Any] = field(default_factory=dict)

    def for_run(
        self, store: Store, label: str, ps: PromptSet, run_id: int, edited: bool
    ) -> RunDiffs | None:
        """The diffs run ``label/ps`` makes (None: none, or an edited run); records their analyses.

        Example
        -------
        >>> rd = TokenDiffs(plan).for_run(st, "backdoored", ps, rid, edited=False)  # doctest: +SKIP
        """
        job = self.plan.job
        specs = [s for s in job.token_diffs if s.b == label]
        if edited or not specs:
            return None
        pset = ps.spec.name
        run_b = f"{label}/{pset}"
        pset_id = int(
            store.sql("SELECT prompt_set_id FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
        )
        diffs = []
        for s in specs:
            run_a = f"{s.a}/{pset}"
            hit = store.sql(
                "SELECT run_id, checkpoint_id, status FROM runs WHERE name = ?", [run_a]
            ).fetchall()
            if not hit or hit[0][2] != "complete":
                raise InputError(
                    f"token diff {s.a!r} vs {label!r}: run {run_a!r} is not complete in the "
                    "store; ingest it first (list its checkpoint before b's)"
                )
            rid_a, cid_a = int(hit[0][0]), int(hit[0][1])
            aid = record_analysis(
                store,
                s.analysis_name(pset, len(job.prompts)),
                ((run_a, rid_a), (run_b, run_id)),
                prompt_set=pset,
                completion="completion" in job.capture.positions,
            )
            diffs.append((aid, rid_a, self._model(store, s.a, cid_a)))
        return RunDiffs(store, run_id, pset_id, diffs)

    def _model(self, store: Store, label: str, checkpoint_id: int) -> Any:
        if label not in self.models:
            from actstore.ingest.derived import derived_record, load_derived
            from actstore.ingest.models import load_checkpoint

            job, dev = self.plan.job, self.plan.device
            if derived_record(store, checkpoint_id) is not None:
                model = load_derived(store, checkpoint_id, dtype=job.model.dtype, device=dev)
            else:
                path, rev = self.plan.checkpoint_paths[label]
                known = store.sql(
                    "SELECT weights_hash FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id]
                ).fetchall()[0][0]
                model = load_checkpoint(
                    path,
                    label=label,
                    revision=rev,
                    dtype=job.model.dtype,
                    quantization=job.model.quantization,
                    device=dev,
                    trust_remote_code=job.model.trust_remote_code,
                    known_hash=known,
                ).model
            self.models[label] = model
        return self.models[label]
