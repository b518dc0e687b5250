"""The Store API: open/create, sql, acts, runs, hooks, info, and its errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actstore
from actstore.errors import (
    FormatVersionError,
    HookNotFoundError,
    InputError,
    NotAStoreError,
    ReadOnlyError,
    RunNotFoundError,
)
from actstore.store import objects

from .conftest import HOOKS


def test_open_creates_and_reopens(tmp_path):
    st_ = actstore.open(tmp_path / "s", create=True)
    assert (tmp_path / "s" / "actstore.json").exists()
    again = actstore.open(tmp_path / "s")
    assert again.info()["format_version"] == 1
    assert st_.sql("SELECT value FROM meta WHERE key = 'format_version'").fetchall() == [("1",)]


def test_not_a_store_errors(tmp_path):
    with pytest.raises(NotAStoreError, match=r"is not an actstore store .* actstore.open"):
        actstore.open(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotAStoreError, match="is a file"):
        actstore.open(f)
    with pytest.raises(NotAStoreError, match="is a file"):
        actstore.open(f, create=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(NotAStoreError, match="non-empty directory"):
        actstore.open(tmp_path / "full", create=True)


def test_newer_format_is_refused(tmp_path):
    actstore.open(tmp_path / "s", create=True)
    marker = tmp_path / "s" / "actstore.json"
    body = json.loads(marker.read_text())
    body["format_version"] = 99
    marker.write_text(json.dumps(body))
    with pytest.raises(FormatVersionError, match=r"uses format v99.*upgrade actstore"):
        actstore.open(tmp_path / "s")


def test_sql_results_convert(filled_store):
    st_, _ = filled_store
    r = st_.sql("SELECT prompt_idx, triggered, reward FROM prompts ORDER BY prompt_idx")
    assert r.columns == ["prompt_idx", "triggered", "reward"]
    assert r.fetchall()[:2] == [(0, True, 0.0), (1, False, 0.1)]
    assert r.df()["reward"].sum() == pytest.approx(1.5)
    assert r.pl()["triggered"].sum() == 3
    assert r.arrow().num_rows == 6
    assert st_.sql("SELECT ? + $1 AS x", [2]).fetchall() == [(4,)]


def test_labels_are_typed_columns(filled_store):
    st_, _ = filled_store
    types = dict(st_.sql("SELECT column_name, column_type FROM (DESCRIBE prompts)").fetchall())
    assert types["triggered"] == "BOOLEAN" and types["reward"] == "DOUBLE"
    n = st_.sql("SELECT count(*) FROM labeled_tokens WHERE triggered AND reward > 0.1").fetchall()
    assert n[0][0] > 0


def test_acts_where_matches_reference(filled_store):
    st_, expected = filled_store
    hook = "blocks.1.hook_mlp_out"
    a = st_.acts("run1", hook, where="triggered AND position_role = 'last'")
    toks = st_.sql(
        "SELECT t.row FROM tokens t JOIN prompts p USING (prompt_idx) "
        "WHERE p.triggered AND t.position_role = 'last' ORDER BY t.row"
    ).numpy()["row"]
    np.testing.assert_array_equal(a.rows, toks)
    np.testing.assert_array_equal(a.numpy(), expected[hook][toks])
    assert a.meta.column("triggered").to_pylist() == [True] * len(toks)
    df = a.df()
    assert list(df.columns[-8:]) == [f"d{i}" for i in range(8)]
    np.testing.assert_array_equal(df[[f"d{i}" for i in range(8)]].to_numpy(), expected[hook][toks])
    assert a.pl().height == len(toks)
    assert a.torch().shape == (len(toks), 8)


def test_acts_rows_and_params(filled_store):
    st_, expected = filled_store
    h = "blocks.0.hook_resid_post"
    a = st_.acts("run1", h, rows=[5, 0, 5])
    np.testing.assert_array_equal(a.numpy(), expected[h][[5, 0, 5]])
    assert a.meta.column("row").to_pylist() == [5, 0, 5]
    b = st_.acts("run1", h, where="prompt_idx = $p", params={"p": 2})
    assert set(b.meta.column("prompt_idx").to_pylist()) == {2}
    blocks = list(st_.iter_acts("run1", h, block_rows=4))
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x in blocks]), expected[h])
    with pytest.raises(InputError, match="rows outside 0-"):
        st_.acts("run1", h, rows=[10_000])


def test_missing_run_and_hook_errors(filled_store):
    st_, _ = filled_store
    with pytest.raises(RunNotFoundError, match=r"run 'nope' not in store .*runs: \['run1'\]"):
        st_.acts("nope", "x")
    with pytest.raises(
        HookNotFoundError, match=r"hook 'blocks.9.hook_resid_post' not in run 'run1'; it has \["
    ):
        st_.acts("run1", "blocks.9.hook_resid_post")
    with pytest.raises(KeyError):  # also the builtin
        st_.hooks("nope")


def test_runs_hooks_info(filled_store):
    st_, expected = filled_store
    runs = st_.runs().arrow().to_pylist()
    assert runs[0]["name"] == "run1" and runs[0]["n_rows"] == len(
        expected["blocks.0.hook_resid_post"]
    )
    assert st_.hooks("run1") == list(HOOKS)
    info = st_.info()
    assert info["prompt_sets"][0]["label_columns"] == ["triggered", "reward"]
    assert info["bytes"] > 0


def test_read_only_store_refuses_writes(filled_store):
    st_, _ = filled_store
    ro = actstore.open(st_.root, read_only=True)
    with pytest.raises(ReadOnlyError, match="opened read-only"):
        ro.writer("run1")


def test_prompt_set_errors(empty_store):
    with pytest.raises(InputError, match="no text column 'prompt'"):
        objects.add_prompt_set(
            empty_store, name="x", table=pa.table({"q": ["a"]}), text_column="prompt"
        )
    with pytest.raises(InputError, match="is empty"):
        objects.add_prompt_set(
            empty_store, name="x", table=pa.table({"text": pa.array([], pa.string())})
        )
    with pytest.raises(InputError, match=r"clash with built-in columns"):
        objects.add_prompt_set(
            empty_store, name="x", table=pa.table({"text": ["a"], "position": [1]})
        )
    objects.add_prompt_set(empty_store, name="a", table=pa.table({"text": ["a"], "score": [1.5]}))
    with pytest.raises(InputError, match="label 'score' is VARCHAR here but DOUBLE"):
        objects.add_prompt_set(
            empty_store, name="b", table=pa.table({"text": ["a"], "score": ["hi"]})
        )
    with pytest.raises(InputError, match="already in the store with other contents"):
        objects.add_prompt_set(
            empty_store, name="a", table=pa.table({"text": ["b"], "score": [1.5]})
        )
    assert (
        objects.add_prompt_set(
            empty_store, name="a", table=pa.table({"text": ["a"], "score": [1.5]})
        )
        == 1
    )


labels = st.one_of(
    st.lists(st.booleans(), min_size=1, max_size=1),
    st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=1),
    st.lists(st.floats(allow_nan=False, width=64), min_size=1, max_size=1),
    st.lists(st.text(max_size=20), min_size=1, max_size=1),
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8),
    kinds=st.lists(st.sampled_from(["bool", "int", "float", "str"]), max_size=4),
    data=st.data(),
)
def test_catalog_rows_roundtrip(tmp_path_factory, texts, kinds, data):
    store = actstore.open(tmp_path_factory.mktemp("c") / "s", create=True)
    strategies = {
        "bool": st.booleans(),
        "int": st.integers(-(2**40), 2**40),
        "float": st.floats(allow_nan=False, allow_infinity=False),
        "str": st.text(max_size=20),
    }
    cols = {"text": texts}
    for i, k in enumerate(kinds):
        cols[f"label_{i}_{k}"] = [data.draw(strategies[k]) for _ in texts]
    objects.add_prompt_set(store, name="p", table=pa.table(cols))
    back = store.sql(
        "SELECT * EXCLUDE (prompt_set_id, prompt_idx) FROM prompts ORDER BY prompt_idx"
    ).arrow()
    for name, values in cols.items():
        got = back.column(name).to_pylist()
        for g, v in zip(got, values, strict=True):
            assert g == v or (isinstance(v, float) and math.isclose(g, v))


KILLED_CREATE = """
import os, signal, sys
import actstore.store.store as s
s.write_marker = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed just before
import actstore
actstore.open(sys.argv[1], create=True)
"""


def test_a_store_killed_while_being_created_can_be_created_again(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-c", KILLED_CREATE, str(root)], check=False)
    assert proc.returncode == -9
    assert not root.exists()  # nothing half-made where the store goes
    leftover = list(tmp_path.glob(".s.creating-*"))
    assert len(leftover) == 1 and (leftover[0] / "catalog.duckdb").exists()
    st = actstore.open(root, create=True)
    assert st.runs().fetchall() == [] and not list(tmp_path.glob(".s.creating-*"))


def test_a_directory_an_older_killed_creation_left_is_finished(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "catalog.duckdb").write_bytes(b"half")  # catalog made, marker never written
    st = actstore.open(root, create=True)
    assert st.info()["format_version"] == 1
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "mine.txt").write_text("user data")
    with pytest.raises(actstore.errors.NotAStoreError, match="non-empty directory"):
        actstore.open(tmp_path / "t", create=True)
    assert (tmp_path / "t" / "mine.txt").read_text() == "user data"
