"""Sparse feature parts carry a checksum in the catalog and are verified before use."""

from __future__ import annotations

import shutil
from pathlib import Path

import google_crc32c
import pyarrow.parquet as pq
import pytest

import actstore
import actstore.queries as q
from actstore.errors import CorruptChunkError
from actstore.store import part_check
from tests.queries.conftest import build_store

RUN, OTHER = "base/p", "ft/p"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parts") / "store"
    build_store(root)
    return root


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> actstore.Store:
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    part_check.clear_cache()
    return actstore.open(root)


def parts(st: actstore.Store, run: str) -> list[dict]:
    return (
        st.sql(
            "SELECT f.* FROM feature_files f JOIN runs r USING (run_id) WHERE r.name = ? "
            "ORDER BY first_row",
            [run],
        )
        .arrow()
        .to_pylist()
    )


READS = {
    "trigger_diff": lambda st: q.run_named(
        st, "trigger_diff", run=RUN, sae="sae", group_a="triggered", cache=False
    ).df(),
    "trigger_diff cached": lambda st: q.run_named(
        st, "trigger_diff", run=RUN, sae="sae", group_a="triggered", cache=True
    ).df(),
    "feature_density": lambda st: q.run_named(st, "feature_density", run=RUN, sae="sae").df(),
    "top_activations": lambda st: q.run_named(st, "top_activations", sae="sae", feature=17).df(),
    "top_activations of the run": lambda st: q.run_named(
        st, "top_activations", sae="sae", feature=17, run=RUN
    ).df(),
    "features view": lambda st: st.sql("SELECT sum(value) FROM features").fetchall(),
    "feature_acts view": lambda st: st.sql("SELECT count(*) FROM feature_acts").fetchall(),
    "macro": lambda st: st.sql(f"SELECT * FROM feature_density('{RUN}', 'sae')").fetchall(),
}


def test_each_part_records_its_size_and_crc32c(store):
    for run in (RUN, OTHER):
        for p in parts(store, run):
            data = (Path(store.root) / p["path"]).read_bytes()
            assert p["n_bytes"] == len(data)
            assert p["crc32c"] == int.from_bytes(google_crc32c.Checksum(data).digest(), "big")
            assert pq.read_table(Path(store.root) / p["path"]).num_rows == p["n_nonzero"]


@pytest.mark.parametrize("where", ["start", "middle", "footer", "end"])
def test_a_flipped_byte_is_an_error_naming_run_sae_and_part(store, pristine, where):
    part = parts(store, RUN)[1]
    path = Path(store.root) / part["path"]
    data = bytearray(path.read_bytes())
    at = {"start": 0, "middle": len(data) // 2, "footer": len(data) - 12, "end": len(data) - 1}
    data[at[where]] ^= 0x40
    path.write_bytes(bytes(data))
    for name, read in READS.items():
        with pytest.raises(CorruptChunkError) as e:
            read(store)
        msg = str(e.value)
        assert part["path"] in msg and f"run {RUN!r}" in msg and "SAE 'sae'" in msg, name
        assert "crc32c recorded" in msg and "\n" not in msg
    # reads that need no damaged part still run, and give the undamaged answer
    assert store.sql("SELECT count(*) FROM runs").fetchall() == [(3,)]
    got = q.run_named(store, "feature_density", run=OTHER, sae="sae", cache=False).df()
    want = q.run_named(
        actstore.open(pristine, read_only=True), "feature_density", run=OTHER, sae="sae"
    ).df()
    assert got.equals(want)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_part_is_an_error(store, damage):
    part = parts(store, RUN)[0]
    path = Path(store.root) / part["path"]
    if damage == "missing":
        path.unlink()
        why = "the file is missing"
    else:
        path.write_bytes(path.read_bytes()[: part["n_bytes"] // 2])
        why = f"{part['n_bytes'] // 2} bytes, {part['n_bytes']} were committed"
    fresh = actstore.open(store.root, read_only=True)
    assert fresh.sql("SELECT 1 AS one").fetchall() == [(1,)]
    for name, read in READS.items():
        with pytest.raises(CorruptChunkError, match=why):
            read(fresh)
        assert name


def test_a_part_is_verified_once_per_process(store, monkeypatch):
    calls: list[int] = []
    real = part_check.checksum
    monkeypatch.setattr(part_check, "checksum", lambda data: calls.append(1) or real(data))
    READS["trigger_diff"](store)
    first = len(calls)
    assert first == len(parts(store, RUN))
    for read in READS.values():
        read(store)
    # the warm queries verified only the parts of the other run (the views list every part)
    assert len(calls) == first + len(parts(store, OTHER))
