"""The ingest runner: checkpoints x prompt sets -> runs in a store, batch by batch.

Everything that can be wrong with a job is checked before anything is written:
prompt files, tokenizers (one per model family), architectures, hooks, layers,
SAE hooks and widths, prompt lengths. Then, for each checkpoint and prompt set:

1. the run is created, or found (same job hash: resume after its last committed
   batch; complete: nothing to do);
2. each batch of prompts (batch ``k`` is always prompts ``[kB, (k+1)B)``, so a
   resumed job computes exactly what an uninterrupted one would) is generated
   from (optional), scored, run forward under ``torch.inference_mode`` with
   forward hooks capturing the chosen hooks, encoded by the SAEs, and handed to
   a background thread that copies to the host, casts, and appends it to the
   run's :class:`~actstore.store.writer.RunWriter`, so the model does not wait
   for the disk; at most two batches wait in the queue, so memory stays bounded.

Example
-------
>>> summary = run_job("job.toml")  # doctest: +SKIP
>>> print(summary)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

import actstore
from actstore.ingest import heads as _heads
from actstore.ingest import positions as _pos
from actstore.ingest.batch_context import BatchContext as BatchContext  # re-exported
from actstore.ingest.batch_context import EditContext, _context
from actstore.ingest.batch_context import Intervention as Intervention  # re-exported
from actstore.ingest.batches import (
    BackgroundWriter,
    pad_batch,
    progress_bar,
    stored_stats,
    token_table,
)
from actstore.ingest.capture_pass import (
    forward_batch,
    host_arrays,
    needs_logits,
    prefill_capture,
    rides_on_generation,
    stored_mask,
    stored_rows,
)
from actstore.ingest.derived import checkpoint_labels, derived_checkpoint
from actstore.ingest.derived import expand as expand_recipe
from actstore.ingest.derived import record as record_derived
from actstore.ingest.generate import generate, generations_table
from actstore.ingest.hooks import run_capture
from actstore.ingest.job import IngestJob
from actstore.ingest.models import (
    library_versions,
    load_checkpoint,
    weights_hash,
)
from actstore.ingest.plan import Plan, PromptSet, plan
from actstore.ingest.precheck import check_job_against_store
from actstore.ingest.saes import encode_sparse
from actstore.ingest.scorers import load_scorer, score_generations
from actstore.ingest.shards import Shard, job_run_names, shard_batches
from actstore.ingest.summary import IngestSummary, RunSummary
from actstore.ingest.token_kl import TokenDiffs, check_store
from actstore.store import objects
from actstore.store.arrays import import_zarr
from actstore.store.heap import adapt_thresholds, keep_heap_top, slack_from_env

TORCH_STORE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


_NEW_KEYS = ("match", "mode")
"""Scorer fields added later: left out of the job hash while unset (old runs still resume)."""


_ROWS = "SELECT coalesce(max(n_rows), 0) FROM arrays WHERE run_id = ?"


def _catalog_value(st: Any, query: str, params: list[Any]) -> Any:
    """The first value of a catalog query (None if no row), without opening a SQL session."""
    rows = st.catalog.read(query, params).to_pylist()
    return next(iter(rows[0].values())) if rows else None


def _metrics(p: Plan, edit: EditContext | None) -> tuple[Any, ...]:
    return (*p.job.metrics, *(edit.metrics if edit else ()))


def _job_hash(p: Plan, weights: str, ps: PromptSet, edit: EditContext | None) -> str:
    cap = p.job.capture
    body = {
        "weights": weights,
        "tokenizer": p.tok_hash,
        "prompts": ps.hash,
        "hooks": p.hooks,
        "positions": [str(x) for x in p.policies],
        "store_dtype": cap.store_dtype,
        "compression": cap.compression,
        "batch_size": cap.batch_size,
        "max_length": cap.max_length,
        "truncation": cap.truncation,
        "padding_side": cap.padding_side,
        "dtype": p.job.model.dtype,
        "quantization": p.job.model.quantization,
        "saes": [s.weights_hash for s in p.saes],
        "generate": dataclasses.asdict(p.job.generate) if p.job.generate else None,
        "scorers": [
            {k: v for k, v in dataclasses.asdict(s).items() if v is not None or k not in _NEW_KEYS}
            for s in p.job.scorers
        ],
        "edit": edit.spec_hash if edit else None,
    }
    if any(_heads.is_attention_hook(h) for h in p.hooks):  # only then: old hashes stay
        body["attention_keep"] = cap.attention_keep
    metrics = _metrics(p, edit)
    if metrics:  # only then, so runs made before metrics existed keep their hash
        body["metrics"] = [m.to_dict() for m in metrics]
    if p.job.token_diffs:  # likewise: rows made with the batches
        body["token_diffs"] = [dataclasses.asdict(t) for t in p.job.token_diffs]
    if edit is not None and edit.prompts is not None:
        body["prompts_kept"] = edit.prompts(ps.table)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _with_metrics(
    scores_t: pa.Table | None,
    metrics: tuple[Any, ...],
    tok: Any,
    batch: list[Any],
    ps: PromptSet,
    logits_BSV: torch.Tensor,
    offs: torch.Tensor,
) -> pa.Table:
    """The batch's scores with its logit metrics added (computed from the capture's logits)."""
    from actstore.ingest.logit_metrics import batch_scores, resolve_targets

    targets = resolve_targets(
        metrics, tok, [(tp.prompt_idx, tp.text, tp.ids) for tp in batch], ps.table
    )
    got = batch_scores(
        metrics,
        logits_BSV,
        offs.tolist(),
        [tp.n_prompt for tp in batch],
        [tp.prompt_idx for tp in batch],
        targets,
    )
    return got if scores_t is None else pa.concat_tables([scores_t, got])


def _ingest_run(
    st: actstore.Store,
    p: Plan,
    ck: Any,
    ps: PromptSet,
    checkpoint_id: int,
    quiet: bool,
    edit: EditContext | None,
    shard: Shard | None = None,
    diffs: TokenDiffs | None = None,
) -> RunSummary:
    job, cap = p.job, p.job.capture
    name = f"{ck.label}/{ps.spec.name}" + (f"+{edit.name}" if edit else "")
    t0 = time.monotonic()
    pset_id = objects.add_prompt_set(
        st,
        name=ps.spec.name,
        table=ps.table,
        text_column=ps.table.column_names[0],
        path=ps.spec.path,
        content_hash=ps.hash,
    )
    if edit is not None and edit.prompts is not None:  # an edit on a subset of the prompts
        keep = set(edit.prompts(ps.table))
        ps = dataclasses.replace(ps, tokenized=[tp for tp in ps.tokenized if tp.prompt_idx in keep])
    metrics = _metrics(p, edit)
    widths = dict(p.widths)
    dense = [h for h in p.hooks if not _heads.is_attention_hook(h)]  # the rest: attention rows
    att_keep = _heads.AttentionKeep.parse(cap.attention_keep)
    if any(w < 0 for w in widths.values()):  # module: hooks: measure on one prompt
        ids = torch.tensor([ps.tokenized[0].ids], device=p.device)
        with torch.inference_mode():
            acts = run_capture(ck.model, [h for h, w in widths.items() if w < 0], input_ids=ids)
        widths.update({h: int(a.shape[-1]) for h, a in acts.items()})
    parent = None
    if edit is not None:
        hit = _catalog_value(
            st, "SELECT run_id FROM runs WHERE name = ?", [f"{ck.label}/{ps.spec.name}"]
        )
        parent = int(hit) if hit is not None else None
    job_hash = _job_hash(p, ck.weights_hash, ps, edit)
    shard_record = (
        {}
        if shard is None
        else {
            "shard": shard.record(
                job_hash=job_hash,
                n_prompts=len(ps.tokenized),
                batch_size=cap.batch_size,
                job_runs=job_run_names(
                    checkpoint_labels(job.checkpoints),
                    [q.name for q in job.prompts],
                    edit.name if edit else None,
                ),
            )
        }
    )
    rid = objects.create_run(
        st,
        name=name,
        checkpoint_id=checkpoint_id,
        prompt_set_id=pset_id,
        hooks={
            h: (p.adapter.check(h)[0] if not h.startswith("module:") else None, widths[h])
            for h in dense
        },
        heads=_heads.head_layouts(p.adapter, dense),
        positions=",".join(str(x) for x in p.policies),
        store_dtype=cap.store_dtype,
        compression=cap.compression or None,
        quantization=job.model.quantization,
        device=p.device,
        job_hash=job_hash if shard is None else shard.run_hash(job_hash),
        n_prompts=len(ps.tokenized),
        parent_run_id=parent,
        edit_id=edit.edit_id if edit else None,
        provenance={
            "model": {
                "path": ck.path,
                "revision": ck.revision,
                "weights_hash": ck.weights_hash,
                "recipe": getattr(ck, "recipe", None),  # a derived checkpoint's
                "dtype": job.model.dtype,
                "quantization": job.model.quantization,
            },
            "tokenizer_hash": p.tok_hash,
            "prompt_set": {"path": ps.spec.path, "hash": ps.hash},
            "hooks": p.hooks,
            **_heads.provenance(p.adapter, p.hooks, cap.attention_keep),
            "positions": [str(x) for x in p.policies],
            "store_dtype": cap.store_dtype,
            "device": p.device,
            "versions": library_versions(),
            "job": job.to_dict(),
            "saes": [s.name for s in p.saes],
            "edit": edit.name if edit else None,
            **shard_record,
        },
    )
    status = _catalog_value(st, "SELECT status FROM runs WHERE run_id = ?", [rid])
    n_prompts = len(ps.tokenized)
    if status == "complete":
        rows = _catalog_value(st, _ROWS, [rid])
        return RunSummary(name, "already complete", n_prompts, 0, int(rows), 0, 0.0)
    sae_ids = {
        s.name: objects.add_sae(
            st,
            name=s.name,
            source=s.source,
            hook=s.hook,
            layer=s.layer,
            d_in=s.d_in,
            d_sae=s.d_sae,
            architecture=s.architecture,
            weights_hash=s.weights_hash,
            config=s.cfg,
        )
        for s in p.saes
    }
    td = diffs.for_run(st, ck.label, ps, rid, edit is not None) if diffs else None
    writer = st.writer(rid, commit_interval=cap.commit_interval)
    start = writer.next_batch
    resumed = start > 0
    bg = BackgroundWriter(writer, cap.store_dtype)
    tok = p.tokenizer
    scorers = [load_scorer(s, p.device) for s in job.scorers]
    store_dtype = TORCH_STORE[cap.store_dtype]
    batches = list(shard_batches(n_prompts=n_prompts, batch_size=cap.batch_size, shard=shard))
    todo_batches = batches[start:]
    ride = rides_on_generation(job)
    todo = sum(len(tp.ids) for _, lo, hi in todo_batches for tp in ps.tokenized[lo:hi])
    bar = progress_bar(todo, name, quiet)
    stats_here = torch.device(p.device).type == "cpu"  # statistics on the model's threads
    n_tokens = 0
    try:
        for _b, lo, hi in todo_batches:
            batch = ps.tokenized[lo:hi]
            for tp in batch:
                tp.completion_ids = []
            gens_t = scores_t = None
            want_logits = needs_logits(metrics, td is not None)
            ridden = None
            if job.generate is not None:
                ids, mask, pos, offs = pad_batch(
                    [dataclasses.replace(tp, completion_ids=[]) for tp in batch],
                    tok.pad_token_id,
                    "left",
                    p.device,
                )
                ctx = _context(batch, ids, mask, pos, offs, "generate", tok)
                with (
                    edit.intervention(ck.model, ctx) if edit else nullcontext(),
                    prefill_capture(ck.model, p.hooks, logits=want_logits)
                    if ride
                    else nullcontext() as pre,
                ):
                    gens = generate(
                        ck.model,
                        tok,
                        [tp.ids for tp in batch],
                        job.generate,
                        batch_size=len(batch),
                        device=p.device,
                        prompt_idx=[tp.prompt_idx for tp in batch],
                    )
                if pre is not None:  # the prompt pass of generation was the capture pass
                    ridden = pre.take(len(batch), int(ids.shape[1]))
                gens_t = generations_table(gens)
                if scorers:
                    scores_t = score_generations(
                        scorers, gens, {tp.prompt_idx: tp.text for tp in batch}, ps.table
                    )
                if "completion" in cap.positions:
                    first_sample = {g.prompt_idx: g.token_ids for g in gens if g.sample_idx == 0}
                    for tp in batch:
                        tp.completion_ids = list(first_sample.get(tp.prompt_idx, []))[
                            : max(0, cap.max_length - tp.n_prompt)
                        ]
            sels = [_pos.select(tp, p.policies, tok) for tp in batch]
            if ridden is None:
                ids, mask, pos, offs = pad_batch(
                    batch, tok.pad_token_id, cap.padding_side, p.device
                )
            ctx = _context(batch, ids, mask, pos, offs, "capture", tok)
            with (
                torch.inference_mode(),
                edit.intervention(ck.model, ctx) if edit and ridden is None else nullcontext(),
            ):
                acts, logits = ridden or forward_batch(
                    ck.model,
                    p.hooks,
                    {"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                    logits=want_logits,
                )
                other = None
                if want_logits:  # the whole forward pass: its logits give metrics, diffs
                    assert logits is not None
                    if metrics:
                        scores_t = _with_metrics(scores_t, metrics, tok, batch, ps, logits, offs)
                    other = td.batch(ids, mask, pos, offs.tolist(), batch, logits) if td else None
                if len(dense) < len(p.hooks):
                    stored = stored_mask(sels, offs, int(ids.shape[0]), int(ids.shape[1]))
                    attention = _heads.attention_rows(acts, stored, offs.tolist(), att_keep)
                else:
                    attention = None
                rows_ND = stored_rows({h: acts[h] for h in dense}, sels, offs)
                features = {}
                for s in p.saes:
                    features[sae_ids[s.name]] = encode_sparse(s.sae, rows_ND[s.hook].float())
                cast_ND = {h: r.to(store_dtype) for h, r in rows_ND.items()}
                # on the CPU the batch's statistics are summed on the model's threads,
                # which have the cores; on a GPU the writer thread sums the host copies
                stats = stored_stats(cast_ND) if stats_here else None
                arrays, ready = host_arrays(cast_ND, store_dtype)
            bg.put(
                {
                    "arrays": arrays,
                    "tokens": token_table(batch, sels, tok),
                    "first_prompt": lo,
                    "n_prompts": hi - lo,
                    "features": features,
                    "generations": gens_t,
                    "scores": scores_t,
                    "attention": attention,
                    "other": other,
                    "stats": stats,
                },
                ready,
            )
            # this batch's activations go before the next pass allocates around them
            del acts, logits, rows_ND, cast_ND, arrays, ridden
            done = sum(len(tp.ids) for tp in batch)
            n_tokens += done
            bar.update(done)
        bg.close()
        if td:  # every row committed: the diffs' summaries
            td.finish()
    except BaseException:
        bar.close()
        bg.abort()
        raise
    bar.close()
    objects.finish_run(st, rid)
    rows = int(_catalog_value(st, _ROWS, [rid]))
    size = st.location.size(f"arrays/run{rid:06d}") + st.location.size(f"features/run{rid:06d}")
    return RunSummary(
        name,
        "resumed" if resumed else "ingested",
        sum(hi - lo for _, lo, hi in batches),
        n_tokens,
        rows,
        size,
        time.monotonic() - t0,
    )


def run_job(
    job: IngestJob | str | os.PathLike[str],
    *,
    quiet: bool | None = None,
    edit: EditContext
    | list[EditContext]
    | Callable[[actstore.Store], EditContext | list[EditContext]]
    | None = None,
    shard: str | tuple[int, int] | Shard | None = None,
    **overrides: Any,
) -> IngestSummary:
    """Run an ingest job: every checkpoint over every prompt set, into the job's store.

    Re-running a finished job adds nothing; a killed job resumes after its last
    committed batch and ends identical to an uninterrupted run.

    Parameters
    ----------
    job
        An :class:`IngestJob` or the path of a TOML job file.
    quiet
        No progress bar (default: quiet unless standard error is a terminal).
    edit
        Apply an edit while running (``actstore.edits`` builds this); the runs are
        named ``{checkpoint}/{prompts}+{edit}`` and linked to the unedited runs.
        A list (a sweep's settings) runs every edit with each checkpoint loaded once.
        A callable ``edit(store) -> EditContext`` (or a list of them) is called once
        the job has been checked against the store and its write lock is held, so a
        refused job records no edit.
    shard
        Run only shard ``i`` of ``N`` (``"i/N"`` or ``(i, N)``): whole batches, into
        the store ``{store}.shard-i-of-N`` unless ``store=`` is given; combine the
        shard stores with :func:`actstore.ingest.merge.merge` (see ``docs/SCALE.md``).
    **overrides
        Job settings to replace (see :meth:`IngestJob.with_overrides`).

    Example
    -------
    >>> summary = run_job("job.toml", batch_size=16, quiet=True)  # doctest: +SKIP
    >>> [r.status for r in summary.runs]  # doctest: +SKIP
    ['ingested', 'ingested']
    """
    t0 = time.monotonic()
    if not isinstance(job, IngestJob):
        job = IngestJob.from_toml(Path(job))
    sh = Shard.parse(shard) if shard is not None else None
    if sh is not None and overrides.get("store") is None:
        overrides["store"] = sh.store_path(job.store)
    job = job.with_overrides(**overrides)
    if quiet is None:
        quiet = not sys.stderr.isatty()
    p = plan(job)
    slack_from_env()  # a bad $ACTSTORE_HEAP_SLACK_MIB is refused before anything is written
    model_name = (
        job.model.name or Path(job.model.path or next(iter(p.checkpoint_paths.values()))[0]).name
    )
    weights = {
        label: weights_hash(path, rev or "main")
        for label, (path, rev) in p.checkpoint_paths.items()
    }
    st = actstore.open(job.store, create=True)

    def check_one(ready: EditContext | None, deferred: bool) -> None:
        def name(label: str, ps: PromptSet) -> str:
            return _run_name(label, ps, ready)

        def run_hash(label: str, ps: PromptSet) -> str:
            return _run_hash(p, weights[label], ps, ready, sh)

        check_job_against_store(
            st,
            p,
            weights=weights,
            model_name=model_name,
            run_name=None if deferred else name,  # a deferred edit's runs are named later
            run_hash=run_hash,
        )

    def check() -> None:  # what a write would refuse, refused before any write
        for e in edit if isinstance(edit, list) else [edit]:
            ready = e if isinstance(e, EditContext) or e is None else None
            check_one(ready, deferred=e is not None and ready is None)

    check()
    with st.holding_write_lock():  # for the whole job: no other writer between its runs
        check()  # again, now that nothing can change under us
        check_store(st, job.token_diffs, [ps.spec.name for ps in p.prompt_sets])
        if edit is not None and not isinstance(edit, EditContext | list):
            edit = edit(st)  # records the edit: only once the job is known to be good
        import_zarr()  # once, as the models load: not on the first run's clock
        adapt_thresholds()  # the model's temporaries reuse heap pages (actstore.store.heap)
        with keep_heap_top():  # and keep them between batches (HeapBound bounds them)
            return _run_all(st, p, job, model_name, weights, edit, sh, quiet, t0)


def _run_name(label: str, ps: PromptSet, edit: EditContext | None) -> str:
    return f"{label}/{ps.spec.name}" + (f"+{edit.name}" if edit else "")


def _run_hash(
    p: Plan, weights: str, ps: PromptSet, edit: EditContext | None, shard: Shard | None
) -> str:
    job_hash = _job_hash(p, weights, ps, edit)
    return job_hash if shard is None else shard.run_hash(job_hash)


def _run_all(
    st: actstore.Store,
    p: Plan,
    job: IngestJob,
    model_name: str,
    weights: dict[str, str],
    edit: EditContext | list[EditContext] | None,
    sh: Shard | None,
    quiet: bool,
    t0: float,
) -> IngestSummary:
    model_id = objects.add_model(
        st,
        name=model_name,
        family=p.adapter.family,
        architecture=(p.config.architectures or [""])[0],
        n_layers=p.adapter.n_layers,
        d_model=p.adapter.d_model,
        d_mlp=p.adapter.d_mlp,
        d_vocab=int(getattr(p.config, "vocab_size", 0) or 0),
        tokenizer_hash=p.tok_hash,
        config=p.config.to_dict(),
    )
    summary = IngestSummary(str(st.root), notes=[n for ps in p.prompt_sets for n in ps.notes])
    diffs = TokenDiffs(p) if job.token_diffs else None
    for c in job.checkpoints:
        if c.derived:
            recipe = c.interpolate or c.task_vector
            assert recipe is not None
            for label, params in expand_recipe(c.label, recipe):
                dk = derived_checkpoint(
                    label, params, p.checkpoint_paths, dtype=job.model.dtype, device=p.device
                )
                cid = objects.add_checkpoint(
                    st, model_id=model_id, label=label, weights_hash=dk.weights_hash
                )
                dk.on_build = record_derived(st, cid, dk)
                for e in edit if isinstance(edit, list) else [edit]:
                    for ps in p.prompt_sets:
                        summary.runs.append(_ingest_run(st, p, dk, ps, cid, quiet, e, sh, diffs))
                del dk
            continue
        path, rev = p.checkpoint_paths[c.label]
        ck = load_checkpoint(
            path,
            label=c.label,
            revision=rev,
            dtype=job.model.dtype,
            quantization=job.model.quantization,
            device=p.device,
            trust_remote_code=job.model.trust_remote_code,
            known_hash=weights[c.label],
        )
        cid = objects.add_checkpoint(
            st,
            model_id=model_id,
            label=c.label,
            path=path,
            revision=rev,
            weights_hash=ck.weights_hash,
        )
        for e in edit if isinstance(edit, list) else [edit]:  # a sweep: one load, k runs
            for ps in p.prompt_sets:
                summary.runs.append(_ingest_run(st, p, ck, ps, cid, quiet, e, sh, diffs))
        del ck
    summary.seconds = time.monotonic() - t0
    return summary
