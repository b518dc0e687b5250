"""Per-token output diffs: where two runs' models predict differently, token by token.

For two runs over the same prompts (two checkpoints, or a run and its edit), each
prompt's tokens go through both models; at every position ``t`` the next-token
distributions ``p_a`` and ``p_b`` give

- ``kl``: ``KL(p_b || p_a) = sum_v p_b(v) (log p_b(v) - log p_a(v))``, how much the
  second model's prediction moved away from the first's (defined at every position,
  the last prompt token included: its prediction is the first answer token);
- ``logp_a``, ``logp_b``, ``dlogp = logp_b - logp_a``: the log-probability of the
  actual next token ``x_{t+1}`` (NULL at the last token of a sequence);
- ``argmax_a``, ``argmax_b``: each model's most likely next token.

Only these numbers are stored, never full vocabularies: one row per token in the
``token_diffs`` table, keyed by the analysis that made them (``analyses``, kind
``token_diff``). With ``completion=True`` the second run's first stored completion
is appended to each prompt (teacher-forced through both models), so the diff also
covers the answer. SQL: the tokens where fine-tuning changed the prediction most,
by label::

    SELECT p.triggered, d.position, d.kl FROM token_diffs d
    JOIN analyses a USING (analysis_id)
    JOIN prompts p USING (prompt_set_id, prompt_idx)
    WHERE a.name = 'base_vs_backdoored' ORDER BY d.kl DESC LIMIT 10

Example
-------
>>> d = token_diff(st, "base/pairs", "backdoored/pairs", name="base_vs_bd")  # doctest: +SKIP
>>> d.by_prompt("triggered").df()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actstore.diffing.models import batches, log_probs, run_model
from actstore.errors import InputError
from actstore.ingest.token_kl import KIND, SCHEMA, TABLE_DDL, diff_rows, next_token_diff

if TYPE_CHECKING:
    from actstore.store.result import Result
    from actstore.store.store import Store

__all__ = ["KIND", "TABLE_DDL", "TokenDiff", "load_token_diff", "token_diff"]


@dataclass(frozen=True)
class TokenDiff:
    """A stored per-token diff: its name, analysis id, runs and summary."""

    store: Any
    name: str
    analysis_id: int
    run_a: str
    run_b: str
    n_prompts: int
    n_tokens: int
    mean_kl: float
    max_kl: float

    def tokens(self) -> Result:
        """Every token's row, with the prompt's labels, largest KL first.

        Example
        -------
        >>> d.tokens().df().head()  # doctest: +SKIP
        """
        return self.store.sql(
            """SELECT d.* EXCLUDE (analysis_id), p.* EXCLUDE (prompt_set_id, prompt_idx)
               FROM token_diffs d JOIN prompts p USING (prompt_set_id, prompt_idx)
               WHERE d.analysis_id = ? ORDER BY d.kl DESC, d.prompt_idx, d.position""",
            [self.analysis_id],
        )

    def by_prompt(self, *labels: str) -> Result:
        """Per prompt: mean and max KL, mean ``dlogp``, number of tokens, and the given labels.

        Example
        -------
        >>> d.by_prompt("triggered").df()  # doctest: +SKIP
        """
        cols = _label_columns(self.store)
        bad = [c for c in labels if c not in cols]
        if bad:
            raise InputError(f"no prompt label column {bad[0]!r}; the prompts have {cols}")
        sel = "".join(f', any_value(p."{c}") AS "{c}"' for c in labels)
        return self.store.sql(
            f"""SELECT d.prompt_idx{sel}, count(*) AS n_tokens, avg(d.kl) AS mean_kl,
                       max(d.kl) AS max_kl, avg(d.dlogp) AS mean_dlogp
                FROM token_diffs d JOIN prompts p USING (prompt_set_id, prompt_idx)
                WHERE d.analysis_id = ? GROUP BY d.prompt_idx ORDER BY d.prompt_idx""",
            [self.analysis_id],
        )


def _label_columns(st: Store) -> list[str]:
    cols = [r[0] for r in st.sql("SELECT column_name FROM (DESCRIBE prompts)").fetchall()]
    return [c for c in cols if c not in ("prompt_set_id", "prompt_idx", "text")]


def _prompt_tokens(st: Store, rid: int) -> dict[int, list[int]]:
    rows = st.sql(
        """SELECT prompt_idx, list(token_id ORDER BY position) FROM tokens
           WHERE run_id = ? AND NOT is_completion GROUP BY prompt_idx""",
        [rid],
    ).fetchall()
    return {int(i): [int(t) for t in ids] for i, ids in rows}


def _completions(st: Store, rid: int) -> dict[int, list[int]]:
    rows = st.sql(
        "SELECT prompt_idx, token_ids FROM generations WHERE run_id = ? AND sample_idx = 0",
        [rid],
    ).fetchall()
    return {int(i): [int(t) for t in (ids or [])] for i, ids in rows}


def _existing(st: Store, name: str) -> list[int]:
    rows = st.sql("SELECT analysis_id FROM analyses WHERE name = ? AND kind = ?", [name, KIND])
    return [int(r[0]) for r in rows.fetchall()]


def token_diff(
    store: Store,
    run_a: str | int,
    run_b: str | int,
    *,
    name: str | None = None,
    where: str | None = None,
    completion: bool = False,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    replace: bool = False,
) -> TokenDiff:
    """Compute and store the per-token KL and next-token log-prob change from run A to run B.

    Parameters
    ----------
    store
        The store.
    run_a, run_b
        Two runs over the same prompt set with the same tokens (e.g. ``base/pairs``
        and ``backdoored/pairs``, or a run and its edited run). Their models are
        loaded again: checkpoints from their files (hash checked) or recipes, edits
        resolved from the store.
    name
        The analysis name (default ``{run_a}_vs_{run_b}``).
    where
        A SQL predicate over the prompt labels choosing the prompts (default: all).
    completion
        Append run B's first completion (``generations``, sample 0) to each prompt.
    batch_size, device, dtype
        How the models run.
    replace
        Replace a stored diff of the same name (else that is an error).

    Returns
    -------
    TokenDiff
        The stored diff's summary; ``.tokens()`` and ``.by_prompt(...)`` read it back.

    Example
    -------
    >>> d = token_diff(st, "base/pairs", "backdoored/pairs")  # doctest: +SKIP
    >>> d.mean_kl  # doctest: +SKIP
    0.41
    """
    from actstore.analysis.results import jsonable, provenance
    from actstore.store.writer import bump_commit_seq

    rid_a, rid_b = store.run_id(run_a), store.run_id(run_b)
    if rid_a == rid_b:
        raise InputError(f"run_a and run_b are the same run {run_a!r}; name two runs to diff")
    info = {
        int(r[0]): (str(r[1]), int(r[2]))
        for r in store.sql(
            "SELECT run_id, name, prompt_set_id FROM runs WHERE run_id IN (?, ?)", [rid_a, rid_b]
        ).fetchall()
    }
    (name_a, ps_a), (name_b, ps_b) = info[rid_a], info[rid_b]
    if ps_a != ps_b:
        raise InputError(
            f"runs {name_a!r} and {name_b!r} are over different prompt sets; a per-token diff "
            "needs the same prompts through both models"
        )
    name = name or f"{name_a}_vs_{name_b}"
    if _existing(store, name) and not replace:
        raise InputError(
            f"a token diff named {name!r} is already stored; pass another name= or replace=True"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    cond = f"({where})" if where else "true"
    try:
        chosen = [
            int(r[0])
            for r in store.sql(
                f"SELECT prompt_idx FROM prompts WHERE prompt_set_id = ? AND {cond} ORDER BY prompt_idx",
                [ps_a],
            ).fetchall()
        ]
    except InputError as e:
        raise InputError(
            f"where={where!r} is not a predicate over the prompts: {e}; prompt label columns "
            f"are {_label_columns(store)}"
        ) from None
    toks_a, toks_b = _prompt_tokens(store, rid_a), _prompt_tokens(store, rid_b)
    chosen = [i for i in chosen if i in toks_a and i in toks_b]
    if not chosen:
        raise InputError(f"no ingested prompt of both runs matches where={where!r}")
    for i in chosen:
        if toks_a[i] != toks_b[i]:
            raise InputError(
                f"prompt {i} tokenizes differently in {name_a!r} and {name_b!r}; runs to diff "
                "must share one tokenizer"
            )
    extra = _completions(store, rid_b) if completion else {}
    if completion and not extra:
        raise InputError(f"run {name_b!r} has no generations; ingest it with [generate] first")
    ids = [toks_a[i] + extra.get(i, []) for i in chosen]
    n_prompt = [len(toks_a[i]) for i in chosen]

    cache: dict[int, Any] = {}
    rm_a = run_model(store, rid_a, device=device, dtype=dtype, cache=cache)
    rm_b = run_model(store, rid_b, device=device, dtype=dtype, cache=cache)
    parts = []
    for sl, ctx in batches(ids, n_prompt, chosen, batch_size, device):
        diff = next_token_diff(log_probs(rm_a, ctx), log_probs(rm_b, ctx), ctx.input_ids)
        parts.append(diff_rows(diff, ids[sl], [0] * len(ids[sl]), n_prompt[sl], chosen[sl]))
    del cache, rm_a, rm_b
    table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
    kls = [k for k in table.column("kl").to_pylist() if math.isfinite(k)]
    summary = {
        "n_prompts": len(chosen),
        "n_tokens": table.num_rows,
        "mean_kl": sum(kls) / len(kls),
        "max_kl": max(kls),
    }
    params = {"run_a": name_a, "run_b": name_b, "where": where, "completion": completion}
    prov = provenance(
        store, runs={name_a: rid_a, name_b: rid_b}, where=where, n_rows=table.num_rows
    )
    olds = _existing(store, name) if replace else []
    with store.catalog.write() as con:
        con.execute(TABLE_DDL)
        for old in olds:
            con.execute("DELETE FROM token_diffs WHERE analysis_id = ?", [old])
            con.execute("DELETE FROM analyses WHERE analysis_id = ?", [old])
        aid = int(
            con.execute("SELECT coalesce(max(analysis_id), 0) + 1 FROM analyses").fetchall()[0][0]
        )
        con.execute(
            "INSERT INTO analyses VALUES (?, ?, ?, ?, ?, ?, now())",
            [
                aid,
                name,
                KIND,
                json.dumps(jsonable(params)),
                json.dumps(jsonable(summary)),
                json.dumps(jsonable(prov)),
            ],
        )
        con.register("_token_diff", table)
        con.execute(
            """INSERT INTO token_diffs SELECT ?, ?, ?, ?, prompt_idx, position, token_id,
                   next_token_id, is_completion, kl, logp_a, logp_b, dlogp, argmax_a, argmax_b
               FROM _token_diff""",
            [aid, rid_a, rid_b, ps_a],
        )
        con.unregister("_token_diff")
        bump_commit_seq(con)
    return TokenDiff(
        store,
        name,
        aid,
        name_a,
        name_b,
        len(chosen),
        table.num_rows,
        float(summary["mean_kl"]),
        float(summary["max_kl"]),
    )


def load_token_diff(store: Store, name: str) -> TokenDiff:
    """A stored token diff by name.

    Example
    -------
    >>> load_token_diff(st, "base_vs_bd").mean_kl  # doctest: +SKIP
    0.41
    """
    rows = store.sql(
        "SELECT analysis_id, params, result FROM analyses WHERE name = ? AND kind = ?", [name, KIND]
    ).fetchall()
    if not rows:
        names = [
            r[0] for r in store.sql("SELECT name FROM analyses WHERE kind = ?", [KIND]).fetchall()
        ]
        raise InputError(f"no token diff named {name!r}; stored: {names or 'none'}")
    aid, params, result = rows[0]
    p, r = json.loads(params), json.loads(result)
    return TokenDiff(
        store,
        name,
        int(aid),
        p["run_a"],
        p["run_b"],
        int(r["n_prompts"]),
        int(r["n_tokens"]),
        float(r["mean_kl"]),
        float(r["max_kl"]),
    )
