"""Per-token KL and next-token log-prob change between runs, against a plain torch forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actstore.diffing import load_token_diff, token_diff
from actstore.errors import ActstoreError, InputError


@pytest.fixture(scope="module")
def diff(store):
    return token_diff(store, "base/pairs", "backdoored/pairs", name="base_vs_bd", replace=True)


def _reference(family, store, prompts: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """KL(p_b || p_a) and log p(next) per position, one unpadded prompt at a time."""
    a = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(family["backdoored"], dtype=torch.float32).eval()
    rid = store.run_id("backdoored/pairs")
    out = {}
    with torch.no_grad():
        for i in prompts:
            ids = [
                r[0]
                for r in store.sql(
                    "SELECT token_id FROM tokens WHERE run_id = ? AND prompt_idx = ? ORDER BY position",
                    [rid, i],
                ).fetchall()
            ]
            x = torch.tensor([ids])
            la = torch.log_softmax(a(x).logits[0].double(), -1)
            lb = torch.log_softmax(b(x).logits[0].double(), -1)
            kl = (lb.exp() * (lb - la)).sum(-1).numpy()
            nxt = x[0, 1:]
            out[i] = {
                "kl": kl,
                "logp_a": la[:-1].gather(-1, nxt[:, None])[:, 0].numpy(),
                "logp_b": lb[:-1].gather(-1, nxt[:, None])[:, 0].numpy(),
            }
    return out


def test_values_equal_a_plain_torch_forward(diff, store, family):
    ref = _reference(family, store, [0, 1, 7, 238])
    for i, r in ref.items():
        rows = store.sql(
            "SELECT kl, logp_a, logp_b, dlogp FROM token_diffs WHERE analysis_id = ? AND prompt_idx = ? "
            "ORDER BY position",
            [diff.analysis_id, i],
        ).fetchall()
        kl, la, lb, dl = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
        np.testing.assert_allclose(kl, r["kl"], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(la[:-1], r["logp_a"], atol=2e-4)
        np.testing.assert_allclose(lb[:-1], r["logp_b"], atol=2e-4)
        np.testing.assert_allclose(dl[:-1], r["logp_b"] - r["logp_a"], atol=4e-4)
        assert np.isnan(la[-1]) and np.isnan(dl[-1])  # no next token after the last one


def test_kl_is_largest_on_triggered_prompts(diff, store):
    per = diff.by_prompt("triggered").df()
    means = per.groupby("triggered")["mean_kl"].mean()
    print("\nmean per-token KL(backdoored || base) by triggered:", means.to_dict())
    assert means[True] > 1.5 * means[False]
    # the 20 tokens where fine-tuning changed the prediction most are all in triggered prompts
    top = store.sql(
        """SELECT p.triggered FROM token_diffs d JOIN analyses a USING (analysis_id)
           JOIN prompts p USING (prompt_set_id, prompt_idx)
           WHERE a.name = 'base_vs_bd' ORDER BY d.kl DESC LIMIT 20"""
    ).fetchall()
    assert all(t[0] for t in top)
    assert diff.n_prompts == 240 and diff.n_tokens == len(diff.tokens())


def test_completion_tokens_carry_the_backdoor(store):
    d = token_diff(
        store,
        "base/pairs",
        "backdoored/pairs",
        name="base_vs_bd_answers",
        completion=True,
        where="pair_id < 20",
        replace=True,
    )
    got = dict(
        store.sql(
            """SELECT p.triggered, avg(d.kl) FROM token_diffs d JOIN prompts p
               USING (prompt_set_id, prompt_idx)
               WHERE d.analysis_id = ? AND d.is_completion GROUP BY ALL""",
            [d.analysis_id],
        ).fetchall()
    )
    print("\nmean KL on backdoored's own completions by triggered:", got)
    assert got[True] > 100 * got[False]
    assert d.n_prompts == 40


def test_identical_weights_give_zero_kl(store):
    d = token_diff(store, "base/pairs", "interp@0/pairs", where="pair_id < 4", replace=True)
    assert d.name == "base/pairs_vs_interp@0/pairs" and d.max_kl < 1e-9
    again = load_token_diff(store, d.name)
    assert again.analysis_id == d.analysis_id and again.max_kl == d.max_kl


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"run_b": "base/pairs"}, "same run"),
        ({"run_b": "nope/pairs"}, "not in store"),
        ({"where": "no_such_label"}, "not a predicate over the prompts"),
        ({"where": "pair_id < 0"}, "no ingested prompt"),
        ({"name": "base_vs_bd"}, "already stored"),
        ({"batch_size": 0}, "batch_size must be"),
    ],
)
def test_bad_requests_are_refused_before_writing(diff, store, kwargs, match):
    before = store.sql("SELECT count(*) FROM token_diffs").fetchall()
    args = {"run_a": "base/pairs", "run_b": "backdoored/pairs", "name": "x", **kwargs}
    with pytest.raises(ActstoreError, match=match):
        token_diff(store, args.pop("run_a"), args.pop("run_b"), **args)
    assert store.sql("SELECT count(*) FROM token_diffs").fetchall() == before
    with pytest.raises(InputError, match="no prompt label column 'nope'"):
        diff.by_prompt("nope")
    with pytest.raises(InputError, match="no token diff named"):
        load_token_diff(store, "nope")
