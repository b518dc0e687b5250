"""The model behind a stored run: its checkpoint (from files or a recipe) and its edit.

Diffing compares what two runs' models *predict*, so it needs the models again:
:func:`run_model` loads a run's checkpoint (checking that the weights are those the
run was ingested with), rebuilds a derived checkpoint from its recipe
(:func:`actstore.ingest.derived.load_derived`), and resolves an edited run's edit so
that :func:`log_probs` runs the model with it.

Example
-------
>>> rm = run_model(st, "backdoored/pairs")  # doctest: +SKIP
>>> lp_BSV = log_probs(rm, batch)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from actstore.errors import InputError

if TYPE_CHECKING:
    from actstore.ingest.batch_context import BatchContext
    from actstore.store.store import Store


@dataclass
class RunModel:
    """A run's model, ready to run: the HF model and the run's edit (None if unedited)."""

    run: str
    run_id: int
    checkpoint_id: int
    model: Any
    edit: Any = None


def _record(store: Store, run: str | int) -> dict[str, Any]:
    rid = store.run_id(run)
    rows = (
        store.sql(
            """SELECT r.run_id, r.name, r.checkpoint_id, r.prompt_set_id, r.edit_id,
                      r.provenance, c.path, c.revision, c.label, c.weights_hash,
                      e.spec AS edit_spec
               FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id)
               LEFT JOIN edits e USING (edit_id) WHERE r.run_id = ?""",
            [rid],
        )
        .arrow()
        .to_pylist()
    )
    return dict(rows[0])


def load_checkpoint_model(
    store: Store, checkpoint_id: int, *, device: str = "cpu", dtype: str = "float32"
) -> Any:
    """The model of a stored checkpoint: from its files (weights checked) or its recipe.

    Example
    -------
    >>> model = load_checkpoint_model(st, 1)  # doctest: +SKIP
    """
    from actstore.ingest.derived import derived_record, load_derived
    from actstore.ingest.models import load_checkpoint

    if derived_record(store, checkpoint_id) is not None:
        return load_derived(store, checkpoint_id, dtype=dtype, device=device)
    rows = store.sql(
        "SELECT label, path, revision, weights_hash FROM checkpoints WHERE checkpoint_id = ?",
        [checkpoint_id],
    ).fetchall()
    if not rows or not rows[0][1]:
        raise InputError(
            f"checkpoint {checkpoint_id} records no path, so its model cannot be loaded"
        )
    label, path, revision, recorded = rows[0]
    ck = load_checkpoint(
        str(path), label=str(label), revision=str(revision or ""), dtype=dtype, device=device
    )
    if recorded and ck.weights_hash != recorded:
        raise InputError(
            f"checkpoint {label!r} at {path!r} has other weights than when it was ingested "
            f"(hash {ck.weights_hash}, recorded {recorded}); restore them to diff its runs"
        )
    return ck.model


def run_model(
    store: Store,
    run: str | int,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache: dict[int, Any] | None = None,
) -> RunModel:
    """Load a run's model (and its edit); ``cache`` shares models by checkpoint id.

    Example
    -------
    >>> run_model(st, "base/pairs+steer_adl").edit is not None  # doctest: +SKIP
    True
    """
    from actstore.edits.apply import resolve_edit
    from actstore.edits.spec import EditSpec

    rec = _record(store, run)
    if rec["checkpoint_id"] is None:
        raise InputError(f"run {rec['name']!r} records no checkpoint, so it has no model to run")
    cid = int(rec["checkpoint_id"])
    if cache is not None and cid in cache:
        model = cache[cid]
    else:
        model = load_checkpoint_model(store, cid, device=device, dtype=dtype)
        if cache is not None:
            cache[cid] = model
    edit = None
    if rec["edit_id"] is not None:
        edit = resolve_edit(EditSpec.from_dict(json.loads(rec["edit_spec"])), store)
    return RunModel(str(rec["name"]), int(rec["run_id"]), cid, model, edit)


def batches(
    ids: list[list[int]], n_prompt: list[int], prompt_idx: list[int], batch_size: int, device: str
) -> Any:
    """Right-padded batches of token ids with the context an edit needs: (slice, BatchContext).

    Example
    -------
    >>> [(s, c.input_ids.shape) for s, c in batches([[1, 2], [3]], [2, 1], [0, 1], 8, "cpu")]
    [(slice(0, 2, None), torch.Size([2, 2]))]
    """
    from actstore.ingest.batch_context import BatchContext

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
        ctx = BatchContext(
            list(prompt_idx[lo : lo + batch_size]),
            ids_BS.to(device),
            mask_BS.to(device),
            pos_BS.to(device),
            list(n_prompt[lo : lo + batch_size]),
            [0] * len(chunk),
            "capture",
        )
        yield slice(lo, lo + len(chunk)), ctx


def log_probs(rm: RunModel, ctx: BatchContext) -> torch.Tensor:
    """(B, S, V) float32 next-token log-probabilities of a run's model (edit applied) on a batch.

    Example
    -------
    >>> lp_BSV = log_probs(run_model(st, "base/pairs"), ctx)  # doctest: +SKIP
    """
    with torch.inference_mode(), rm.edit.intervention(rm.model, ctx) if rm.edit else nullcontext():
        out = rm.model(
            input_ids=ctx.input_ids,
            attention_mask=ctx.attention_mask,
            position_ids=ctx.position_ids,
        )
    return out.logits.float().log_softmax(-1)
