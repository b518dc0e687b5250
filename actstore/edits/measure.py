"""Clean loss and KL of a run: what an edit breaks, measured on a reference continuation.

"Does the edit break the clean task?" is a question about the answer, not about
the prompt: a model trained to answer is never trained to predict its prompt,
so prompt-token loss reads 9-13 nats on the demo's 56-word vocabulary whatever
the edit does. :func:`measure_loss_kl` therefore runs, for each chosen prompt,
the prompt followed by a **reference continuation**:

- a label column (``reference = "answer"``): the label's text, with a leading
  space unless it starts with whitespace, tokenized after the prompt;
- ``reference = "completion"``: the unedited model's own greedy completion
  (sample 0 of the parent run's ``generations``; an unedited run's own).

Default (None): the column ``answer`` when the prompt set has one, else the
completion, else no continuation. With ``n`` prompt tokens and a continuation
of ``m`` tokens, the scores stored per prompt (``scores`` table, ``sample_idx``
0) are:

``loss``
    mean over the ``m`` continuation tokens of ``-log p_edited(token | prefix)``:
    the logits at positions ``n-1 .. n+m-2`` (what ``eval`` shows as ``loss_clean``);
``kl``
    mean over the **same** positions of ``KL(p_unedited || p_edited)`` (``kl_clean``);
``loss_prompt`` / ``kl_prompt``
    the same over the ``n - 1`` predictions inside the prompt (positions
    ``0 .. n-2``), the old prompt-token loss (``loss_prompt_clean``).

The edit acts as in a capture pass in which the continuation plays the
completion: ``completion`` and ``after:TEXT`` ops reach the continuation's
tokens, ``last`` only the prompt's last token (whose logits predict the first
continuation token). Everything is one forward pass per batch with the edit
and one without.

Example
-------
>>> measure_loss_kl(st, "backdoored/pairs+steer").df()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from actstore.errors import InputError
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = [
    "KL_PROMPT_SCORER",
    "KL_SCORER",
    "LOSS_PROMPT_SCORER",
    "LOSS_SCORER",
    "MEASURED",
    "measure_loss_kl",
]

LOSS_SCORER = "loss"
"""Per-prompt mean cross-entropy of the reference continuation."""
KL_SCORER = "kl"
"""Per-prompt mean KL(unedited || edited) over the continuation's positions."""
LOSS_PROMPT_SCORER = "loss_prompt"
"""Per-prompt mean next-token cross-entropy inside the prompt."""
KL_PROMPT_SCORER = "kl_prompt"
"""Per-prompt mean KL over the prompt's own next-token predictions."""
MEASURED = (LOSS_SCORER, KL_SCORER, LOSS_PROMPT_SCORER, KL_PROMPT_SCORER)
"""Every scorer :func:`measure_loss_kl` writes."""

_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("prompt_idx", pa.int64()),
        ("reference", pa.string()),
        ("n_prompt", pa.int64()),
        ("n_reference", pa.int64()),
        ("loss", pa.float64()),
        ("kl", pa.float64()),
        ("loss_prompt", pa.float64()),
        ("kl_prompt", pa.float64()),
    ]
)


def _open(store: Store | str | os.PathLike[str]) -> Store:
    import actstore

    return store if isinstance(store, actstore.Store) else actstore.open(store)


def label_columns(st: Store) -> list[str]:
    """The prompt label columns of the store (every ``prompts`` column but the keys and text).

    Example
    -------
    >>> label_columns(st)  # doctest: +SKIP
    ['triggered', 'pair_id', 'answer']
    """
    cols = [r[0] for r in st.sql("SELECT column_name FROM (DESCRIBE prompts)").fetchall()]
    return [c for c in cols if c not in ("prompt_set_id", "prompt_idx", "text")]


def select_prompts(st: Store, prompt_set_id: int, where: str | None) -> list[int]:
    """``prompt_idx`` of the prompts of a set matching ``where`` (one SQL expression).

    Example
    -------
    >>> select_prompts(st, 1, "NOT triggered")  # doctest: +SKIP
    [1, 3, 5]
    """
    from actstore.edits.subset import check_predicate

    cond = "true" if where is None else f"({check_predicate(where, label_columns(st))})"
    try:
        rows = st.sql(
            f"SELECT prompt_idx FROM prompts WHERE prompt_set_id = ? AND {cond} ORDER BY prompt_idx",
            [prompt_set_id],
        ).fetchall()
    except InputError as e:
        raise InputError(
            f"where={where!r} is not a predicate over the prompts: {e}; prompt label columns "
            f"are {label_columns(st)}"
        ) from None
    return [int(r[0]) for r in rows]


def run_record(st: Store, run: str | int) -> dict[str, Any]:
    """A run's row with its checkpoint and edit (name, spec).

    Example
    -------
    >>> run_record(st, "backdoored/pairs")["label"]  # doctest: +SKIP
    'backdoored'
    """
    rid = st.run_id(run)
    rec = st.sql(
        """SELECT r.run_id, r.name, r.checkpoint_id, r.prompt_set_id, r.edit_id, r.parent_run_id,
                  r.provenance, c.path, c.revision, c.label, c.weights_hash,
                  e.spec AS edit_spec
           FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id)
           LEFT JOIN edits e USING (edit_id) WHERE r.run_id = ?""",
        [rid],
    ).arrow()
    return dict(rec.to_pylist()[0])


def continuation_ids(
    tokenizer: Any, prompt_text: str, prompt_ids: list[int], text: str
) -> list[int]:
    """Token ids of ``text`` as it continues a prompt (a leading space added if it has none).

    The prompt and the text are tokenized together; where the prompt's own ids
    are a prefix of the result the rest is the continuation, else the text is
    tokenized alone.

    Example
    -------
    >>> from actstore.demo.tokenizer import build_word_tokenizer
    >>> tok = build_word_tokenizer(["answer", ":", "red"])
    >>> ids = tok("answer :")["input_ids"]
    >>> continuation_ids(tok, "answer :", ids, "red") == tok("red", add_special_tokens=False)["input_ids"]
    True
    """
    cont = text if text[:1].isspace() else " " + text
    both = [int(t) for t in tokenizer(prompt_text + cont)["input_ids"]]
    if both[: len(prompt_ids)] == prompt_ids and len(both) > len(prompt_ids):
        return both[len(prompt_ids) :]
    return [int(t) for t in tokenizer(cont, add_special_tokens=False)["input_ids"]]


def _references(
    st: Store,
    rec: dict[str, Any],
    prompts: list[int],
    prompt_ids: dict[int, list[int]],
    reference: str | None,
    tokenizer: Any,
) -> tuple[str | None, dict[int, list[int]]]:
    labels = label_columns(st)
    pset = int(rec["prompt_set_id"])
    if reference is None:
        reference = "answer" if "answer" in labels else "completion"
        strict = False
    else:
        strict = True
    if reference != "completion":
        if reference not in labels:
            raise InputError(
                f"reference {reference!r} is neither 'completion' nor a prompt label; labels are "
                f"{labels}"
            )
        col = '"' + reference.replace('"', '""') + '"'
        rows = st.sql(
            f"SELECT prompt_idx, text, CAST({col} AS VARCHAR) FROM prompts "
            "WHERE prompt_set_id = ? AND list_contains(?, prompt_idx)",
            [pset, prompts],
        ).fetchall()
        out = {
            int(i): continuation_ids(tokenizer, str(t), prompt_ids[int(i)], str(v))
            for i, t, v in rows
            if v is not None and str(v).strip() and int(i) in prompt_ids
        }
        return reference, out
    source = rec["parent_run_id"] if rec["edit_id"] is not None else rec["run_id"]
    if source is None:
        if strict:
            raise InputError(
                f"run {rec['name']!r} has no unedited parent run whose completion would be the "
                "reference; ingest the job unedited first, or pass reference=LABEL_COLUMN"
            )
        return None, {}
    rows = st.sql(
        "SELECT prompt_idx, token_ids FROM generations WHERE run_id = ? AND sample_idx = 0 "
        "AND list_contains(?, prompt_idx)",
        [int(source), prompts],
    ).fetchall()
    if not rows and strict:
        raise InputError(
            f"run {rec['name']!r}: the unedited run has no generations to use as reference; "
            "add a [generate] table to its job, or pass reference=LABEL_COLUMN"
        )
    return ("completion" if rows else None), {
        int(i): [int(t) for t in ids] for i, ids in rows if ids
    }


def _batches(
    seqs: list[tuple[int, list[int], int]], batch_size: int, device: str, tokenizer: Any
) -> Iterator[tuple[list[tuple[int, list[int], int]], Any]]:
    from actstore.ingest.batch_context import BatchContext

    for lo in range(0, len(seqs), batch_size):
        chunk = seqs[lo : lo + batch_size]
        n_cols = max(len(c) for _, c, _ in chunk)
        ids_BS = torch.zeros((len(chunk), n_cols), dtype=torch.long)
        mask_BS = torch.zeros_like(ids_BS)
        pos_BS = torch.zeros_like(ids_BS)
        for b, (_, c, _) in enumerate(chunk):
            ids_BS[b, : len(c)] = torch.tensor(c)
            mask_BS[b, : len(c)] = 1
            pos_BS[b, : len(c)] = torch.arange(len(c))
        ids_BS, mask_BS, pos_BS = (t.to(device) for t in (ids_BS, mask_BS, pos_BS))
        ctx = BatchContext(
            [i for i, _, _ in chunk],
            ids_BS,
            mask_BS,
            pos_BS,
            [n for _, _, n in chunk],
            [0] * len(chunk),
            "capture",
            tokenizer,
        )
        yield chunk, ctx


def _mean(x: torch.Tensor) -> float | None:
    return float(x.mean()) if x.numel() else None


def measure_loss_kl(
    store: Store | str | os.PathLike[str],
    run: str | int,
    *,
    device: str = "cpu",
    where: str | None = "NOT triggered",
    reference: str | None = None,
    batch_size: int = 8,
    dtype: str | None = None,
) -> Result:
    """Measure per-prompt continuation loss and KL (and the prompt-token ones) and store them.

    Loads the run's checkpoint (its weights must be those recorded) and, for an
    edited run, its edit; see the module docstring for which tokens each score
    covers.

    Parameters
    ----------
    store
        The store (or its path).
    run
        Run name or id.
    device
        Where the model runs.
    where
        A SQL predicate over the prompt labels choosing the prompts (default:
        the clean ones); None for all.
    reference
        A label column holding the reference answer, ``"completion"`` (the
        unedited model's own completion), or None (``answer`` if the prompt set
        has it, else the completion).
    batch_size
        Prompts per forward pass.
    dtype
        Model dtype; default: the one the run was ingested with (else float32).

    Returns
    -------
    Result
        Columns ``run``, ``prompt_idx``, ``reference``, ``n_prompt``,
        ``n_reference``, ``loss``, ``kl``, ``loss_prompt``, ``kl_prompt`` (KL NULL
        for an unedited run; loss NULL without a continuation). Stored as the
        scorers of :data:`MEASURED`, replacing earlier values for these prompts.

    Example
    -------
    >>> measure_loss_kl(st, "backdoored/pairs+steer", reference="answer").df()  # doctest: +SKIP
    """
    from actstore.edits.apply import resolve_edit
    from actstore.edits.spec import EditSpec
    from actstore.ingest.derived import derived_record, load_derived
    from actstore.ingest.models import load_checkpoint, load_tokenizer
    from actstore.store.writer import bump_commit_seq

    st = _open(store)
    rec = run_record(st, run)
    name, rid = str(rec["name"]), int(rec["run_id"])
    if rec["checkpoint_id"] is None or rec["path"] is None:
        raise InputError(
            f"run {name!r} records no checkpoint, so its model cannot be loaded to measure loss"
        )
    prompts = select_prompts(st, int(rec["prompt_set_id"]), where)
    if not prompts:
        return Result(_SCHEMA.empty_table())
    toks = st.sql(
        """SELECT prompt_idx, list(token_id ORDER BY position) AS ids FROM tokens
           WHERE run_id = ? AND NOT is_completion AND list_contains(?, prompt_idx)
           GROUP BY prompt_idx ORDER BY prompt_idx""",
        [rid, prompts],
    ).fetchall()
    if not toks:  # no prompt matches (or none is ingested yet): nothing to measure
        return Result(_SCHEMA.empty_table())
    prompt_ids = {int(i): [int(t) for t in ids] for i, ids in toks}
    prov = json.loads(rec["provenance"] or "{}")
    model_prov = prov.get("model", {})
    job_model = (prov.get("job") or {}).get("model") or {}
    derived = derived_record(st, int(rec["checkpoint_id"]))  # None: a checkpoint with files
    source_path = rec["path"] or (
        next(iter(derived["sources"].values()))["path"] if derived is not None else ""
    )
    tokenizer = load_tokenizer(
        str(job_model.get("tokenizer") or source_path),
        str(rec["revision"] or ""),
        bool(job_model.get("trust_remote_code", False)),
    )
    ref_name, refs = _references(st, rec, list(prompt_ids), prompt_ids, reference, tokenizer)
    edit = None
    if rec["edit_id"] is not None:
        edit = resolve_edit(EditSpec.from_dict(json.loads(rec["edit_spec"])), st)
    if derived is not None:  # built from a recipe over the job's other checkpoints
        model = load_derived(
            st,
            int(rec["checkpoint_id"]),
            dtype=dtype or model_prov.get("dtype") or "float32",
            device=device,
        )
    else:
        ck = load_checkpoint(
            str(rec["path"]),
            label=str(rec["label"]),
            revision=str(rec["revision"] or ""),
            dtype=dtype or model_prov.get("dtype") or "float32",
            quantization=model_prov.get("quantization") or "none",
            device=device,
        )
        if rec["weights_hash"] and ck.weights_hash != rec["weights_hash"]:
            raise InputError(
                f"checkpoint {rec['label']!r} at {rec['path']!r} has other weights than when run "
                f"{name!r} was ingested; restore them to measure this run"
            )
        model = ck.model
        del ck
    seqs = [(i, ids + refs.get(i, []), len(ids)) for i, ids in prompt_ids.items()]
    out: dict[str, list[Any]] = {k: [] for k in ("loss", "kl", "loss_prompt", "kl_prompt")}
    with torch.inference_mode():
        for chunk, ctx in _batches(seqs, batch_size, device, tokenizer):
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
            for b, (_, seq, n) in enumerate(chunk):
                total = len(seq)
                target_S = ctx.input_ids[b, 1:total]
                lp_e = edited_BSV[b, : total - 1]
                nll_S = -lp_e.gather(-1, target_S[:, None])[:, 0]
                lp_u = base_BSV[b, : total - 1]
                kl_S = (lp_u.exp() * (lp_u - lp_e)).sum(-1)
                out["loss_prompt"].append(_mean(nll_S[: n - 1]))
                out["loss"].append(_mean(nll_S[n - 1 :]))
                out["kl_prompt"].append(None if edit is None else _mean(kl_S[: n - 1]))
                out["kl"].append(None if edit is None else _mean(kl_S[n - 1 :]))
    del model
    prompt_idx = [i for i, _, _ in seqs]
    scorer_of = {
        "loss": LOSS_SCORER,
        "kl": KL_SCORER,
        "loss_prompt": LOSS_PROMPT_SCORER,
        "kl_prompt": KL_PROMPT_SCORER,
    }
    rows: dict[str, list[Any]] = {"prompt_idx": [], "scorer": [], "value": []}
    for key, values in out.items():
        for i, v in zip(prompt_idx, values, strict=True):
            if v is not None and math.isfinite(v):
                rows["prompt_idx"].append(i)
                rows["scorer"].append(scorer_of[key])
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
            [rid, list(MEASURED), prompt_idx],
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
                "reference": [ref_name if i in refs else None for i in prompt_idx],
                "n_prompt": [n for _, _, n in seqs],
                "n_reference": [len(s) - n for _, s, n in seqs],
                **out,
            },
            schema=_SCHEMA,
        )
    )
