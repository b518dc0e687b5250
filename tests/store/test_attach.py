"""Catalog files attached to one DuckDB per process (:mod:`actstore.store.attach`).

Reference: a plain ``duckdb.connect`` of the file, in this process or another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import duckdb
import pytest

from actstore.store import attach
from actstore.store.catalog import Catalog


def _cat(tmp_path, name="c"):
    cat = Catalog(tmp_path / f"{name}.duckdb")
    cat.create()
    return cat


def _plain(path, sql):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_write_is_checkpointed_and_the_file_released(tmp_path):
    cat = _cat(tmp_path)
    with cat.write() as con:
        con.execute("INSERT INTO meta VALUES ('k', 'v')")
    assert not (tmp_path / "c.duckdb.wal").exists()
    code = (
        "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
        "c.execute(\"INSERT INTO meta VALUES ('other', 'process')\"); c.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(cat.path)], check=True, timeout=60)
    assert sorted(_plain(cat.path, "SELECT key FROM meta")) == [("k",), ("other",)]
    assert cat.read("SELECT count(*) AS n FROM meta").to_pylist() == [{"n": 2}]


def test_nested_operations_get_a_duckdb_of_their_own(tmp_path):
    a, b = _cat(tmp_path, "a"), _cat(tmp_path, "b")
    with a.write() as con:
        con.execute("INSERT INTO meta VALUES ('a', '1')")
        with b.write() as con_b:  # a second file while the first is attached
            con_b.execute("INSERT INTO meta VALUES ('b', '2')")
        assert b.read("SELECT key FROM meta").to_pylist() == [{"key": "b"}]
    assert _plain(a.path, "SELECT key FROM meta") == [("a",)]
    assert _plain(b.path, "SELECT key FROM meta") == [("b",)]


def test_a_failed_transaction_rolls_back_and_the_next_one_works(tmp_path):
    cat = _cat(tmp_path)
    with pytest.raises(duckdb.Error), cat.write() as con:
        con.execute("INSERT INTO meta VALUES ('gone', 'x')")
        con.execute("SELECT * FROM no_such_table")
    with cat.write() as con:
        con.execute("INSERT INTO meta VALUES ('kept', 'y')")
    assert _plain(cat.path, "SELECT key FROM meta") == [("kept",)]


def test_threads_on_different_catalogs_do_not_mix(tmp_path):
    cats = [_cat(tmp_path, f"t{i}") for i in range(4)]
    errors = []

    def work(i, cat):
        try:
            for j in range(15):
                with cat.write() as con:
                    con.execute("INSERT INTO meta VALUES (?, ?)", [f"t{i}", str(j)])
                got = cat.read("SELECT count(*) AS n, min(key) AS k FROM meta").to_pylist()
                assert got == [{"n": j + 1, "k": f"t{i}"}]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(cats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, cat in enumerate(cats):
        assert _plain(cat.path, "SELECT DISTINCT key FROM meta") == [(f"t{i}",)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_duckdb(tmp_path):
    cat = _cat(tmp_path)
    cat.read("SELECT 1 AS one")  # the parent's DuckDB exists
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without running the parent's clean-up
        code = 1
        try:
            with cat.write() as con:
                con.execute("INSERT INTO meta VALUES ('child', 'x')")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cat.read("SELECT key FROM meta").to_pylist() == [{"key": "child"}]
    assert attach._shared is not None and attach._shared[0] == os.getpid()
