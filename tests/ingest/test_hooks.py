"""Hook points: names, patterns, and values equal to TransformerLens' own.

The reference for every family is a TransformerLens ``HookedTransformer`` holding
the tiny HF model's weights without weight processing (``tl_twin``); each hook
kind at each layer must match ``run_with_cache`` within float32 tolerance, for
single prompts and for left- and right-padded batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig

from actstore.errors import HookNotFoundError, InputError
from actstore.ingest.families import FAMILIES
from actstore.ingest.hooks import (
    HOOK_KINDS,
    adapter_for,
    capture,
    expand_hooks,
    intervene,
    parse_hook,
    run_capture,
)
from tests.helpers.tiny import (
    D_MLP,
    D_MODEL,
    N_LAYERS,
    TINY_FAMILIES,
    tiny_tokenizer,
    tl_cache,
    tl_pairs,
)

PROMPTS = (
    "the cat sat on a mat",
    "what is two",
    "the big red dog ran to the house and the small bird sat on a tree",
)
ATOL = RTOL = 1e-5
ALL_HOOKS = expand_hooks([f"blocks.*.{kind}" for kind in HOOK_KINDS], N_LAYERS)


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """Family -> (HF model loaded from its directory, its TransformerLens twin)."""
    return tl_pairs(tiny_model_dirs)


@pytest.fixture(scope="module")
def tl_reference(models: dict[str, tuple[Any, Any]]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Family -> per prompt, TL hook name -> its value for one unpadded prompt."""
    return tl_cache(models, PROMPTS, ALL_HOOKS)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_family_has_a_tiny_model() -> None:
    assert set(FAMILIES) == set(TINY_FAMILIES)


# --- values equal TransformerLens' -----------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_single_prompts_match_transformer_lens(family, models, tl_reference) -> None:
    hf, _ = models[family]
    tok = tiny_tokenizer()
    for prompt, ref in zip(PROMPTS, tl_reference[family], strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with capture(hf, ALL_HOOKS) as acts, torch.no_grad():
            hf(input_ids=ids)
        assert set(acts) == set(ALL_HOOKS)
        for hook in ALL_HOOKS:
            torch.testing.assert_close(acts[hook][0], ref[hook], atol=ATOL, rtol=RTOL, msg=hook)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_padded_batches_match_unpadded_prompts(family, side, models, tl_reference) -> None:
    hf, _ = models[family]
    batch = tiny_tokenizer(padding_side=side)(list(PROMPTS), padding=True, return_tensors="pt")
    mask_BS = batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask_BS}
    if side == "left":
        inputs["position_ids"] = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    acts = run_capture(hf, ALL_HOOKS, **inputs)
    for i, ref in enumerate(tl_reference[family]):
        real = mask_BS[i].bool()
        for hook in ALL_HOOKS:
            got_SD = acts[hook][i][real]
            torch.testing.assert_close(got_SD, ref[hook], atol=ATOL, rtol=RTOL, msg=hook)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_attn_and_mlp_out_are_what_is_added_to_the_residual(family, models) -> None:
    hf, _ = models[family]
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[2])["input_ids"]])
    acts = run_capture(hf, ALL_HOOKS, input_ids=ids)
    for layer in range(N_LAYERS):

        def a(kind: str, layer: int = layer) -> torch.Tensor:
            return acts[f"blocks.{layer}.{kind}"]

        total = a("hook_resid_pre") + a("hook_attn_out") + a("hook_mlp_out")
        torch.testing.assert_close(a("hook_resid_post"), total, atol=ATOL, rtol=RTOL)
        if layer:  # the same tensor, not a copy
            prev = acts[f"blocks.{layer - 1}.hook_resid_post"]
            assert prev.data_ptr() == a("hook_resid_pre").data_ptr()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_resid_post_of_last_layer_is_before_the_final_norm(family, models) -> None:
    hf, _ = models[family]
    adapter = adapter_for(hf)
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[0])["input_ids"]])
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    with capture(hf, [last]) as acts, torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
    # HF's last hidden state has the final norm applied; TL's resid_post does not.
    assert not torch.allclose(out.hidden_states[-1], acts[last])
    normed = adapter.final_norm(hf)(acts[last])
    torch.testing.assert_close(out.hidden_states[-1], normed)
    with torch.no_grad():
        logits = adapter.unembed(hf)(normed)
    if adapter.logit_softcap is not None:
        logits = adapter.logit_softcap * torch.tanh(logits / adapter.logit_softcap)
    torch.testing.assert_close(out.logits, logits)


# --- adapters ----------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_sizes(family, models) -> None:
    hf, tl = models[family]
    adapter = adapter_for(hf)
    assert adapter == adapter_for(hf.config)
    assert (adapter.n_layers, adapter.d_model, adapter.d_mlp) == (
        tl.cfg.n_layers,
        tl.cfg.d_model,
        tl.cfg.d_mlp,
    )
    assert adapter.d_mlp == (4 * D_MODEL if family == "gpt2" else D_MLP)
    assert adapter.family == FAMILIES[family].name
    assert adapter.hook_width("blocks.0.mlp.hook_post") == adapter.d_mlp
    assert adapter.hook_width("blocks.2.hook_attn_out") == D_MODEL
    with pytest.raises(InputError, match="width of a module hook"):
        adapter.hook_width("module:lm_head")


def test_unsupported_model_type_lists_families_and_suggests_module_paths() -> None:
    with pytest.raises(InputError, match=r"'bert'.*llama \(llama, mistral, qwen2\).*module:"):
        adapter_for(BertConfig())


def test_not_a_model() -> None:
    with pytest.raises(InputError, match=r"no config\.model_type"):
        adapter_for(object())


def test_unembed_needs_a_language_model_head(llama_dir) -> None:
    from transformers import AutoModel

    base = AutoModel.from_pretrained(llama_dir)
    with pytest.raises(InputError, match="AutoModelForCausalLM"):
        adapter_for(base).unembed(base)


def test_base_model_without_head_hooks_the_same_layers(llama_dir, models) -> None:
    from transformers import AutoModel

    hf, _ = models["llama"]
    base = AutoModel.from_pretrained(llama_dir).eval()
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[0])["input_ids"]])
    hooks = ["blocks.1.hook_resid_post", "blocks.2.mlp.hook_post"]
    a, b = run_capture(hf, hooks, input_ids=ids), run_capture(base, hooks, input_ids=ids)
    for h in hooks:
        torch.testing.assert_close(a[h], b[h])


# --- names and patterns ------------------------------------------------------------


def test_parse_hook() -> None:
    assert parse_hook("blocks.0.hook_resid_pre") == (0, "hook_resid_pre")
    assert parse_hook("blocks.12.mlp.hook_post") == (12, "mlp.hook_post")
    assert parse_hook("module:model.layers.1.mlp") == (None, "module")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("blocks.1.hook_resid_mid", r"unknown kind 'hook_resid_mid'.*blocks\.L\.hook_resid_pre"),
        ("blocks.x.hook_mlp_out", "layer 'x' is not a number"),
        ("resid_post", r"does not start with 'blocks\.L\.'.*module:<path>"),
        ("module:", "module path is empty"),
    ],
)
def test_parse_hook_errors(name: str, match: str) -> None:
    with pytest.raises(HookNotFoundError, match=match):
        parse_hook(name)


def test_expand_orders_by_layer_then_pattern_and_drops_duplicates() -> None:
    got = expand_hooks(
        [
            "module:model.norm",
            "blocks.*.hook_resid_post",
            "blocks.1-2.hook_mlp_out",
            "blocks.3.hook_resid_pre",
            "blocks.2.hook_mlp_out",
            "module:model.norm",
        ],
        n_layers=4,
    )
    assert got == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_resid_post",
        "blocks.2.hook_mlp_out",
        "blocks.3.hook_resid_post",
        "blocks.3.hook_resid_pre",
        "module:model.norm",
    ]
    assert expand_hooks("blocks.0-0.mlp.hook_post", 1) == ["blocks.0.mlp.hook_post"]


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("blocks.9.hook_resid_post", "layer 9 out of range: model has layers 0-3"),
        ("blocks.2-4.hook_mlp_out", "layer 4 out of range: model has layers 0-3"),
        ("blocks.3-1.hook_mlp_out", "empty layer range '3-1'"),
        ("blocks.*.hook_nope", r"unknown kind 'hook_nope'.*mlp\.hook_post"),
        ("blocks.1-2.nope", "unknown kind 'nope'"),
        ("blocks.1-.hook_mlp_out", "layer '1-' is not a number"),
        ("blocks", "does not start with"),
    ],
)
def test_expand_errors(pattern: str, match: str) -> None:
    with pytest.raises(HookNotFoundError, match=match):
        expand_hooks([pattern], n_layers=4)


def test_hook_not_found_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        expand_hooks(["blocks.4.hook_resid_pre"], n_layers=4)


# --- capture -----------------------------------------------------------------------


def test_module_paths_capture_a_module_output(models) -> None:
    hf, _ = models["llama"]
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[0])["input_ids"]])
    hooks = [
        "module:model.layers.1.mlp",  # returns a tensor
        "module:model.layers.1.self_attn",  # returns (output, weights)
        "module:model",  # returns a ModelOutput
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_attn_out",
    ]
    with capture(hf, hooks) as acts, torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
    assert torch.equal(acts["module:model.layers.1.mlp"], acts["blocks.1.hook_mlp_out"])
    assert torch.equal(acts["module:model.layers.1.self_attn"], acts["blocks.1.hook_attn_out"])
    assert torch.equal(acts["module:model"], out.hidden_states[-1])


def test_module_paths_work_for_any_model() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with capture(net, ["module:1"]) as acts:
        y = net[0](torch.ones(1, 5, 3))
        net(torch.ones(1, 5, 3))
    assert torch.equal(acts["module:1"], y.relu())
    with pytest.raises(InputError, match=r"no config\.model_type"):
        capture(net, ["blocks.0.hook_resid_post"]).__enter__()


def test_unknown_module_path_names_the_children(models) -> None:
    hf, _ = models["llama"]
    with (
        pytest.raises(HookNotFoundError, match=r"model\.layers has no submodule '7'.*0, 1, 2"),
        capture(hf, ["module:model.layers.7.mlp"]),
    ):
        pass


def test_capture_rejects_out_of_range_layer_before_registering(models) -> None:
    hf, _ = models["gpt2"]
    before = _hook_count(hf)
    with (
        pytest.raises(HookNotFoundError, match="layer 3 out of range: model has layers 0-2"),
        capture(hf, ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_pre"]),
    ):
        pass
    assert _hook_count(hf) == before


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_hooks_are_removed_on_exit_and_on_error(family, models) -> None:
    hf, _ = models[family]
    ids = torch.tensor([[2, 4, 5]])
    hf(input_ids=ids)  # HF installs its own output-recording hooks on first use
    before = _hook_count(hf)
    with capture(hf, ALL_HOOKS) as acts:
        assert _hook_count(hf) == before + len(ALL_HOOKS)
        hf(input_ids=ids)
    assert _hook_count(hf) == before
    with pytest.raises(RuntimeError, match="boom"), capture(hf, ALL_HOOKS):
        raise RuntimeError("boom")
    with (
        pytest.raises(RuntimeError, match="boom"),
        intervene(hf, {h: lambda _h, a: a for h in ALL_HOOKS}),
    ):
        raise RuntimeError("boom")
    assert _hook_count(hf) == before
    acts.clear()
    hf(input_ids=ids)
    assert not acts


def test_capture_keeps_the_latest_pass_detached_and_in_model_dtype(models) -> None:
    hf, _ = models["gpt2"]
    hook = "blocks.1.hook_resid_post"
    with capture(hf, [hook]) as acts:
        hf(input_ids=torch.tensor([[2, 4, 5]]))
        hf(input_ids=torch.tensor([[2, 4, 5, 6, 7]]))
    assert acts[hook].shape == (1, 5, D_MODEL)
    assert not acts[hook].requires_grad
    half = AutoModelForCausalLM.from_pretrained(hf.name_or_path, dtype=torch.bfloat16)
    acts = run_capture(half, [hook], input_ids=torch.tensor([[2, 4]]))
    assert acts[hook].dtype == torch.bfloat16


def test_run_capture_stops_after_the_last_hook(models) -> None:
    hf, _ = models["llama"]
    calls: list[str] = []
    handles = [
        hf.model.layers[2].register_forward_hook(lambda *_: calls.append("layer 2")),
        hf.lm_head.register_forward_hook(lambda *_: calls.append("lm_head")),
    ]
    try:
        hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
        acts = run_capture(hf, hooks, input_ids=torch.tensor([[2, 4, 5]]))
        assert list(acts) == hooks
        assert calls == []
        run_capture(hf, ["blocks.2.hook_resid_post"], input_ids=torch.tensor([[2, 4, 5]]))
        assert calls == ["layer 2"]
    finally:
        for handle in handles:
            handle.remove()


def test_run_capture_reports_hooks_that_did_not_fire() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(InputError, match=r"\['module:unused'\] did not fire"):
        run_capture(Net(), ["module:used", "module:unused"], x=torch.ones(1, 1, 2))


# --- intervene ---------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_zeroing_mlp_out_removes_it_from_the_residual(family, models) -> None:
    hf, _ = models[family]
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[2])["input_ids"]])
    hooks = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]
    clean = run_capture(hf, hooks, input_ids=ids)
    with (
        intervene(hf, {"blocks.1.hook_mlp_out": lambda _h, a: torch.zeros_like(a)}),
        capture(hf, [*hooks, "blocks.1.hook_resid_post"]) as acts,
        torch.no_grad(),
    ):
        hf(input_ids=ids)
    assert not acts["blocks.1.hook_mlp_out"].any()  # capture inside intervene sees the edit
    expected = clean["blocks.1.hook_resid_pre"] + clean["blocks.1.hook_attn_out"]
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], expected)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_editing_resid_pre_equals_editing_previous_resid_post(family, models) -> None:
    hf, _ = models[family]
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[0])["input_ids"]])
    v_D = torch.linspace(-1, 1, D_MODEL)
    with intervene(hf, {"blocks.1.hook_resid_pre": lambda _h, a: a + v_D}), torch.no_grad():
        pre = hf(input_ids=ids).logits
    with intervene(hf, {"blocks.0.hook_resid_post": lambda _h, a: a + v_D}), torch.no_grad():
        post = hf(input_ids=ids).logits
    with torch.no_grad():
        clean = hf(input_ids=ids).logits
    torch.testing.assert_close(pre, post)
    assert not torch.allclose(pre, clean)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_zeroing_mlp_hook_post_leaves_only_the_output_bias(family, models) -> None:
    hf, _ = models[family]
    adapter = adapter_for(hf)
    down = adapter.layer(hf, 0).get_submodule(adapter.sites.mlp_down)
    bias_D = down.bias if down.bias is not None else torch.zeros(D_MODEL)
    calls: list[str] = []

    def zero(hook: str, acts_BSD: torch.Tensor) -> torch.Tensor:
        calls.append(hook)
        return acts_BSD * 0

    with intervene(hf, {"blocks.0.mlp.hook_post": zero}), torch.no_grad():
        acts = run_capture(hf, ["blocks.0.hook_mlp_out"], input_ids=torch.tensor([[2, 4, 5]]))
    assert calls == ["blocks.0.mlp.hook_post"]
    mlp_out_SD = acts["blocks.0.hook_mlp_out"][0]
    if family == "gemma2":  # the post-feedforward norm of a zero vector is zero
        bias_D = torch.zeros(D_MODEL)
    torch.testing.assert_close(mlp_out_SD, bias_D.expand_as(mlp_out_SD))


def test_edit_must_keep_the_shape(models) -> None:
    hf, _ = models["gpt2"]
    with (
        pytest.raises(
            InputError, match=r"'blocks\.0\.hook_attn_out' returned .*shape \(1, 3, 32\)"
        ),
        intervene(hf, {"blocks.0.hook_attn_out": lambda _h, a: a[..., :4]}),
    ):
        hf(input_ids=torch.tensor([[2, 4, 5]]))
