"""Positions-restricted encodes (``encode(..., positions=PRED)``): a complete encode of a subset.

A tiny Llama is ingested without SAEs (float32); the SAE is a real sae_lens SAE
with random weights saved by sae_lens. References: sae_lens' own ``encode`` of
exactly the stored rows that a numpy filter of the tokens table selects, and
scipy's Welch t-test over those rows for ``trigger_diff``. kill -9 runs the encode
in a child forked from a forkserver (as ``test_kill_points`` does), killed at
chosen commits.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

import actstore
import actstore.queries as q
from actstore.cli import main
from actstore.errors import InputError, NotFoundError
from actstore.ingest import encode as encode_mod
from actstore.ingest.encode import encode
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.store.selections import rows_sha256
from tests.ingest.test_encode import HOOK, RUN, _parts, _save_sae, _snapshot
from tests.ingest.test_runner import job_dict

LAST3 = "pos_from_end >= -3"  # the last three prompt tokens of each prompt


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, llama_dir) -> Path:
    root = tmp_path_factory.mktemp("encpos")
    d = job_dict(root, llama_dir, hooks=[HOOK])
    run_job(IngestJob.from_dict(d), quiet=True)
    return Path(d["store"])


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    return _save_sae(tmp_path_factory.mktemp("encpos_sae") / "l1_std")


def _fresh(pristine: Path, dst: Path) -> actstore.Store:
    shutil.copytree(pristine, dst)
    return actstore.open(dst)


def _selected(st: actstore.Store, keep) -> np.ndarray:
    """Rows of RUN that ``keep`` (a numpy test on the tokens table's columns) selects."""
    t = st.sql(
        'SELECT t."row", t.pos_from_end, t.position_role FROM tokens t JOIN runs r '
        'USING (run_id) WHERE r.name = ? AND t."row" IS NOT NULL',
        [RUN],
    ).df()
    rows = t["row"].to_numpy()[keep(t)]
    return np.sort(rows.astype(np.int64))


def _reference(st: actstore.Store, sae_dir: Path, rows: np.ndarray) -> np.ndarray:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir))
    x = st.acts(RUN, HOOK).numpy()[rows]
    with torch.no_grad():
        return sae.encode(torch.from_numpy(x.astype(np.float32))).numpy()


def _features(st: actstore.Store, sae: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = st.sql(
        "SELECT row, feature, value FROM feature_acts WHERE sae = ? AND run = ?", [sae, RUN]
    ).numpy()
    return f["row"], f["feature"], f["value"]


def test_subset_features_equal_sae_encode_of_exactly_the_selected_rows(tmp_path, pristine, sae_dir):
    st = _fresh(pristine, tmp_path / "s")
    # 8 rows a part: no 1-row part, which torch multiplies by gemv, rounding otherwise
    res = encode(st, str(sae_dir), positions=LAST3, part_rows=8)
    want_rows = _selected(st, lambda t: t["pos_from_end"].to_numpy() >= -3)
    n = st.array_info(RUN, HOOK)["n_rows"]
    assert 0 < want_rows.size < n
    r = res[0]
    assert (r.status, r.positions, r.n_selected, r.rows_encoded) == (
        "encoded",
        LAST3,
        want_rows.size,
        want_rows.size,
    )
    assert r.parts == -(-want_rows.size // 8) and r.n_rows == n
    rows, feats, vals = _features(st, "l1_std")
    assert set(rows.tolist()) <= set(want_rows.tolist())  # nothing outside the selection
    dense = np.zeros((n, 48), np.float32)
    dense[rows, feats] = vals
    want = _reference(st, sae_dir, want_rows)
    np.testing.assert_array_equal(dense[want_rows], want)
    assert r.nonzeros == int((want != 0).sum()) > 0
    # the parts tile [0, n) and the catalog records the selection
    ff = st.sql("SELECT first_row, n_rows FROM feature_files ORDER BY first_row").fetchall()
    assert ff[0][0] == 0 and sum(k for _, k in ff) == n
    assert all(a + k == b for (a, k), (b, _) in itertools.pairwise(ff))
    sel = st.sql("SELECT positions, n_rows, rows_sha256 FROM feature_selections").fetchall()
    assert sel == [(LAST3, want_rows.size, rows_sha256(want_rows))]
    from tests.demo.test_format_doc import _documented_columns

    cols = {
        c for (c,) in st.sql("SELECT column_name FROM (DESCRIBE feature_selections)").fetchall()
    }
    assert cols == _documented_columns()["feature_selections"]


def test_queries_answer_over_the_encoded_rows_only(tmp_path, pristine, sae_dir):
    st = _fresh(pristine, tmp_path / "s")
    encode(st, str(sae_dir), positions=LAST3, name="last3")
    rows = _selected(st, lambda t: t["pos_from_end"].to_numpy() >= -3)
    X = _reference(st, sae_dir, rows).astype(np.float64)
    meta = st.acts(RUN, HOOK, rows=rows).meta
    g = np.asarray(meta.column("triggered").to_pylist(), bool)
    res = q.run_named(st, "trigger_diff", run=RUN, sae="last3", group_a="triggered").df()
    res = res.sort_values("feature")
    with np.errstate(invalid="ignore", divide="ignore"):
        t, p = stats.ttest_ind(X[g], X[~g], equal_var=False, axis=0)
    np.testing.assert_allclose(res["mean_a"], X[g].mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res["mean_b"], X[~g].mean(0), rtol=1e-9, atol=1e-12)
    assert res["n_a"].iloc[0] + res["n_b"].iloc[0] == rows.size
    ok = np.isfinite(t)
    assert ok.sum() > 10
    np.testing.assert_allclose(res["t"].to_numpy()[ok], t[ok], rtol=1e-7)
    np.testing.assert_allclose(res["p"].to_numpy()[ok], p[ok], rtol=1e-6, atol=1e-300)
    # density over the encoded rows (not over all stored rows, as zeros)
    dens = q.run_named(st, "feature_density", run=RUN, sae="last3").df()
    assert (dens["n_tokens"] == rows.size).all()
    np.testing.assert_allclose(dens["freq"], (X > 0).mean(0), rtol=1e-12)
    # positions inside the encoded rows: over those rows
    last = _selected(st, lambda t: t["position_role"].to_numpy() == "last")
    sub = q.run_named(
        st, "feature_density", run=RUN, sae="last3", positions="position_role = 'last'"
    ).df()
    np.testing.assert_allclose(sub["mean"], X[np.isin(rows, last)].mean(0), rtol=1e-9, atol=1e-12)
    # positions selecting rows that were not encoded: refused, saying so
    with pytest.raises(InputError, match=r"selects \d+ rows of run 'main/pairs' that have no feat"):
        q.run_named(st, "trigger_diff", run=RUN, sae="last3", group_a="triggered", positions="true")
    with pytest.raises(InputError, match=r"was encoded for the rows 'pos_from_end >= -3' only"):
        q.run_named(st, "top_activations", sae="last3", feature=0, positions="position >= 0")
    top = q.run_named(st, "top_activations", run=RUN, sae="last3", feature=int(X.max(0).argmax()))
    assert set(top.df()["row"]) <= set(rows.tolist())
    # an analysis reading features of rows it selected itself: the same refusal
    from actstore.analysis.reward import reward_correlation

    kw = {"run": RUN, "reward": "reward", "sae": "last3", "save": False, "split": None}
    with pytest.raises(InputError, match=r"reward_correlation: \d+ of the selected rows of run"):
        reward_correlation(st, **kw)
    assert reward_correlation(st, where=LAST3, **kw) is not None
    # the SQL macros cannot restrict to the subset: refused, pointing to run_named
    with pytest.raises(InputError, match=r"cover only the rows pos_from_end >= -3"):
        st.sql("SELECT * FROM feature_density('main/pairs', 'last3')").fetchall()


def test_one_selection_per_sae_name_and_run(tmp_path, pristine, sae_dir):
    root = tmp_path / "s"
    st = _fresh(pristine, root)
    encode(st, str(sae_dir), positions=LAST3)
    before = _snapshot(root)
    again = encode(st, str(sae_dir), positions=LAST3)
    same_rows = encode(st, str(sae_dir), positions=f"false OR ({LAST3})")
    assert [r.status for r in again + same_rows] == ["up-to-date", "up-to-date"]
    assert _snapshot(root) == before
    for positions in ("position_role = 'last'", None):
        with pytest.raises(InputError, match=r"already has features of SAE 'l1_std' for the \d+ "):
            encode(st, str(sae_dir), positions=positions)
        assert _snapshot(root) == before
    res = encode(st, str(sae_dir), positions="position_role = 'last'", name="l1_last")
    assert res[0].status == "encoded"
    full = _fresh(pristine, tmp_path / "full")
    encode(full, str(sae_dir))
    before = _snapshot(tmp_path / "full")
    with pytest.raises(InputError, match=r"for every stored row; query them with positions="):
        encode(full, str(sae_dir), positions=LAST3)
    assert _snapshot(tmp_path / "full") == before


@pytest.mark.parametrize(
    ("positions", "match"),
    [
        ("true; DROP TABLE runs", r"is not one SQL expression"),
        ("position IN (SELECT * FROM read_csv('x.csv'))", r"calls the table function read_csv"),
        ("no_such_column = 1", r"is not a SQL predicate over labeled_tokens .*columns: \["),
        ("position + 1", r"is INTEGER, not a boolean predicate"),
        ("position < 0", r"selects no stored row of run 'main/pairs'"),
    ],
)
def test_bad_predicate_is_refused_before_anything_is_written(
    tmp_path, pristine, sae_dir, positions, match
):
    root = tmp_path / "s"
    st = _fresh(pristine, root)
    before = _snapshot(root)
    with pytest.raises(InputError, match=match):
        encode(st, str(sae_dir), positions=positions)
    assert _snapshot(root) == before
    r = CliRunner().invoke(
        main, ["encode", str(root), "--sae", str(sae_dir), "--positions", positions]
    )
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert _snapshot(root) == before


def _killed_child(root: str, sae: str, k: int) -> None:
    """The subset encode, SIGKILLed at its ``k``-th commit event (before/after each part's)."""
    torch.set_num_threads(1)
    count = [0]
    commit = encode_mod._commit_part

    def killing(*a, **kw):
        for when in ("before", "after"):
            if when == "after":
                commit(*a, **kw)
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)

    encode_mod._commit_part = killing
    encode(actstore.open(root), sae, positions=LAST3, part_rows=4)


def _run_killed(root: Path, sae: str, k: int) -> int:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "actstore.ingest.runner", __name__])
    proc = ctx.Process(target=_killed_child, args=(str(root), sae, k))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the encode killed at event {k} hung")
    return -proc.exitcode if proc.exitcode and proc.exitcode < 0 else 0


def test_kill_9_during_a_subset_encode_then_resume_is_bit_identical(tmp_path, pristine, sae_dir):
    sae = str(sae_dir)
    whole = _fresh(pristine, tmp_path / "whole")
    encode(whole, sae, positions=LAST3, part_rows=4)
    n_parts = whole.sql("SELECT count(*) FROM feature_files").fetchall()[0][0]
    assert n_parts >= 6
    killed = tmp_path / "killed"
    shutil.copytree(pristine, killed)
    # after the 2nd commit; before the (resumed) 2nd commit, leaving an uncommitted part
    assert [_run_killed(killed, sae, k) for k in (4, 3)] == [signal.SIGKILL] * 2
    st = actstore.open(killed)
    done = st.sql("SELECT count(*) FROM feature_files").fetchall()[0][0]
    assert done == 3 < n_parts
    with pytest.raises(NotFoundError, match=r"interrupted\); finish it with .*--positions"):
        q.run_named(st, "feature_density", run=RUN, sae="l1_std")
    res = encode(st, sae, positions=LAST3, part_rows=4)
    assert res[0].status == "resumed" and res[0].parts == n_parts - done
    assert _parts(killed) == _parts(tmp_path / "whole")
    for query in (
        "SELECT * FROM feature_files ORDER BY first_row",
        "SELECT * FROM feature_selections",
    ):
        assert st.sql(query).fetchall() == whole.sql(query).fetchall()
    for rel in _parts(killed):
        assert pq.read_table(killed / rel).num_rows >= 0
    got = q.run_named(st, "feature_density", run=RUN, sae="l1_std").df()
    want = q.run_named(whole, "feature_density", run=RUN, sae="l1_std").df()
    assert got.equals(want)


def test_a_run_that_gains_rows_is_refused_until_encoded_again(tmp_path, llama_dir, sae_dir):
    from actstore.store import writer

    d = job_dict(tmp_path, llama_dir, hooks=[HOOK], batch_size=2, commit_interval=0.0)
    calls = [0]
    commit = writer.RunWriter._commit

    def stop_at_third(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return commit(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer.RunWriter, "_commit", stop_at_third)
        with pytest.raises(KeyboardInterrupt):
            run_job(IngestJob.from_dict(d), quiet=True)
    st = actstore.open(d["store"])
    part = st.array_info(RUN, HOOK)["n_rows"]
    encode(st, str(sae_dir), positions=LAST3)
    run_job(IngestJob.from_dict(d), quiet=True)  # the ingest resumes: the run gains rows
    st = actstore.open(d["store"])
    assert st.array_info(RUN, HOOK)["n_rows"] > part
    with pytest.raises(NotFoundError, match=r"interrupted\); finish it with .*--positions"):
        q.run_named(st, "feature_density", run=RUN, sae="l1_std")
    res = encode(st, str(sae_dir), positions=LAST3)
    rows = _selected(st, lambda t: t["pos_from_end"].to_numpy() >= -3)
    assert res[0].status == "resumed" and res[0].n_selected == rows.size
    got_rows, feats, vals = _features(st, "l1_std")
    dense = np.zeros((st.array_info(RUN, HOOK)["n_rows"], 48), np.float32)
    dense[got_rows, feats] = vals
    np.testing.assert_allclose(dense[rows], _reference(st, sae_dir, rows), rtol=1e-6, atol=1e-6)
    dens = q.run_named(st, "feature_density", run=RUN, sae="l1_std").df()
    assert (dens["n_tokens"] == rows.size).all()
