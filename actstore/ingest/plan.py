"""Planning an ingest: everything about a job checked before anything is written.

:func:`plan` reads the prompt files, loads the tokenizer (one per model family),
compares the checkpoints' architectures and tokenizers, expands and checks the
hooks and their layers, tokenizes every prompt against ``max_length`` and loads
and checks the SAEs. A bad job fails here with one clear error, and the store
is untouched.

Example
-------
>>> p = plan(IngestJob.from_toml("job.toml"))  # doctest: +SKIP
>>> p.hooks[:2]  # doctest: +SKIP
['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from actstore.errors import InputError, NotAStoreError
from actstore.ingest import positions as _pos
from actstore.ingest.derived import check_compatible, iter_derived, source_labels
from actstore.ingest.families import adapter_for, expand_hooks
from actstore.ingest.heads import is_attention_hook
from actstore.ingest.job import IngestJob
from actstore.ingest.label_types import mixed_notes
from actstore.ingest.models import (
    load_tokenizer,
    resolve_device,
    tokenizer_files_digest,
    tokenizer_hash,
)
from actstore.ingest.prompts import load_prompt_table, prepare_prompts
from actstore.ingest.saes import LoadedSAE, check_sae, load_sae
from actstore.store import objects
from actstore.store.format import MARKER
from actstore.store.location import Location


@dataclass
class PromptSet:
    """A prompt set ready to run: its spec, table, content hash and tokens."""

    spec: Any
    table: pa.Table
    hash: str
    tokenized: list[_pos.TokenizedPrompt]
    notes: list[str] = field(default_factory=list)
    """How mixed label columns were typed (``actstore.ingest.label_types``)."""


@dataclass
class Plan:
    """Everything a job needs, checked: device, tokenizer, hooks and widths, prompts, SAEs."""

    job: IngestJob
    device: str
    tokenizer: Any
    tok_hash: str
    config: Any
    adapter: Any
    hooks: list[str]
    widths: dict[str, int]
    policies: tuple[_pos.Policy, ...]
    prompt_sets: list[PromptSet]
    saes: list[LoadedSAE]
    checkpoint_paths: dict[str, tuple[str, str]]


def _check_store_path(path: str) -> None:
    loc = Location.parse(path)
    if not loc.is_local:
        if loc.files() and not loc.exists(MARKER):
            raise NotAStoreError(
                f"store URL {path} holds objects but is not a store; choose a new prefix"
            )
        return
    if loc.is_file():
        raise NotAStoreError(
            f"store path {path} is a file; give the job a directory path for the store"
        )
    root = loc.local_path
    if root.is_dir() and not (root / MARKER).exists() and any(root.iterdir()):
        raise NotAStoreError(
            f"store path {path} is a non-empty directory that is not a store; choose a new directory"
        )


def _check_labels(job: IngestJob, sets: list[PromptSet]) -> None:
    """Every label column a ``match`` scorer reads exists in every prompt set."""
    for s in job.scorers:
        for ps in sets:
            if s.match is not None and s.match not in ps.table.column_names[1:]:
                raise InputError(
                    f"[[scorers]] {s.name!r}: match = {s.match!r} is not a label of prompt set "
                    f"{ps.spec.name!r}; its labels are {ps.table.column_names[1:]}"
                )
    check_metric_labels(job.metrics, sets)


def check_metric_labels(metrics: Any, sets: list[PromptSet]) -> None:
    """Every label column a logit metric reads exists in every prompt set.

    Example
    -------
    >>> check_metric_labels([], [])
    """
    names = [m.name for m in metrics]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"[[metrics]] names {dup} appear more than once; each must be unique")
    for m in metrics:
        for ps in sets:
            for c in m.columns:
                if c not in ps.table.column_names[1:]:
                    raise InputError(
                        f"[[metrics]] {m.name!r}: label column {c!r} is not in prompt set "
                        f"{ps.spec.name!r}; its labels are {ps.table.column_names[1:]}"
                    )


def plan(job: IngestJob) -> Plan:
    """Check everything about a job before any work; return what the run needs.

    Example
    -------
    >>> p = plan(IngestJob.from_toml("job.toml"))  # doctest: +SKIP
    """
    from transformers import AutoConfig

    _check_store_path(job.store)
    device = resolve_device(job.model.device)
    ck_paths = {
        c.label: (c.path or job.model.path, c.revision or job.model.revision)
        for c in job.checkpoints
        if not c.derived  # built from the others' weights: actstore.ingest.derived
    }
    tok_path = job.model.tokenizer or next(iter(ck_paths.values()))[0]
    tokenizer = load_tokenizer(tok_path, job.model.revision, job.model.trust_remote_code)
    tok_hash = tokenizer_hash(tokenizer)
    tok_files = tokenizer_files_digest(tok_path)  # checkpoints with these files: not loaded again
    config = None
    for label, (path, rev) in ck_paths.items():
        try:
            cfg = AutoConfig.from_pretrained(
                path, revision=rev or None, trust_remote_code=job.model.trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise InputError(
                f"checkpoint {label!r}: cannot read a model config at {path!r}: {str(e).splitlines()[0]}"
            ) from None
        if config is None:
            config = cfg
        else:
            a, b = adapter_for(config), adapter_for(cfg)
            if (config.model_type, a.n_layers, a.d_model) != (
                cfg.model_type,
                b.n_layers,
                b.d_model,
            ):
                raise InputError(
                    f"checkpoint {label!r} is a {cfg.model_type} with {b.n_layers} layers x {b.d_model}, "
                    f"but the first checkpoint is a {config.model_type} with {a.n_layers} x {a.d_model}; "
                    "a job's checkpoints must share one architecture: put other models in another job"
                )
        if (
            not job.model.tokenizer
            and Path(path).is_dir()
            and any(Path(path).glob("tokenizer*"))
            and (tok_files is None or tokenizer_files_digest(path) != tok_files)
        ):
            other = tokenizer_hash(load_tokenizer(path, rev, job.model.trust_remote_code))
            if other != tok_hash:
                raise InputError(
                    f"checkpoint {label!r} has a different tokenizer than {tok_path!r}; rows of one model "
                    "family must align, so use one tokenizer (set model.tokenizer) or a separate job"
                )
    assert config is not None
    for label, params in iter_derived(job.checkpoints):
        check_compatible(label, {s: ck_paths[s][0] for s in source_labels(params)})
    adapter = adapter_for(config)
    hooks = expand_hooks(job.capture.hooks, adapter.n_layers)
    widths = {}
    for h in hooks:
        if h.startswith("module:"):
            widths[h] = -1  # known after the first forward pass
        elif is_attention_hook(h):  # not arrays: rows of the attention table
            adapter.check(h)
        else:
            adapter.check(h)
            widths[h] = adapter.hook_width(h)
    policies = _pos.parse_positions(job.capture.positions)
    sets = []
    for ps in job.prompts:
        raw = load_prompt_table(ps.path)
        # label columns stored as VARCHAR by the one rule for every format, reported
        notes = mixed_notes(raw, text=ps.text)
        table = prepare_prompts(
            raw.replace_schema_metadata(None),
            name=ps.name,
            text=ps.text,
            messages=ps.messages,
            tokenizer=tokenizer,
            limit=ps.limit,
        )
        texts = table.column(0).to_pylist()
        toks = _pos.tokenize(
            tokenizer, texts, max_length=job.capture.max_length, truncation=job.capture.truncation
        )
        sets.append(PromptSet(ps, table, objects.table_hash(table), toks, notes))
    _check_labels(job, sets)
    saes = []
    for s in job.saes:
        loaded = load_sae(s, device)
        check_sae(loaded, [h for h in hooks if not is_attention_hook(h)], widths)
        saes.append(loaded)
    return Plan(
        job,
        device,
        tokenizer,
        tok_hash,
        config,
        adapter,
        hooks,
        widths,
        policies,
        sets,
        saes,
        ck_paths,
    )
