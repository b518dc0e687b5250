"""Sparse feature parts: exact round trips, zeros dropped, SQL visibility."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actstore.store import features
from actstore.store.part_check import checksum


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(0, 200),
    seed=st.integers(0, 2**16),
)
def test_part_roundtrip(tmp_path_factory, n, seed):
    root = tmp_path_factory.mktemp("f")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 1000, n)
    feats = rng.integers(0, 5000, n)
    # unique (row, feature) pairs, as an SAE produces
    _, keep = np.unique(rows * 10000 + feats, return_index=True)
    rows, feats = rows[keep], feats[keep]
    vals = rng.standard_normal(rows.size).astype(np.float32)
    vals[::5] = 0
    rel, n_bytes, crc = features.write_part(
        root, run_id=3, sae_id=2, first_row=0, rows=rows, features=feats, values=vals
    )
    t = features.read_part(root, rel)
    nz = vals != 0
    want = sorted(zip(rows[nz].tolist(), feats[nz].tolist(), vals[nz].tolist(), strict=True))
    got = list(
        zip(t["row"].to_pylist(), t["feature"].to_pylist(), t["value"].to_pylist(), strict=True)
    )
    assert got == want
    assert set(t["run_id"].to_pylist()) <= {3} and set(t["sae_id"].to_pylist()) <= {2}
    assert not list(root.rglob("*.tmp"))
    data = (root / rel).read_bytes()
    assert (n_bytes, crc) == (len(data), checksum(data))


def test_features_visible_in_sql_only_once_committed(filled_store):
    st_, _ = filled_store
    assert st_.sql("SELECT count(*) FROM features").fetchall() == [(0,)]
    # a part on disk that no commit lists is invisible
    features.write_part(
        st_.root,
        run_id=1,
        sae_id=1,
        first_row=0,
        rows=np.array([0]),
        features=np.array([1]),
        values=np.array([1.0]),
    )
    assert st_.sql("SELECT count(*) FROM features").fetchall() == [(0,)]
    assert st_.recover() == ["features/run000001/sae000001/part-000000000000-b000000.parquet"]
