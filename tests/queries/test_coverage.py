"""Feature queries over every run of an SAE encoded after the ingest (tests/helpers/coverage.py).

``top_activations`` across runs checks every run it covers as the single-run path
checks its run, and the SQL table macros check theirs: an interrupted encode in any
of them is refused, naming the command that finishes it. Over positions-restricted
and complete encodes they answer over the encoded rows, checked against sae_lens'
own encode of exactly those rows.
"""

from __future__ import annotations

import numpy as np
import pytest

import actstore
import actstore.queries as q
from actstore.errors import InputError, NotFoundError
from tests.helpers.coverage import CUT_ROWS, RUNS, reference, snapshot, stored_rows


def test_top_activations_across_runs_refuses_an_interrupted_encode(coverage_store):
    root = coverage_store["store"]
    st = actstore.open(root, read_only=True)
    before = snapshot(root)
    n = stored_rows(st, RUNS[1], last3=False).size
    with pytest.raises(
        NotFoundError,
        match=rf"top_activations: run 'b/pairs' has features of SAE 'cut' for {CUT_ROWS} of its "
        rf"{n} rows .*interrupted\); finish it with `actstore encode \S+ --sae cut --run b/pairs`",
    ):
        q.run_named(st, "top_activations", sae="cut", feature=0)
    with pytest.raises(NotFoundError, match=r"for \d+ of its \d+ rows"):
        q.run_named(st, "top_activations", sae="cut", feature=0, positions="position >= 0")
    assert snapshot(root) == before
    # the run whose encode is complete answers
    assert len(q.run_named(st, "top_activations", sae="cut", feature=0, run=RUNS[0]).df()) > 0


def test_top_activations_across_runs_of_a_subset_encode_is_over_the_encoded_rows(coverage_store):
    st = actstore.open(coverage_store["store"], read_only=True)
    vals, keys = [], []
    for run in RUNS:
        rows = stored_rows(st, run, last3=True)
        X = reference(st, coverage_store["sae"], run, rows)
        vals.append(X)
        keys += [(run, int(r)) for r in rows]
    X = np.concatenate(vals)
    f = int((X > 0).sum(0).argmax())
    k = 6
    order = np.lexsort((np.arange(len(keys)), -X[:, f]))[:k]
    got = q.run_named(st, "top_activations", sae="last3", feature=f, k=k).df()
    assert list(zip(got["run"], got["row"].astype(int), strict=True)) == [keys[i] for i in order]
    np.testing.assert_allclose(got["value"], X[order, f], rtol=1e-6)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM feature_density('b/pairs', 'cut')",
        "SELECT * FROM trigger_diff('b/pairs', 'cut', 'triggered')",
        "SELECT * FROM feature_reward_corr('b/pairs', 'cut', 'reward')",
        "SELECT * FROM checkpoint_diff('a/pairs', 'b/pairs', 'cut')",
        "SELECT * FROM top_activations('cut', 0)",
        "SELECT * FROM top_activations('cut', 0, run := 'b/pairs')",
    ],
)
def test_sql_macros_refuse_an_interrupted_encode(coverage_store, sql):
    st = actstore.open(coverage_store["store"], read_only=True)
    with pytest.raises(
        InputError,
        match=rf"run 'b/pairs' has features of SAE 'cut' for {CUT_ROWS} of its \d+ rows \(an "
        r"encode is in progress or was interrupted\); finish it with `actstore encode STORE "
        r"--sae cut --run b/pairs`",
    ):
        st.sql(sql).fetchall()


def test_sql_macros_over_complete_encodes_equal_run_named(coverage_store):
    st = actstore.open(coverage_store["store"], read_only=True)
    got = st.sql("SELECT * FROM feature_density('a/pairs', 'cut') ORDER BY feature").df()
    want = q.run_named(st, "feature_density", run=RUNS[0], sae="full").df()
    X = reference(st, coverage_store["sae"], RUNS[0], stored_rows(st, RUNS[0], last3=False))
    np.testing.assert_allclose(got["freq"], (X > 0).mean(0), rtol=1e-12)
    np.testing.assert_allclose(got["freq"], want.sort_values("feature")["freq"], rtol=1e-12)
    top = st.sql("SELECT * FROM top_activations('cut', 0, run := 'a/pairs', k := 3)").df()
    assert list(top["value"]) == pytest.approx(sorted(X[:, 0], reverse=True)[:3], rel=1e-6)
