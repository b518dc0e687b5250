"""Per-head hooks: values equal TransformerLens' own, layouts, edits, the sparse pattern rule.

The reference is the same as in ``test_hooks.py``: each tiny model's TransformerLens
twin (``tl_twin``), whose ``run_with_cache`` gives ``hook_q/k/v/z`` as
``(B, S, H, d_head)`` (``H`` = key-value heads for k and v, TL's default for
grouped-query attention) and ``hook_pattern`` / ``hook_attn_scores`` as
``(B, H, S, S)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from actstore.errors import HookNotFoundError, InputError, SpecError
from actstore.ingest.families import FAMILIES
from actstore.ingest.heads import (
    ATTENTION_KINDS,
    DENSE_HEAD_KINDS,
    HEAD_KINDS,
    HEAD_SITES,
    AttentionKeep,
    attention_rows,
    head_layout,
)
from actstore.ingest.hooks import adapter_for, capture, expand_hooks, intervene, run_capture
from tests.helpers.tiny import (
    D_HEAD,
    N_HEADS,
    N_LAYERS,
    TINY_FAMILIES,
    tiny_tokenizer,
    tl_cache,
    tl_pairs,
)

PROMPTS = (
    "the cat sat on a mat",
    "the big red dog ran to the house and the small bird sat on a tree",
)
ATOL = RTOL = 1e-5
HEAD_HOOKS = expand_hooks([f"blocks.*.{kind}" for kind in HEAD_KINDS], N_LAYERS)


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """Family -> (HF model loaded from its directory, its TransformerLens twin)."""
    return tl_pairs(tiny_model_dirs)


@pytest.fixture(scope="module")
def tl_reference(models: dict[str, tuple[Any, Any]]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Family -> per prompt, TL hook name -> its value for one unpadded prompt."""
    return tl_cache(models, PROMPTS, HEAD_HOOKS)


def _as_tl(hook: str, got: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our (S, H * d_head) in TL's (S, H, d_head); patterns are already TL-shaped."""
    return got if hook.endswith(ATTENTION_KINDS) else got.unflatten(-1, (n_heads, D_HEAD))


def test_every_family_has_head_sites() -> None:
    assert {f.name for f in FAMILIES.values()} <= set(HEAD_SITES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_single_prompts_match_transformer_lens(family, models, tl_reference) -> None:
    hf, _ = models[family]
    tok = tiny_tokenizer()
    for prompt, ref in zip(PROMPTS, tl_reference[family], strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        acts = run_capture(hf, HEAD_HOOKS, input_ids=ids)
        for hook in HEAD_HOOKS:
            n = ref[hook].shape[1] if hook.endswith(DENSE_HEAD_KINDS) else 0
            got = _as_tl(hook, acts[hook][0], n)
            assert got.shape == ref[hook].shape, hook
            torch.testing.assert_close(got, ref[hook], atol=ATOL, rtol=RTOL, msg=hook)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_unpadded_prompts(family, side, models, tl_reference) -> None:
    hf, _ = models[family]
    batch = tiny_tokenizer(padding_side=side)(list(PROMPTS), padding=True, return_tensors="pt")
    mask_BS = batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask_BS}
    if side == "left":
        inputs["position_ids"] = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    acts = run_capture(hf, HEAD_HOOKS, **inputs)
    for i, ref in enumerate(tl_reference[family]):
        real = mask_BS[i].bool()
        for hook in HEAD_HOOKS:
            if hook.endswith(ATTENTION_KINDS):
                got = acts[hook][i][:, real][:, :, real]
                want = ref[hook]
                if hook.endswith("hook_attn_scores"):  # -inf at the same places
                    assert torch.equal(got.isinf(), want.isinf()), hook
                    got, want = got[~want.isinf()], want[~want.isinf()]
            else:
                got = acts[hook][i][real].unflatten(-1, ref[hook].shape[1:])
                want = ref[hook]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=hook)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_head_layout_and_widths(family, models) -> None:
    hf, tl = models[family]
    a = adapter_for(hf)
    kv = tl.cfg.n_key_value_heads or tl.cfg.n_heads
    assert (a.n_heads, a.n_kv_heads, a.d_head) == (N_HEADS, kv, D_HEAD)
    assert head_layout(a, "blocks.0.attn.hook_q") == head_layout(a, "blocks.2.attn.hook_z")
    assert head_layout(a, "blocks.1.attn.hook_k") == head_layout(a, "blocks.1.attn.hook_v")
    assert head_layout(a, "blocks.1.attn.hook_v") == (kv, D_HEAD)
    assert a.hook_width("blocks.1.attn.hook_v") == kv * D_HEAD
    with pytest.raises(InputError, match=r"'blocks\.0\.attn\.hook_pattern'.*table 'attention'"):
        a.hook_width("blocks.0.attn.hook_pattern")


def test_llama_fixture_is_grouped_query(models) -> None:
    hf, _ = models["llama"]
    a = adapter_for(hf)
    assert a.n_kv_heads < a.n_heads


def test_z_through_the_output_projection_is_attn_out(models) -> None:
    for family in ("gpt2", "gpt_neox", "llama"):
        hf, _ = models[family]
        a = adapter_for(hf)
        ids = torch.tensor([tiny_tokenizer()(PROMPTS[1])["input_ids"]])
        got = run_capture(hf, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"], input_ids=ids)
        o_proj = a.layer(hf, 1).get_submodule(HEAD_SITES[a.family].o)
        with torch.no_grad():
            torch.testing.assert_close(
                o_proj(got["blocks.1.attn.hook_z"]), got["blocks.1.hook_attn_out"]
            )


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("kind", ["attn.hook_v", "attn.hook_z"])
def test_editing_a_head_changes_only_that_head_downstream(family, kind, models) -> None:
    """Zeroing head 1's value / output equals TL's zero-ablation of the same head."""
    hf, tl = models[family]
    hook = f"blocks.1.{kind}"
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[0])["input_ids"]])
    n, d = head_layout(adapter_for(hf), hook)

    def zero_head(_h: str, a: torch.Tensor) -> torch.Tensor:
        a = a.unflatten(-1, (n, d)).clone()
        a[..., 1, :] = 0
        return a.flatten(-2)

    with intervene(hf, {hook: zero_head}), torch.no_grad():
        ours = hf(input_ids=ids).logits

    def tl_zero(a: torch.Tensor, hook: Any) -> torch.Tensor:
        a = a.clone()
        a[:, :, 1, :] = 0
        return a

    with torch.no_grad():
        theirs = tl.run_with_hooks(ids, fwd_hooks=[(hook, tl_zero)])
        clean = tl(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, clean, atol=1e-4)


def test_attention_patterns_cannot_be_edited(models) -> None:
    hf, _ = models["llama"]
    with (
        pytest.raises(InputError, match="attention patterns cannot be edited"),
        intervene(hf, {"blocks.0.attn.hook_pattern": lambda _h, a: a * 0}),
        torch.no_grad(),
    ):
        hf(input_ids=torch.tensor([[2, 4, 5]]))
    # the wrapper is gone afterwards: a plain forward runs
    with torch.no_grad():
        hf(input_ids=torch.tensor([[2, 4, 5]]))


def test_nested_captures_and_removal_restore_the_attention_function(models) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf, _ = models["gpt2"]
    impl = hf.config._attn_implementation
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    ids = torch.tensor([[2, 4, 5, 6]])
    with capture(hf, ["blocks.0.attn.hook_pattern"]) as outer, torch.no_grad():
        with capture(hf, ["blocks.0.attn.hook_pattern", "blocks.2.attn.hook_attn_scores"]) as inner:
            hf(input_ids=ids)
        assert impl in ALL_ATTENTION_FUNCTIONS._local_mapping
        assert torch.equal(outer["blocks.0.attn.hook_pattern"], inner["blocks.0.attn.hook_pattern"])
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("blocks.3.attn.hook_q", "layer 3 out of range: model has layers 0-2"),
        ("blocks.*.attn.hook_rot_q", r"unknown kind 'attn\.hook_rot_q'.*blocks\.L\.attn\.hook_z"),
        ("blocks.0.attn.pattern", "unknown kind 'attn.pattern'"),
    ],
)
def test_bad_head_hooks_are_refused(pattern, match) -> None:
    with pytest.raises(HookNotFoundError, match=match):
        expand_hooks([pattern], n_layers=N_LAYERS)


# --- the sparse pattern rule --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mass:0", r"P must be in \(0, 1\]"),
        ("mass:1.5", r"P must be in \(0, 1\]"),
        ("top:0", "K must be a whole number"),
        ("top:2.5", "K must be a whole number"),
        ("above:0", r"T must be in \(0, 1\]"),
        ("most:3", "RULE mass, top or above"),
        ("mass", "RULE mass, top or above"),
    ],
)
def test_bad_keep_rules(text, match) -> None:
    with pytest.raises(SpecError, match=match):
        AttentionKeep.parse(text)


def test_keep_rules_against_numpy() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    w_RS = torch.softmax(torch.tensor(rng.normal(size=(50, 12)) * 2), -1)
    w_RS[:, -3:] = 0  # masked keys are never kept
    w_RS /= w_RS.sum(-1, keepdim=True)
    mass = AttentionKeep.parse("mass:0.9").keep(w_RS).numpy()
    top = AttentionKeep.parse("top:3").keep(w_RS).numpy()
    above = AttentionKeep.parse("above:0.1").keep(w_RS).numpy()
    for r, w in enumerate(w_RS.numpy()):
        order = np.argsort(-w, kind="stable")
        k = int(np.searchsorted(np.cumsum(w[order]), 0.9) + 1)  # smallest prefix >= 0.9
        assert set(np.flatnonzero(mass[r])) == set(order[:k])
        assert set(np.flatnonzero(top[r])) == set(order[:3])
        assert set(np.flatnonzero(above[r])) == set(np.flatnonzero(w >= 0.1))
    assert not (mass | top | above)[:, -3:].any()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_default_rows_keep_99_percent_and_equal_tl_on_kept_entries(
    family, models, tl_reference
) -> None:
    hf, _ = models[family]
    batch = tiny_tokenizer(padding_side="left")(list(PROMPTS), padding=True, return_tensors="pt")
    mask_BS = batch["attention_mask"]
    pos = (mask_BS.cumsum(-1) - 1).clamp(min=0)
    hooks = [h for h in HEAD_HOOKS if h.endswith(ATTENTION_KINDS)]
    acts = run_capture(
        hf, hooks, input_ids=batch["input_ids"], attention_mask=mask_BS, position_ids=pos
    )
    offsets = (mask_BS.shape[1] - mask_BS.sum(-1)).tolist()
    t = attention_rows(acts, mask_BS.bool(), offsets, AttentionKeep.parse("mass:0.99")).to_pylist()
    lengths = mask_BS.sum(-1).tolist()
    first_row = [0, lengths[0]]
    mass: dict[tuple[int, int, int], float] = {}
    smallest: dict[tuple[int, int, int], float] = {}
    for r in t:
        i = 0 if r["row"] < lengths[0] else 1
        q = r["row"] - first_row[i]
        ref = tl_reference[family][i]
        layer, head, key = r["layer"], r["head"], r["key_position"]
        assert 0 <= key <= q
        want_w = float(ref[f"blocks.{layer}.attn.hook_pattern"][head, q, key])
        want_s = float(ref[f"blocks.{layer}.attn.hook_attn_scores"][head, q, key])
        assert r["weight"] == pytest.approx(want_w, abs=1e-5)
        assert r["score"] == pytest.approx(want_s, abs=1e-4, rel=1e-4)
        at = (r["row"], layer, head)
        mass[at] = mass.get(at, 0.0) + r["weight"]
        smallest[at] = min(smallest.get(at, 1.0), r["weight"])
    assert len(mass) == sum(lengths) * N_LAYERS * N_HEADS  # every (query, layer, head)
    assert min(mass.values()) >= 0.99 - 1e-6
    assert all(mass[at] - smallest[at] < 0.99 for at in mass)  # and no more keys than needed
    half = attention_rows(acts, mask_BS.bool(), offsets, AttentionKeep.parse("mass:0.5"))
    assert 0 < half.num_rows < len(t)  # random tiny models attend diffusely: 0.99 keeps most


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma2"])
def test_eager_models_pattern_equals_hf_output_attentions(family, tiny_model_dirs) -> None:
    """Under eager attention HF returns the pattern itself; the wrapped eager function agrees."""
    hf = AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs[family], attn_implementation="eager"
    ).eval()
    batch = tiny_tokenizer(padding_side="right")(list(PROMPTS), padding=True, return_tensors="pt")
    hooks = [f"blocks.{layer}.attn.hook_pattern" for layer in range(N_LAYERS)]
    with capture(hf, hooks) as acts, torch.no_grad():
        out = hf(**batch, output_attentions=True)
    real = batch["attention_mask"].bool()
    for layer, hook in enumerate(hooks):
        for i in range(len(PROMPTS)):
            q = real[i]
            torch.testing.assert_close(
                acts[hook][i][:, q][:, :, q], out.attentions[layer][i][:, q][:, :, q]
            )
