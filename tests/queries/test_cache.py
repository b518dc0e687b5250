"""The native feature cache: built when asked, never stale, bounded, droppable."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import actstore
import actstore.queries as q
from actstore.queries import cache as _cache
from actstore.store import objects
from tests.queries.conftest import Truth

F = 8


def append(
    st: actstore.Store, rid: int, sae: int, first_prompt: int, n_prompts: int, rng
) -> np.ndarray:
    """Append prompts of 4 stored tokens each with random features; return their dense values."""
    n = 4 * n_prompts
    dense = np.where(rng.random((n, F)) < 0.3, rng.exponential(1.0, (n, F)), 0).astype(np.float32)
    r, f = np.nonzero(dense)
    with st.writer(rid) as w:
        w.append(
            arrays={},
            tokens={
                "prompt_idx": np.repeat(np.arange(first_prompt, first_prompt + n_prompts), 4),
                "position": np.tile(np.arange(4), n_prompts),
                "row": np.arange(n),
            },
            first_prompt=first_prompt,
            n_prompts=n_prompts,
            features={sae: (r, f, dense[r, f])},
        )
    return dense


@pytest.fixture
def growing(tmp_path):
    st = actstore.open(tmp_path / "s", create=True)
    ps = objects.add_prompt_set(
        st, name="p", table=pa.table({"text": [f"t{i}" for i in range(10)]})
    )
    sae = objects.add_sae(st, name="sae", hook="h", d_in=4, d_sae=F)
    rid = objects.create_run(st, name="r", hooks={}, prompt_set_id=ps)
    return st, rid, sae


def density(st, cache) -> np.ndarray:
    df = q.run_named(st, "feature_density", run="r", sae="sae", cache=cache).df()
    return df["mean"].to_numpy()


def test_cache_is_appended_when_parts_are_committed(growing):
    st, rid, sae = growing
    rng = np.random.default_rng(0)
    first = append(st, rid, sae, 0, 3, rng)
    np.testing.assert_allclose(density(st, True), first.mean(0), rtol=1e-6)
    assert list(q.feature_cache(st).tables()) == [(rid, sae)]
    second = append(st, rid, sae, 3, 5, rng)  # a new part, committed after the cache was built
    both = np.concatenate([first, second])
    np.testing.assert_allclose(density(st, True), both.mean(0), rtol=1e-6)
    np.testing.assert_allclose(density(st, False), both.mean(0), rtol=1e-6)
    entry = q.feature_cache(st).entries[(rid, sae)]
    assert entry.n_rows == np.count_nonzero(both) and len(entry.parts) == 2


def test_auto_builds_on_the_second_query_and_clear_drops(growing):
    st, rid, sae = growing
    append(st, rid, sae, 0, 2, np.random.default_rng(1))
    a = density(st, "auto")
    assert q.feature_cache(st).tables() == {}
    b = density(st, "auto")
    assert q.feature_cache(st).tables() == {(rid, sae): f"_actstore_fc_r{rid}_s{sae}"}
    np.testing.assert_array_equal(a, b)
    q.clear_feature_cache(st)
    assert q.feature_cache(st).tables() == {}
    tables = st.sql("SELECT table_name FROM duckdb_tables() WHERE table_name LIKE '_actstore%'")
    assert len(tables) == 0


def test_over_budget_reads_parquet(growing, monkeypatch):
    st, rid, sae = growing
    dense = append(st, rid, sae, 0, 2, np.random.default_rng(2))
    q.feature_cache(st).budget = 10  # bytes: nothing fits
    np.testing.assert_allclose(density(st, True), dense.mean(0), rtol=1e-6)
    assert q.feature_cache(st).tables() == {}


def test_least_recently_used_table_makes_room(truth: Truth):
    cache = q.feature_cache(truth.store)
    with truth.store.session.connection() as con:
        cache.clear(con)
        old_budget = cache.budget
        try:
            root = str(truth.store.root)
            sizes = dict(
                con.execute(
                    "SELECT run_id, sum(n_nonzero) FROM cat.main.feature_files GROUP BY run_id"
                ).fetchall()
            )
            cache.budget = int(max(sizes.values())) * _cache.BYTES_PER_ROW  # room for one
            a = cache.source(con, root, 1, 1, policy=True)
            b = cache.source(con, root, 2, 1, policy=True)
            assert a and b and list(cache.tables()) == [(2, 1)]
        finally:
            cache.budget = old_budget
            cache.clear(con)
