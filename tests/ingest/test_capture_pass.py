"""Capture-only passes stop after the last captured hook; values equal the full pass.

Reference: the same padded batch run through the whole model (every layer, the
final norm and the LM head) with :func:`~actstore.ingest.hooks.capture`; the
truncated pass (:func:`~actstore.ingest.hooks.run_capture`, and ``run_job``
without generation or logit metrics) must give bit-identical values and must not
run any module after the last captured hook (forward-hook counters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import actstore
from actstore.ingest import positions as _pos
from actstore.ingest.batches import pad_batch
from actstore.ingest.hooks import (
    HOOK_KINDS,
    adapter_for,
    capture,
    expand_hooks,
    intervene,
    run_capture,
)
from actstore.ingest.job import IngestJob
from tests.helpers.tiny import N_LAYERS, TINY_FAMILIES, tiny_tokenizer

TEXTS = ("the cat sat on a mat", "what is two", "the big red dog ran to the house and the bird")


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs: dict[str, Path]) -> dict[str, Any]:
    return {f: AutoModelForCausalLM.from_pretrained(d).eval() for f, d in tiny_model_dirs.items()}


def _inputs(side: str = "right") -> dict[str, torch.Tensor]:
    tok = tiny_tokenizer()
    tps = [_pos.TokenizedPrompt(i, t, tok(t)["input_ids"], None) for i, t in enumerate(TEXTS)]
    ids, mask, pos, _ = pad_batch(tps, tok.pad_token_id, side, "cpu")
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


class Calls:
    """Counts forward calls of named modules."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.n = dict.fromkeys(modules, 0)
        self.handles = [
            m.register_forward_hook(lambda *_a, k=k: self.n.__setitem__(k, self.n[k] + 1))
            for k, m in modules.items()
        ]

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *_exc: object) -> None:
        for h in self.handles:
            h.remove()


def _later(model: Any, last_layer: int) -> dict[str, nn.Module]:
    a = adapter_for(model)
    later = {f"layer {i}": a.layer(model, i) for i in range(last_layer + 1, N_LAYERS)}
    return {**later, "final norm": a.final_norm(model), "lm_head": a.unembed(model)}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("last_layer", [0, 1])
def test_truncated_capture_is_bit_identical_and_runs_nothing_later(
    family, last_layer, hf_models
) -> None:
    model = hf_models[family]
    hooks = expand_hooks([f"blocks.0-{last_layer}.{k}" for k in HOOK_KINDS], N_LAYERS)
    inputs = _inputs()
    with torch.inference_mode(), capture(model, hooks) as full:
        model(**inputs)
    with torch.inference_mode(), Calls(_later(model, last_layer)) as calls:
        got = run_capture(model, hooks, **inputs)
    assert calls.n == dict.fromkeys(calls.n, 0)  # later layers, final norm, LM head: not run
    assert list(got) == hooks
    for h in hooks:
        assert torch.equal(got[h], full[h]), h
    with torch.inference_mode(), Calls(_later(model, last_layer)) as calls:  # the check can fail
        model(**inputs)
    assert calls.n == dict.fromkeys(calls.n, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_hook_after_the_last_layer_runs_up_to_it(family, hf_models) -> None:
    model = hf_models[family]
    a = adapter_for(model)
    norm = next(n for n, m in model.named_modules() if m is a.final_norm(model))
    hooks = ["blocks.0.hook_resid_post", f"module:{norm}"]
    inputs = _inputs("left")
    with torch.inference_mode(), capture(model, hooks) as full:
        model(**inputs)
    with torch.inference_mode(), Calls({"lm_head": a.unembed(model)}) as calls:
        got = run_capture(model, hooks, **inputs)
    assert calls.n == {"lm_head": 0}
    for h in hooks:
        assert torch.equal(got[h], full[h]), h


def test_an_edit_after_the_last_hook_cannot_change_what_is_captured(hf_models) -> None:
    """Causality: an edit at layer 2 acts after layer 0's output, so skipping it is exact."""
    model = hf_models["llama"]
    hook, inputs = "blocks.0.hook_resid_post", _inputs()
    seen: list[str] = []

    def shift(name: str, acts_BSD: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return acts_BSD + 1.0

    with torch.inference_mode():
        clean = run_capture(model, [hook], **inputs)[hook]
        with intervene(model, {"blocks.2.hook_resid_pre": shift}):
            with capture(model, [hook]) as full:
                edited_logits = model(**inputs).logits
            assert seen == ["blocks.2.hook_resid_pre"]  # the full pass runs the edit
            got = run_capture(model, [hook], **inputs)[hook]
        assert seen == ["blocks.2.hook_resid_pre"]  # the truncated pass never reaches it
        assert not torch.equal(edited_logits, model(**inputs).logits)  # it matters for logits
    assert torch.equal(got, clean) and torch.equal(got, full[hook])


def test_ingest_without_generation_stores_the_full_pass_values(
    tmp_path, llama_dir, monkeypatch
) -> None:
    """run_job: layers 0-1 captured, layer 2 and the head never run, values bit-identical."""
    from actstore.ingest import runner

    loaded: list[Calls] = []
    real = runner.load_checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        ck = real(*args, **kwargs)
        loaded.append(Calls(_later(ck.model, 1)))
        return ck

    monkeypatch.setattr(runner, "load_checkpoint", counted)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{t}"}}\n' for t in TEXTS))
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]
    job = IngestJob.from_dict(
        {
            "store": str(tmp_path / "store"),
            "model": {"path": str(llama_dir), "name": "tiny"},
            "prompts": [{"name": "p", "path": str(prompts)}],
            "capture": {"hooks": hooks, "store_dtype": "float32", "batch_size": 3},
        }
    )
    runner.run_job(job, quiet=True)
    assert loaded and loaded[0].n == dict.fromkeys(loaded[0].n, 0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    inputs = _inputs()
    with torch.inference_mode(), capture(model, hooks) as full:
        model(**inputs)
    real_BS = inputs["attention_mask"].bool()
    st = actstore.open(job.store)
    for h in hooks:
        np.testing.assert_array_equal(st.acts("main/p", h).numpy(), full[h][real_BS].numpy())
