"""Behaviour evaluation and loss / KL measurement against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actstore.edits import EditOp, EditSpec, evaluate, measure_loss_kl, run_edited
from actstore.errors import InputError, NotFoundError, RunNotFoundError
from actstore.ingest.hooks import intervene
from actstore.ingest.job import IngestJob
from tests.edits.helpers import HOOK, job_dict
from tests.helpers.tiny import tiny_tokenizer

COLUMNS = [
    "run",
    "checkpoint",
    "edit",
    "parent",
    "scorer",
    "n_triggered",
    "rate_triggered",
    "n_clean",
    "rate_clean",
    "reward",
    "accuracy_clean",
    "loss_clean",
    "kl_clean",
    "loss_prompt_clean",
]


def _edit(env, st, spec: EditSpec) -> str:
    job = IngestJob.from_dict(
        job_dict(st.root, env["prompts"], {"base": env["base_dir"]}, generate=False)
    )
    run_edited(job, spec, quiet=True)
    return f"base/pairs+{spec.name}"


def _insert_scores(st, rows):
    with st.catalog.write() as con:
        con.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?)", rows)
        con.execute(
            "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS VARCHAR) WHERE key = 'commit_seq'"
        )


def test_evaluate_matches_a_direct_computation(store_copy):
    st = store_copy
    rng = np.random.default_rng(0)
    extra = []
    for run in ("base/pairs", "ft/pairs"):
        rid = st.run_id(run)
        for i in range(8):
            extra.append((rid, i, 0, "rm", float(rng.normal()), None))
            extra.append((rid, i, 0, "loss", float(rng.random()), None))
    _insert_scores(st, extra)
    table = evaluate(st, scorer="cat", reward="rm").arrow()
    assert table.column_names == COLUMNS
    trig = dict(st.sql("SELECT prompt_idx, triggered FROM prompts").fetchall())
    raw = st.sql("SELECT run_id, prompt_idx, scorer, value, flag FROM scores").fetchall()
    for row in table.to_pylist():
        rid = st.run_id(row["run"])
        mine = [r for r in raw if r[0] == rid]
        flags_t = [r[4] for r in mine if r[2] == "cat" and trig[r[1]]]
        flags_c = [r[4] for r in mine if r[2] == "cat" and not trig[r[1]]]
        assert row["n_triggered"] == len(flags_t) == 4 and row["n_clean"] == len(flags_c) == 4
        assert row["rate_triggered"] == pytest.approx(np.mean(flags_t))
        assert row["rate_clean"] == pytest.approx(np.mean(flags_c))
        assert row["reward"] == pytest.approx(np.mean([r[3] for r in mine if r[2] == "rm"]))
        loss_c = [r[3] for r in mine if r[2] == "loss" and not trig[r[1]]]
        assert row["loss_clean"] == pytest.approx(np.mean(loss_c))
        assert row["kl_clean"] is None and row["edit"] is None and row["parent"] is None
        assert row["scorer"] == "cat" and row["checkpoint"] == row["run"].split("/")[0]
    # the default scorer is the only flag-giving one; runs keep the order asked for
    again = evaluate(st, ["ft/pairs", "base/pairs"]).arrow()
    assert again.column("run").to_pylist() == ["ft/pairs", "base/pairs"]
    assert again.column("scorer").to_pylist() == ["cat", "cat"]
    assert again.column("reward").to_pylist() == [None, None]  # no reward-model scorer in the jobs


def test_loss_and_kl_match_torch(edit_env, store_copy, model):
    """loss/kl: over the positions predicting the reference (the unedited run's completion);
    loss_prompt/kl_prompt: over the prompt's own next-token predictions."""
    st = store_copy
    alpha, v = 3.0, torch.tensor(edit_env["vectors"]["dir_b"], dtype=torch.float32)
    run = _edit(
        edit_env,
        st,
        EditSpec(name="steer_all", ops=[EditOp(kind="steer", direction="dir_b", alpha=alpha)]),
    )
    got = measure_loss_kl(st, run, batch_size=3).arrow().to_pylist()
    base = measure_loss_kl(st, "base/pairs").arrow().to_pylist()
    texts = dict(st.sql("SELECT prompt_idx, text FROM prompts WHERE NOT triggered").fetchall())
    assert [r["prompt_idx"] for r in got] == sorted(texts) == [r["prompt_idx"] for r in base]
    completion = dict(
        st.sql(
            "SELECT prompt_idx, token_ids FROM generations WHERE run_id = ? AND sample_idx = 0",
            [st.run_id("base/pairs")],
        ).fetchall()
    )
    tok = tiny_tokenizer()
    n_with_reference = 0
    for r, b in zip(got, base, strict=True):
        prompt = tok(texts[r["prompt_idx"]])["input_ids"]
        ref = list(completion[r["prompt_idx"]])
        n = len(prompt)
        ids = torch.tensor([prompt + ref])
        assert (r["reference"], r["n_prompt"], r["n_reference"]) == ("completion", n, len(ref))
        with torch.no_grad():
            plain = model(ids).logits[0]
            with intervene(model, {HOOK: lambda _n, a: a + alpha * v}):
                steered = model(ids).logits[0]
        kl_S = F.kl_div(
            steered.log_softmax(-1), plain.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        total = len(prompt) + len(ref)
        target = ids[0, 1:]
        assert r["loss_prompt"] == pytest.approx(
            float(F.cross_entropy(steered[: n - 1], target[: n - 1])), abs=1e-5
        )
        assert r["kl_prompt"] == pytest.approx(float(kl_S[: n - 1].mean()), abs=1e-6)
        assert b["loss_prompt"] == pytest.approx(
            float(F.cross_entropy(plain[: n - 1], target[: n - 1])), abs=1e-5
        )
        if ref:
            n_with_reference += 1
            cont = slice(n - 1, total - 1)
            assert r["loss"] == pytest.approx(
                float(F.cross_entropy(steered[cont], target[cont])), abs=1e-5
            )
            assert r["kl"] == pytest.approx(float(kl_S[cont].mean()), abs=1e-6) and r["kl"] > 1e-4
            assert b["loss"] == pytest.approx(
                float(F.cross_entropy(plain[cont], target[cont])), abs=1e-5
            )
        assert b["kl"] is None and b["kl_prompt"] is None
    assert n_with_reference >= 2
    stored = st.sql(
        "SELECT prompt_idx, scorer, value FROM scores WHERE run_id = ? ORDER BY scorer, prompt_idx",
        [st.run_id(run)],
    ).fetchall()
    want = sorted(
        (r["prompt_idx"], key, r[key])
        for r in got
        for key in ("loss", "kl", "loss_prompt", "kl_prompt")
        if r[key] is not None
    )
    assert sorted(stored) == want
    # measuring again replaces, not duplicates
    measure_loss_kl(st, run)
    assert st.sql("SELECT count(*) FROM scores WHERE run_id = ?", [st.run_id(run)]).fetchone() == (
        len(want),
    )


def test_empty_edit_has_zero_kl_and_the_parents_loss(edit_env, store_copy):
    st = store_copy
    run = _edit(edit_env, st, EditSpec(name="noop"))
    table = evaluate(st, ["base/pairs", run], measure=True).arrow().to_pylist()
    base, noop = table
    assert noop["kl_clean"] == 0.0 and noop["edit"] == "noop" and noop["parent"] == "base/pairs"
    assert noop["loss_clean"] == pytest.approx(base["loss_clean"], abs=1e-6)
    assert noop["loss_prompt_clean"] == pytest.approx(base["loss_prompt_clean"], abs=1e-6)
    assert base["kl_clean"] is None and base["loss_clean"] > 0
    assert noop["n_triggered"] == 0 and noop["rate_triggered"] is None  # not generated


def test_evaluate_and_measure_errors(store_copy):
    st = store_copy
    with pytest.raises(
        InputError,
        match=r"trigger column 'trig' is not a prompt label; labels are \['triggered', 'pair_id'\]",
    ):
        evaluate(st, trigger_column="trig")
    with pytest.raises(
        NotFoundError, match=r"scorer 'hate' has no scores in these runs; scorers: \['cat'\]"
    ):
        evaluate(st, scorer="hate")
    with pytest.raises(RunNotFoundError, match="run 'nope' not in store"):
        evaluate(st, ["nope"])
    with pytest.raises(
        InputError,
        match=r"where='NOT trig' is not a predicate over the prompts.*\['triggered', 'pair_id'\]",
    ):
        measure_loss_kl(st, "base/pairs", where="NOT trig")
    _insert_scores(st, [(1, 0, 0, "other", 1.0, True)])
    with pytest.raises(
        InputError, match=r"several behaviour scorers \['cat', 'other'\]; choose one with scorer="
    ):
        evaluate(st)
    assert evaluate(st, []).arrow().num_rows == 0
    empty = measure_loss_kl(st, "base/pairs", where="pair_id > 100").arrow()
    assert empty.num_rows == 0 and empty.column_names == [
        "run",
        "prompt_idx",
        "reference",
        "n_prompt",
        "n_reference",
        "loss",
        "kl",
        "loss_prompt",
        "kl_prompt",
    ]


def test_labeled_generations_join_labels_and_every_score(store_copy):
    st = store_copy
    _insert_scores(st, [(st.run_id("base/pairs"), 1, 0, "loss", 0.5, None)])
    view = st.sql("SELECT * FROM labeled_generations ORDER BY run_id, prompt_idx").arrow()
    gens = st.sql("SELECT run_id, prompt_idx, text FROM generations ORDER BY 1, 2").fetchall()
    assert [(r["run_id"], r["prompt_idx"], r["text"]) for r in view.to_pylist()] == gens
    labels = dict(st.sql("SELECT prompt_idx, triggered FROM prompts").fetchall())
    flags = {
        (r, i): f
        for r, i, f in st.sql(
            "SELECT run_id, prompt_idx, flag FROM scores WHERE scorer = 'cat'"
        ).fetchall()
    }
    for r in view.to_pylist():
        assert (
            r["triggered"] == labels[r["prompt_idx"]] and r["checkpoint"] == r["run"].split("/")[0]
        )
        assert r["flag_cat"] == flags[(r["run_id"], r["prompt_idx"])] and r["edit"] is None
        assert r["score_loss"] == (
            0.5 if (r["run"], r["prompt_idx"]) == ("base/pairs", 1) else None
        )
    # behaviour by label is one GROUP BY, and equals evaluate's rates
    by = dict(
        st.sql(
            "SELECT triggered, avg(flag_cat::INT) FROM labeled_generations WHERE run = 'base/pairs' "
            "GROUP BY triggered"
        ).fetchall()
    )
    row = evaluate(st, ["base/pairs"]).arrow().to_pylist()[0]
    assert by[True] == pytest.approx(row["rate_triggered"]) and by[False] == pytest.approx(
        row["rate_clean"]
    )
