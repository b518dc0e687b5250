"""A missing or damaged file inside committed rows is an error naming it, never zeros;
one damaged file fails only the reads that need it, and ``actstore info`` reports it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import actstore
import actstore.queries as q
from actstore.cli import main
from actstore.errors import CorruptChunkError
from actstore.store import access, part_check
from tests.queries.conftest import HOOK16, HOOK32, build_store

RUN, OTHER, F32 = "base/p", "ft/p", "f32/p"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("damage") / "store"
    build_store(root, seed=3)
    return root


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> actstore.Store:
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    part_check.clear_cache()
    access.clear_cache()
    return actstore.open(root, read_only=True)


def array_path(st: actstore.Store, run: str, hook: str) -> Path:
    return Path(st.root) / st.array_info(run, hook)["path"]


def cli_info(st: actstore.Store) -> list[str]:
    res = CliRunner().invoke(main, ["info", str(st.root)])
    assert res.exit_code == 0, res.output
    return [line for line in res.output.splitlines() if line.startswith("DAMAGED: ")]


def test_a_sound_store_reports_no_damage(store):
    assert store.info()["damage"] == [] and cli_info(store) == []


@pytest.mark.parametrize(("run", "hook"), [(RUN, HOOK16), (F32, HOOK32)])  # mmap and zarr paths
def test_a_deleted_shard_is_an_error_not_zeros(store, pristine, run, hook):
    (array_path(store, run, hook) / "c" / "0" / "0").unlink()
    with pytest.raises(CorruptChunkError, match=r"shard file c/0/0 \(rows 0-.*\) is missing") as e:
        store.acts(run, hook)
    assert store.array_info(run, hook)["path"] in str(e.value) and "\n" not in str(e.value)
    # through SQL (an array function inside DuckDB): one line naming the array too
    with pytest.raises(actstore.errors.ActstoreError, match="shard file c/0/0") as e:
        store.sql(
            f"SELECT act_norm(run, '{hook}', \"row\") FROM labeled_tokens WHERE run = '{run}'"
        )
    assert "\n" not in str(e.value)
    # other arrays are unaffected, and equal the pristine store's
    if run == RUN:
        want = actstore.open(pristine, read_only=True).acts(OTHER, HOOK16).numpy()
        np.testing.assert_array_equal(store.acts(OTHER, HOOK16).numpy(), want)
    assert any("c/0/0" in d and "missing below" in d for d in store.info()["damage"])
    assert len(cli_info(store)) == 1


def test_a_deleted_array_directory_is_one_line(store):
    shutil.rmtree(array_path(store, RUN, HOOK16))
    with pytest.raises(CorruptChunkError, match="cannot be opened") as e:
        store.acts(RUN, HOOK16)
    assert "\n" not in str(e.value)
    assert "zarr.json is missing" in cli_info(store)[0]
    res = CliRunner().invoke(
        main, ["query", str(store.root), "feature_density", "-p", f"run={RUN}", "-p", "sae=sae"]
    )
    assert res.exit_code == 0, res.output  # features do not need the array


def test_a_truncated_part_fails_only_the_reads_that_need_it(store):
    part = store.sql(
        "SELECT path, n_bytes FROM feature_files f JOIN runs r USING (run_id) WHERE r.name = ? "
        "ORDER BY first_row LIMIT 1",
        [RUN],
    ).fetchall()[0]
    path = Path(store.root) / part[0]
    path.write_bytes(path.read_bytes()[:100])
    fresh = actstore.open(store.root, read_only=True)
    assert fresh.sql("SELECT 1 AS one").fetchall() == [(1,)]
    assert fresh.sql("SELECT count(*) FROM runs").fetchall() == [(3,)]
    assert fresh.acts(RUN, HOOK16).numpy().shape[0] > 0
    q.run_named(fresh, "feature_density", run=OTHER, sae="sae")  # another run's parts
    (line,) = cli_info(fresh)
    assert part[0] in line and f"has 100 bytes, {part[1]} were committed" in line
    res = CliRunner().invoke(
        main, ["query", str(store.root), "feature_density", "-p", f"run={RUN}", "-p", "sae=sae"]
    )
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert part[0] in res.output and "damaged" in res.output
    res = CliRunner().invoke(main, ["sql", str(store.root), "SELECT count(*) FROM features"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert part[0] in res.output
