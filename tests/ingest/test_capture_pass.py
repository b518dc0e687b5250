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


# --- capture rides on the prompt pass of generation ----------------------------------


def _tokenized() -> list[_pos.TokenizedPrompt]:
    tok = tiny_tokenizer()
    return [_pos.TokenizedPrompt(i, t, tok(t)["input_ids"], None) for i, t in enumerate(TEXTS)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_the_prompt_pass_of_generation_is_the_capture_pass(family, num_samples, hf_models):
    """Bit-identical to a separate left-padded pass (KV cache, repeated rows and all)."""
    from actstore.ingest.capture_pass import forward_batch, prefill_capture
    from actstore.ingest.generate import GenerateSpec, generate

    model, tok, tps = hf_models[family], tiny_tokenizer(), _tokenized()
    hooks = expand_hooks([f"blocks.*.{k}" for k in HOOK_KINDS], N_LAYERS)
    spec = GenerateSpec(max_new_tokens=3, num_samples=num_samples, do_sample=num_samples > 1)
    ids, mask, pos, _ = pad_batch(tps, tok.pad_token_id, "left", "cpu")
    with prefill_capture(model, hooks, logits=True) as pre:
        generate(model, tok, [tp.ids for tp in tps], spec, batch_size=len(tps))
    assert pre.calls == 3  # the prompt pass, then one pass per further token
    got = pre.take(len(tps), int(ids.shape[1]))
    assert got is not None
    with torch.inference_mode():
        want, want_logits = forward_batch(
            model,
            hooks,
            {"input_ids": ids, "attention_mask": mask, "position_ids": pos},
            logits=True,
        )
    real_BS = mask.bool()
    for h in hooks:
        assert torch.equal(got[0][h][real_BS], want[h][real_BS]), h
    assert got[1] is not None and torch.equal(got[1][real_BS], want_logits[real_BS])
    assert pre.take(len(tps) + 1, int(ids.shape[1])) is None  # not this batch: not taken


def test_batched_generation_counts_positions_from_the_mask(hf_models) -> None:
    """GPT-2 (absolute positions): the left-padded prompt pass equals each prompt alone."""
    from actstore.ingest.capture_pass import prefill_capture
    from actstore.ingest.generate import GenerateSpec, generate

    model, tok, tps = hf_models["gpt2"], tiny_tokenizer(), _tokenized()
    hook = "blocks.2.hook_resid_post"
    with prefill_capture(model, [hook], logits=False) as pre:
        generate(model, tok, [tp.ids for tp in tps], GenerateSpec(max_new_tokens=1))
    batched_BSD = pre.acts[hook]
    for b, tp in enumerate(tps):
        with torch.inference_mode():
            alone_SD = run_capture(model, [hook], input_ids=torch.tensor([tp.ids]))[hook][0]
        torch.testing.assert_close(batched_BSD[b, -tp.n_prompt :], alone_SD, atol=1e-5, rtol=1e-5)


def _prompts_file(path: Path) -> Path:
    path.write_text("".join(f'{{"prompt": "{t}", "target": " cat"}}\n' for t in TEXTS * 2))
    return path


def _gen_job(tmp_path: Path, model_dir: Path, name: str, **capture: Any) -> IngestJob:
    return IngestJob.from_dict(
        {
            "store": str(tmp_path / name),
            "model": {"path": str(model_dir), "name": "tiny"},
            "prompts": [{"name": "p", "path": str(_prompts_file(tmp_path / "p.jsonl"))}],
            "capture": {"store_dtype": "float32", "batch_size": 4, **capture},
            "generate": {"max_new_tokens": 3, "num_samples": 2, "do_sample": True, "seed": 3},
            "scorers": [{"name": "cat", "regex": r"\bcat\b"}],
            "metrics": [{"name": "lp", "kind": "logprob", "target": " cat"}],
        }
    )


def _full_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the width of every top-level forward pass of the model run_job loads."""
    from actstore.ingest import runner

    widths: list[int] = []
    real = runner.load_checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        ck = real(*args, **kwargs)
        ck.model.register_forward_hook(
            lambda _m, a, k, _o: widths.append(k["input_ids"].shape[1]), with_kwargs=True
        )
        return ck

    monkeypatch.setattr(runner, "load_checkpoint", counted)
    return widths


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_ingest_with_generation_runs_the_prompt_once(
    tmp_path, tiny_model_dirs, family, side, monkeypatch
):
    """One prompt pass per batch, and the stores of one and of two passes agree."""
    from actstore.ingest import runner

    d = tiny_model_dirs[family]
    hooks = ["blocks.0.hook_resid_post", "blocks.2.mlp.hook_post", "blocks.2.hook_resid_post"]
    widths = _full_passes(monkeypatch)
    runner.run_job(_gen_job(tmp_path, d, "one", hooks=hooks, padding_side=side), quiet=True)
    one_pass = list(widths)
    widths.clear()
    monkeypatch.setattr(runner, "rides_on_generation", lambda _job: False)  # as before: two
    runner.run_job(_gen_job(tmp_path, d, "two", hooks=hooks, padding_side=side), quiet=True)
    assert sum(w > 1 for w in one_pass) == 2  # 6 prompts in batches of 4: two prompt passes
    assert sum(w > 1 for w in widths) == 4  # generation's and the capture's, per batch
    one, two = actstore.open(tmp_path / "one"), actstore.open(tmp_path / "two")
    for h in hooks:
        a, b = one.acts("main/p", h).numpy(), two.acts("main/p", h).numpy()
        if side == "left":  # the same inputs in the same layout
            np.testing.assert_array_equal(a, b)
        else:  # positions count real tokens and masked keys weigh 0: the same up to rounding
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    for table in ("generations", "scores", "tokens"):
        q = f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL"
        got, want = one.sql(q).fetchall(), two.sql(q).fetchall()
        assert got == want if side == "left" or table != "scores" else len(got) == len(want)
    lp = "SELECT value FROM scores WHERE scorer = 'lp' ORDER BY prompt_idx"
    np.testing.assert_allclose(one.sql(lp).fetchall(), two.sql(lp).fetchall(), rtol=1e-6)


def test_completion_positions_run_prompt_and_completion_again(tmp_path, llama_dir, monkeypatch):
    widths = _full_passes(monkeypatch)
    job = _gen_job(
        tmp_path,
        llama_dir,
        "c",
        hooks=["blocks.1.hook_resid_post"],
        positions=["all", "completion"],
    )
    from actstore.ingest import runner

    runner.run_job(job, quiet=True)
    assert sum(w > 1 for w in widths) == 4
    st = actstore.open(job.store)
    n = st.sql("SELECT count(*) FROM tokens WHERE is_completion AND row IS NOT NULL").fetchone()
    assert n is not None and n[0] > 0


def test_an_edited_generating_run_rides_too(tmp_path, llama_dir, monkeypatch) -> None:
    """The edit acts in the prompt pass of generation: one pass stores what two passes did."""
    from actstore.ingest import runner
    from actstore.store import objects

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]

    def edit(st: Any) -> runner.EditContext:
        eid = objects.add_edit(st, name="half", spec={"scale": 0.5})
        return runner.EditContext(
            name="half",
            edit_id=eid,
            intervention=lambda model, _ctx: intervene(
                model, {"blocks.1.hook_resid_pre": lambda _h, a: a * 0.5}
            ),
            spec_hash="half",
        )

    widths = _full_passes(monkeypatch)
    runner.run_job(
        _gen_job(tmp_path, llama_dir, "one", hooks=hooks, padding_side="left"),
        quiet=True,
        edit=edit,
    )
    assert sum(w > 1 for w in widths) == 2
    monkeypatch.setattr(runner, "rides_on_generation", lambda _job: False)
    runner.run_job(
        _gen_job(tmp_path, llama_dir, "two", hooks=hooks, padding_side="left"),
        quiet=True,
        edit=edit,
    )
    one, two = actstore.open(tmp_path / "one"), actstore.open(tmp_path / "two")
    for h in hooks:
        np.testing.assert_array_equal(
            one.acts("main/p+half", h).numpy(), two.acts("main/p+half", h).numpy()
        )
    q = "SELECT * EXCLUDE (run_id) FROM scores ORDER BY ALL"
    assert one.sql(q).fetchall() == two.sql(q).fetchall()
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tp = _tokenized()[0]
    with torch.inference_mode():
        plain = run_capture(model, [hooks[1]], input_ids=torch.tensor([tp.ids]))[hooks[1]][0]
    edited = one.acts("main/p+half", hooks[1], where="prompt_idx = 0").numpy()
    assert not np.allclose(edited, plain.numpy(), atol=1e-3)  # the edit did act


# --- the capture path: one copy between the hook and the writer ----------------------


def test_stored_rows_are_a_view_when_every_cell_is_stored() -> None:
    from actstore.ingest.capture_pass import host_arrays, stored_rows

    tok, tps = tiny_tokenizer(), _tokenized()
    acts_BSD = torch.randn(3, 14, 4)
    every = [
        _pos.select(dataclasses_replace(tp, 14), _pos.parse_positions("all"), tok) for tp in tps
    ]
    rows = stored_rows({"h": acts_BSD}, every, torch.zeros(3, dtype=torch.long))["h"]
    assert rows.data_ptr() == acts_BSD.data_ptr() and torch.equal(rows, acts_BSD.reshape(42, 4))
    sels = [_pos.select(tp, _pos.parse_positions(["last", "offset:-2"]), tok) for tp in tps]
    _, mask, _, offs = pad_batch(tps, tok.pad_token_id, "left", "cpu")
    acts_BSD = torch.randn(*mask.shape, 4)
    rows = stored_rows({"h": acts_BSD}, sels, offs)["h"]
    want = torch.cat([acts_BSD[b, mask.shape[1] - 2 :] for b in range(3)])  # left-padded: the end
    assert torch.equal(rows, want)
    arrays, ready = host_arrays({"h": rows}, torch.float16)
    assert ready is None and torch.equal(arrays["h"], want.to(torch.float16))


def dataclasses_replace(tp: _pos.TokenizedPrompt, n: int) -> _pos.TokenizedPrompt:
    """``tp`` cut or padded with token 4 to ``n`` tokens (so a batch needs no padding)."""
    ids = (tp.ids + [4] * n)[:n]
    return _pos.TokenizedPrompt(tp.prompt_idx, tp.text, ids, None)
