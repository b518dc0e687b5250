"""A byte flipped anywhere in a store is detected or harmless: never a silently wrong number.

One byte at a time is flipped in every kind of file (array shards of the raw and
the zstd layout, ``zarr.json``, the marker, the catalog, the Parquet feature
parts), the store is opened afresh, and the same reads are made as on the
pristine store: each either raises an :class:`~actstore.errors.ActstoreError`
or returns exactly the pristine answer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import actstore
import actstore.queries as q
from actstore.errors import ActstoreError
from actstore.store import access, part_check
from tests.queries.conftest import HOOK16, HOOK32, build_store

FLIPS_PER_FILE = {
    "shard16": 8,
    "shard32": 6,
    "zarr.json": 6,
    "marker": 3,
    "catalog": 12,
    "part": 10,
}


def reads(root: Path) -> dict[str, object]:
    """Every answer a flip could corrupt (an ActstoreError counts as detected)."""
    part_check.clear_cache()
    access.clear_cache()
    out: dict[str, object] = {}

    def attempt(name, fn):
        try:
            out[name] = fn()
        except ActstoreError as e:
            out[name] = ("error", type(e).__name__)

    st = None
    try:
        st = actstore.open(root, read_only=True)
    except ActstoreError as e:
        return {"open": ("error", type(e).__name__)}
    attempt("acts16", lambda: st.acts("base/p", HOOK16).numpy().tobytes())
    attempt("acts16b", lambda: st.acts("ft/p", HOOK16).numpy().tobytes())
    attempt("acts32", lambda: st.acts("f32/p", HOOK32).numpy().tobytes())
    attempt(
        "trigger_diff",
        lambda: (
            q.run_named(
                st, "trigger_diff", run="base/p", sae="sae", group_a="triggered", cache=False
            )
            .df()
            .sort_values("feature")[["feature", "mean_a", "mean_b", "t", "n_a", "n_b"]]
            .to_numpy(dtype=float)
        ),
    )
    attempt(
        "features",
        lambda: np.array(st.sql("SELECT sum(value), count(*) FROM features").fetchall()[0]),
    )
    attempt(
        "tokens",
        lambda: (
            st.sql("SELECT * FROM labeled_tokens ORDER BY run_id, prompt_idx, position")
            .arrow()
            .to_pylist()
        ),
    )
    attempt("runs", lambda: st.sql("SELECT name, status FROM runs ORDER BY run_id").fetchall())
    st.close()
    return out


def same(a: object, b: object) -> bool:
    """Equal, up to the float noise of a parallel aggregate's summation order."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.allclose(a, b, rtol=1e-9, atol=0, equal_nan=True)
    return a == b


def targets(root: Path) -> dict[str, list[Path]]:
    st = actstore.open(root, read_only=True)
    a16 = root / st.array_info("base/p", HOOK16)["path"]
    a32 = root / st.array_info("f32/p", HOOK32)["path"]
    parts = [root / r[0] for r in st.sql("SELECT path FROM feature_files ORDER BY path").fetchall()]
    st.close()
    return {
        "shard16": [a16 / "c" / "0" / "0"],
        "shard32": [a32 / "c" / "0" / "0"],
        "zarr.json": [a16 / "zarr.json", a32 / "zarr.json"],
        "marker": [root / "actstore.json"],
        "catalog": [root / "catalog.duckdb"],
        "part": parts,
    }


def test_no_flip_gives_a_silently_wrong_answer(tmp_path):
    pristine = tmp_path / "pristine"
    build_store(pristine, seed=11)
    want = reads(pristine)
    assert not any(isinstance(v, tuple) and v[0] == "error" for v in want.values())
    rng = np.random.default_rng(0)
    work = tmp_path / "work"
    shutil.copytree(pristine, work)
    silent, detected, harmless = [], 0, 0
    for kind, files in targets(work).items():
        for i in range(FLIPS_PER_FILE[kind]):
            path = files[i % len(files)]
            data = path.read_bytes()
            at = int(rng.integers(0, len(data)))
            bit = 1 << int(rng.integers(0, 8))
            path.write_bytes(data[:at] + bytes([data[at] ^ bit]) + data[at + 1 :])
            try:
                got = reads(work)
            finally:
                path.write_bytes(data)  # restore for the next flip
            wrong = [
                k
                for k, v in got.items()
                if not (isinstance(v, tuple) and v[0] == "error") and not same(v, want.get(k))
            ]
            if wrong:
                silent.append(f"{kind} {path.name} byte {at} bit {bit}: {wrong}")
            elif any(isinstance(v, tuple) for v in got.values()):
                detected += 1
            else:
                harmless += 1
    n = sum(FLIPS_PER_FILE.values())
    print(f"{n} flips: {detected} detected, {harmless} harmless, {len(silent)} silently wrong")
    assert n >= 40 and detected + harmless + len(silent) == n
    assert silent == [], silent
    assert detected > n // 3  # most flips land in data that is read: they are caught
