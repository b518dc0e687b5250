"""docs/FORMAT.md stands alone: every SQL and Python block runs against a demo store.

The SQL blocks run in plain DuckDB on the catalog (no actstore session), in order,
in one connection; the Python blocks with duckdb, numpy, zarr, numcodecs and
xarray. What they compute is then compared with actstore's own answers (its session
views, ``project()``, ``Store.acts``, ``feature_density``), and the catalog's
columns with the ones the page documents.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest

import actstore
import actstore.queries as q
from actstore.demo.run import MIDDLE, SAE_NAME
from actstore.store.catalog import TABLES

DOC = Path(__file__).parents[2] / "docs" / "FORMAT.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(DOC.read_text()) if kind == lang]


def _run_sql(con: duckdb.DuckDBPyConnection, root: Path) -> list[list[tuple]]:
    """Run every SQL block (``STORE`` -> the store's path); the last result of each."""
    out = []
    for block in _blocks("sql"):
        out.append(con.execute(block.replace("STORE", str(root))).fetchall())
    return out


@pytest.fixture(scope="module")
def plain(demo) -> tuple[actstore.Store, duckdb.DuckDBPyConnection, list[list[tuple]]]:
    _, st = demo
    con = duckdb.connect(str(st.root / "catalog.duckdb"), read_only=True)
    results = _run_sql(con, st.root)
    yield st, con, results
    con.close()


def test_every_sql_block_runs_and_returns_rows(plain):
    _, _, results = plain
    assert len(results) == len(_blocks("sql")) >= 7
    for i, rows in enumerate(results):
        assert rows, f"SQL block {i} of FORMAT.md returned no rows"


def test_the_documented_views_equal_the_session_views(plain):
    st, con, _ = plain
    for view, key in (
        ("labeled_tokens", "run_id, prompt_idx, position"),
        ("labeled_generations", "run_id, prompt_idx, sample_idx"),
        ("feature_acts", 'run_id, sae_id, "row", feature'),
    ):
        doc = con.sql(f"SELECT * FROM {view} ORDER BY {key}").to_arrow_table()
        # the session's labeled_generations adds pivoted score columns after the documented ones
        cols = ", ".join('"' + c + '"' for c in doc.column_names)
        ours = st.sql(f"SELECT {cols} FROM {view} ORDER BY {key}").arrow()
        extra = set(st.sql(f"SELECT * FROM {view} LIMIT 0").arrow().column_names)
        extra -= set(doc.column_names)
        assert all(c.startswith(("score_", "flag_")) for c in extra), (view, extra)
        assert doc.num_rows == ours.num_rows > 0
        assert doc.column_names == ours.column_names
        assert doc.equals(ours.cast(doc.schema)), view
    gen = st.sql("SELECT text, completion FROM labeled_generations LIMIT 5").fetchall()
    assert all(t.startswith(" ") and c == t.strip() for t, c in gen)


def test_the_sparse_snippet_counts_zeros_as_feature_density_does(plain):
    st, con, _ = plain
    block = next(b for b in _blocks("sql") if "parts_sql" in b)
    got = con.execute(block.replace("STORE", str(st.root))).fetchall()
    dens = q.run_named(st, "feature_density", run="backdoored/pairs", sae=SAE_NAME).df()
    dens = dens.set_index("feature")
    for feature, n_fired, mean in got:
        assert n_fired == dens.loc[feature, "n_fired"]
        assert mean == pytest.approx(dens.loc[feature, "mean"], rel=1e-9)


def test_the_sparse_snippet_survives_no_parts_and_extra_columns(plain, tmp_path):
    st, _, _ = plain
    block = next(b for b in _blocks("sql") if "parts_sql" in b).replace("STORE", str(st.root))
    # a run without SAE features: no rows, no error
    con = duckdb.connect(str(st.root / "catalog.duckdb"), read_only=True)
    assert con.execute(block.replace("backdoored/pairs", "backdoored/train")).fetchall() == []
    con.close()
    # a catalog whose feature_files has one more column (an additive change) still works
    cat = tmp_path / "catalog.duckdb"
    shutil.copy(st.root / "catalog.duckdb", cat)
    with duckdb.connect(str(cat)) as w:
        w.execute("ALTER TABLE feature_files ADD COLUMN checksum VARCHAR DEFAULT 'x'")
    with duckdb.connect(str(cat), read_only=True) as con2:
        again = _run_sql(con2, st.root)
    with duckdb.connect(str(st.root / "catalog.duckdb"), read_only=True) as con3:
        assert again == _run_sql(con3, st.root)


def test_every_python_block_runs_and_agrees_with_actstore(demo):
    _, st = demo
    ns: dict = {}
    for block in _blocks("python"):
        exec(compile(block.replace("STORE", str(st.root)), str(DOC), "exec"), ns)
    acts = st.acts("backdoored/pairs", MIDDLE)
    np.testing.assert_array_equal(ns["x"], acts.numpy())
    np.testing.assert_array_equal(ns["xa"].values, acts.numpy())
    direction = f"demo_backdoored/mean_diff/{MIDDLE}"
    via_sql = st.sql(
        'SELECT project(run, ?, "row", ?) AS p FROM labeled_tokens '
        'WHERE run = ? AND "row" IS NOT NULL ORDER BY "row"',
        [MIDDLE, direction, "backdoored/pairs"],
    ).df()["p"]
    np.testing.assert_allclose(ns["proj"], via_sql.to_numpy(), rtol=1e-5, atol=1e-5)
    assert ns["shard0"].shape[0] % ns["chunk_rows"] == 0  # whole (padded) chunks


def _documented_columns() -> dict[str, set[str]]:
    text = DOC.read_text()
    start = text.index("| table | column | type | meaning |")
    cols: dict[str, set[str]] = {}
    table = ""
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table = cells[0] or table
        cols.setdefault(table, set()).update(
            c.strip() for c in cells[1].split(",") if re.fullmatch(r"\s*\w+\s*", c)
        )
    return cols


def test_every_catalog_column_is_documented(plain):
    _, con, _ = plain
    documented = _documented_columns()
    # tables made by the first command that needs them (not in the schema of a new store)
    lazy = {"hook_stats", "attention", "feature_selections"}
    assert set(documented) - lazy == set(TABLES)
    present = {
        r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    for table in [*TABLES, *sorted(lazy & present)]:
        actual = {
            r[0]
            for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
            ).fetchall()
        }
        if table == "prompts":  # label columns are the prompt files' own
            actual &= {"prompt_set_id", "prompt_idx", "text"}
        assert actual <= documented[table], (table, actual - documented[table])
        assert documented[table] <= actual, (table, documented[table] - actual)
