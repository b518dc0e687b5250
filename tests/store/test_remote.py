"""Stores in object storage: a real S3 server on loopback (moto) and ``memory://``.

The S3 tests talk HTTP to ``moto.server`` in another process (see
``tests/helpers/s3.py``). A remote store must ingest, query and analyse exactly
like a local one: the same job ingested into ``s3://`` and into a directory gives
the same catalog rows, array bits and feature values; so do shards in S3 merged
in S3. The catalog's commit protocol (generations published with an exclusive
put, a writer lease) is checked for racing writers and readers.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import s3fs

import actstore
from actstore.analysis.contrast import contrast
from actstore.analysis.pca import pca
from actstore.errors import ConcurrentWriteError, InputError, NotAStoreError, StoreLockedError
from actstore.ingest.job import IngestJob
from actstore.ingest.merge import merge
from actstore.ingest.runner import run_job
from actstore.ingest.shards import shard_store_paths
from actstore.queries.named import run_named
from actstore.store import objects
from actstore.store.features import write_part
from actstore.store.location import Location
from actstore.store.remote import RemoteCatalog, RemoteWriteLock
from tests.ingest.test_merge import (
    SAE_HOOK,
    array_bits,
    catalog_content,
    job_dict,
    make_prompts,
    save_tiny_sae,
)

HOOK = "blocks.1.hook_resid_post"


# --- locations ------------------------------------------------------------------------


def test_location_parses_urls_and_refuses_what_it_cannot_reach(tmp_path):
    loc = Location.parse("s3://bkt/a/store/")
    assert (loc.url, loc.root, loc.is_local) == ("s3://bkt/a/store", "bkt/a/store", False)
    assert loc.path("catalog") == "bkt/a/store/catalog"
    assert Location.parse(f"file://{tmp_path}").local_path == tmp_path
    with pytest.raises(InputError, match="no fsspec filesystem for nosuch://"):
        Location.parse("nosuch://b/s")
    with pytest.raises(InputError, match="names no bucket"):
        Location.parse("s3://")
    with pytest.raises(InputError, match="apply only to fsspec URLs"):
        actstore.open(tmp_path / "s", create=True, storage_options={"anon": True})


def test_memory_store_appends_and_reads_back():
    st = actstore.open("memory://mem-bucket/store", create=True)
    ps = objects.add_prompt_set(st, name="p", table=pa.table({"text": ["a", "b", "c"]}))
    rid = objects.create_run(
        st, name="r", prompt_set_id=ps, hooks={"h": (0, 4)}, store_dtype="float32"
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    objects.add_sae(st, name="s", hook="h", d_in=4, d_sae=8)
    with st.writer(rid) as w:
        tokens = {
            "prompt_idx": np.repeat(np.arange(3), 2),
            "position": np.tile(np.arange(2), 3),
            "row": np.arange(6),
        }
        w.append(
            arrays={"h": x},
            tokens=tokens,
            first_prompt=0,
            n_prompts=3,
            features={1: (np.array([0, 5]), np.array([3, 4]), np.array([1.5, 2.5], np.float32))},
        )
    again = actstore.open("memory://mem-bucket/store", read_only=True)
    np.testing.assert_array_equal(again.acts("r", "h").numpy(), x)
    assert again.sql("SELECT count(*) FROM tokens").fetchall() == [(6,)]
    assert again.sql('SELECT "row", feature, value FROM features ORDER BY 1').fetchall() == [
        (0, 3, 1.5),
        (5, 4, 2.5),
    ]
    assert again.info()["bytes"] > 0


# --- the same job, local and in S3 ----------------------------------------------------


@pytest.fixture(scope="module")
def remote_runs(tmp_path_factory, llama_dir, s3_endpoint) -> dict[str, Any]:
    """One job ingested locally, into S3, and as three S3 shards merged in S3."""
    root = tmp_path_factory.mktemp("remote")
    make_prompts(root / "pairs.jsonl", 9, seed=0)
    make_prompts(root / "more.jsonl", 4, seed=1)
    save_tiny_sae(root / "sae", SAE_HOOK, 32)
    fs = s3fs.S3FileSystem()
    fs.mkdir("remote-runs")
    local = IngestJob.from_dict(job_dict(root, llama_dir, "local"))
    run_job(local, quiet=True)
    spec = job_dict(root, llama_dir, "unused")
    remote = IngestJob.from_dict({**spec, "store": "s3://remote-runs/whole"})
    summary = run_job(remote, quiet=True)
    sharded = IngestJob.from_dict({**spec, "store": "s3://remote-runs/sharded"})
    for i in range(3):
        run_job(sharded, shard=(i, 3), quiet=True)
    shards = shard_store_paths(sharded.store, 3)
    merged = merge("s3://remote-runs/merged", shards)
    return {
        "root": root,
        "local": local.store,
        "remote": remote.store,
        "summary": summary,
        "merged": "s3://remote-runs/merged",
        "merge_summary": merged,
        "fs": fs,
    }


def test_s3_ingest_equals_local_ingest_bit_for_bit(remote_runs):
    assert [r.status for r in remote_runs["summary"].runs] == ["ingested", "ingested"]
    assert not Path("s3:").exists() and not Path("s3:/remote-runs").exists()
    local, remote = catalog_content(remote_runs["local"]), catalog_content(remote_runs["remote"])
    for table in local:
        assert remote[table] == local[table], f"table {table} differs"
    assert len(local["features"]) > 50 and len(local["tokens"]) > 50
    a, b = array_bits(remote_runs["local"]), array_bits(remote_runs["remote"])
    assert a.keys() == b.keys() and len(a) == 10  # 5 hooks (hook_k among them) x 2 runs
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    # everything is in the bucket: marker, catalog generations, Zarr shards, Parquet parts
    files = remote_runs["fs"].find("remote-runs/whole")
    assert "remote-runs/whole/actstore.json" in files
    assert any(f.startswith("remote-runs/whole/catalog/v") for f in files)
    assert any("/arrays/run000001/" in f and "/c/" in f for f in files)
    assert any(f.endswith(".parquet") for f in files)


def test_s3_shards_merged_in_s3_equal_local_ingest(remote_runs):
    assert remote_runs["merge_summary"].complete
    local, merged = catalog_content(remote_runs["local"]), catalog_content(remote_runs["merged"])
    for table in local:
        assert merged[table] == local[table], f"table {table} differs"
    a, b = array_bits(remote_runs["local"]), array_bits(remote_runs["merged"])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_s3_store_queries_and_analyses_like_local(remote_runs):
    local = actstore.open(remote_runs["local"])
    remote = actstore.open(remote_runs["remote"], read_only=True)
    where = "position_role = 'last'"
    la, ra = (
        local.acts("main/pairs", HOOK, where=where),
        remote.acts("main/pairs", HOOK, where=where),
    )
    np.testing.assert_array_equal(la.numpy(np.float32), ra.numpy(np.float32))
    assert la.meta.to_pylist() == ra.meta.to_pylist()
    for name, args in [
        ("trigger_diff", {"run": "main/pairs", "sae": "l1", "group_a": "triggered"}),
        ("feature_density", {"run": "main/pairs", "sae": "l1"}),
    ]:
        # equal up to the order DuckDB's parallel aggregation sums in
        lq = run_named(local, name, **args).df().sort_values("feature", ignore_index=True)
        rq = run_named(remote, name, **args).df().sort_values("feature", ignore_index=True)
        assert len(lq) > 0
        cols = [c for c in lq.columns if c != "rank"]
        pd.testing.assert_frame_equal(lq[cols], rq[cols], check_exact=False, rtol=1e-9)
    # PCA and contrast through the remote reads give the same numbers
    kw = {"run": "main/pairs", "hooks": HOOK, "k": 3, "save": False}
    lp, rp = pca(local, **kw).fits[HOOK], pca(remote, **kw).fits[HOOK]
    np.testing.assert_array_equal(rp.explained_variance, lp.explained_variance)
    np.testing.assert_array_equal(rp.components, lp.components)
    kw = {"run": "main/pairs", "hooks": HOOK, "group": "triggered", "n_random": 20, "save": False}
    lc, rc = contrast(local, **kw).layers[0], contrast(remote, **kw).layers[0]
    np.testing.assert_array_equal(lc.directions["mean_diff"], rc.directions["mean_diff"])
    assert lc.auroc == rc.auroc
    # and results are stored back into the remote catalog with provenance
    writable = actstore.open(remote_runs["remote"])
    res = pca(writable, run="main/pairs", hooks=HOOK, k=2, name="pca_remote")
    assert res.analysis_id is not None
    row = actstore.open(remote_runs["remote"]).sql(
        "SELECT kind, provenance->>'store' AS store FROM analyses WHERE name = 'pca_remote'"
    )
    assert row.fetchall() == [("pca", remote_runs["remote"])]
    # a stored direction projected inside SQL reads the remote array rows
    for st in (actstore.open(remote_runs["local"]), writable):
        contrast(st, **{**kw, "methods": ["mean_diff"], "n_random": 5, "save": True}, name="t")
    q = (
        f"SELECT row, project(run, '{HOOK}', row, 't/mean_diff/{HOOK}') AS p FROM labeled_tokens "
        "WHERE run = 'main/pairs' AND position_role = 'last' ORDER BY row"
    )
    got = actstore.open(remote_runs["remote"]).sql(q).fetchall()
    assert len(got) == 9 and got == local.sql(q).fetchall()


def test_dask_pca_on_s3_store_with_worker_processes(remote_runs):
    from actstore.analysis import dask as adask

    st = actstore.open(remote_runs["remote"], read_only=True)
    kw = {"run": "main/pairs", "hooks": HOOK, "k": 3, "save": False}
    local = pca(st, **kw).fits[HOOK]
    with adask.local_client(n_workers=2, threads_per_worker=1) as client:
        dist = adask.pca(st, **kw, block_rows=16, client=client).fits[HOOK]
    np.testing.assert_allclose(dist.explained_variance, local.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(np.abs(dist.components @ local.components.T), np.eye(3), atol=1e-4)


def test_cli_reads_an_s3_store(remote_runs):
    from click.testing import CliRunner

    from actstore.cli import main

    res = CliRunner().invoke(main, ["sql", remote_runs["remote"], "SELECT count(*) AS n FROM runs"])
    assert res.exit_code == 0, res.output
    assert "2" in res.output
    res = CliRunner().invoke(main, ["info", remote_runs["remote"]])
    assert res.exit_code == 0 and "main/pairs" in res.output


def test_cli_analyze_on_dask_workers_reads_the_s3_store(remote_runs, tmp_path):
    import json

    from click.testing import CliRunner

    from actstore.cli import main

    out = tmp_path / "pca.json"
    base = ["analyze", remote_runs["remote"], "pca", "-p", "run=main/pairs", "-p", f"hooks={HOOK}"]
    res = CliRunner().invoke(main, [*base, "-p", "k=2", "--no-save", "--dask", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    got = [r["explained_variance"] for r in json.loads(out.read_text())]
    st = actstore.open(remote_runs["remote"])
    want = pca(st, run="main/pairs", hooks=HOOK, k=2, save=False).fits[HOOK].explained_variance
    np.testing.assert_allclose(got, want, rtol=1e-6)
    res = CliRunner().invoke(main, [*base, "-p", "x=1", "--dask", "1"])
    assert res.exit_code == 1 and "unknown parameter(s) ['x']" in res.output
    res = CliRunner().invoke(main, ["analyze", remote_runs["remote"], "reward", "--dask", "1"])
    assert res.exit_code == 1 and "run 'reward' without --dask" in res.output


# --- the commit protocol --------------------------------------------------------------


def test_open_refuses_a_prefix_holding_other_objects(s3_bucket):
    s3fs.S3FileSystem().pipe(f"{s3_bucket[5:]}/data/x.bin", b"x")
    with pytest.raises(NotAStoreError, match="holds objects but is not a store"):
        actstore.open(f"{s3_bucket}/data", create=True)
    with pytest.raises(NotAStoreError, match="not an actstore store"):
        actstore.open(f"{s3_bucket}/data")


def test_racing_commits_publish_one_and_refuse_the_other(s3_bucket):
    url = f"{s3_bucket}/race"
    actstore.open(url, create=True)
    a, b = RemoteCatalog(Location.parse(url)), RemoteCatalog(Location.parse(url))
    base = a.generation(fresh=True)
    # b starts from `base`, and a publishes base + 1 before b commits
    with pytest.raises(ConcurrentWriteError, match="at the same time"), b.write() as con:
        con.execute("INSERT INTO meta VALUES ('writer', 'b')")
        with a.write() as con_a:
            con_a.execute("INSERT INTO meta VALUES ('writer', 'a')")
    assert a.generation(fresh=True) == base + 1
    rows = actstore.open(url).sql("SELECT value FROM meta WHERE key = 'writer'").fetchall()
    assert rows == [("a",)]
    with b.write() as con:  # the loser starts again from the new generation
        con.execute("INSERT INTO meta VALUES ('writer', 'b')")
    rows = actstore.open(url).sql("SELECT value FROM meta WHERE key = 'writer' ORDER BY 1")
    assert rows.fetchall() == [("a",), ("b",)]


def test_old_generations_are_pruned_and_readers_follow(s3_bucket, monkeypatch):
    from actstore.store import remote as _remote

    monkeypatch.setattr(_remote, "KEEP_GENERATIONS", 2)
    url = f"{s3_bucket}/prune"
    st = actstore.open(url, create=True)
    reader = actstore.open(url, read_only=True)
    for i in range(6):
        with st.catalog.write() as con:
            con.execute("INSERT INTO meta VALUES ('i', ?)", [str(i)])
    gens = RemoteCatalog(Location.parse(url)).generations()
    assert len(gens) == 3 and gens[-1] == 7
    reader.catalog.refresh = 0.0
    assert reader.sql("SELECT count(*) FROM meta WHERE key = 'i'").fetchall() == [(6,)]


def test_second_writer_is_refused_and_an_expired_lease_is_taken_over(s3_bucket):
    url = f"{s3_bucket}/lease"
    st = actstore.open(url, create=True)
    ps = objects.add_prompt_set(st, name="p", table=pa.table({"text": ["a"]}))
    objects.create_run(st, name="r", prompt_set_id=ps, hooks={"h": (0, 4)}, store_dtype="float16")
    w = st.writer("r")
    try:
        with pytest.raises(StoreLockedError, match="another process is writing to store s3://"):
            actstore.open(url).writer("r")
    finally:
        w.close()
    actstore.open(url).writer("r").close()  # released: the next writer gets it
    loc = Location.parse(url)
    stale = RemoteWriteLock(loc)  # a writer that dies without releasing ...
    with pytest.raises(StoreLockedError):
        RemoteWriteLock(loc)
    taken = RemoteWriteLock(loc, lease=0.0)  # ... expires, and its lease is taken over
    with pytest.raises(ConcurrentWriteError, match="lease expired"):
        stale.check()
    taken.release()


def test_recover_removes_uncommitted_parts_from_the_bucket(s3_bucket):
    url = f"{s3_bucket}/recover"
    st = actstore.open(url, create=True)
    rel, _, _ = write_part(
        st.location,
        run_id=1,
        sae_id=1,
        first_row=0,
        rows=np.array([0]),
        features=np.array([1]),
        values=np.array([1.0]),
    )
    assert st.location.exists(rel)
    assert st.recover() == [rel]
    assert not st.location.exists(rel)


WRITER = textwrap.dedent(
    """
    import numpy as np, pyarrow as pa, actstore
    st = actstore.open({url!r})
    with st.writer("r", commit_interval=0.0) as w:
        for b in range({n}):
            x = np.zeros((50, 8), np.float16)
            x[:, 0] = np.arange(b * 50, (b + 1) * 50)
            tokens = {{"prompt_idx": np.full(50, b), "position": np.arange(50), "row": np.arange(50)}}
            w.append(arrays={{"h": x}}, tokens=tokens, first_prompt=b, n_prompts=1)
    """
)


def test_reader_elsewhere_sees_only_whole_commits_while_a_writer_appends(s3_bucket):
    url = f"{s3_bucket}/live"
    st = actstore.open(url, create=True)
    ps = objects.add_prompt_set(st, name="p", table=pa.table({"text": [str(i) for i in range(12)]}))
    objects.create_run(st, name="r", prompt_set_id=ps, hooks={"h": (0, 8)}, store_dtype="float16")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(url=url, n=12)])
    reader = actstore.open(url, read_only=True)
    seen: list[int] = []
    try:
        while True:
            done = proc.poll() is not None
            a = reader.acts("r", "h")
            n = len(a)
            assert n % 50 == 0  # whole batches only
            np.testing.assert_array_equal(a.numpy()[:, 0], np.arange(n))
            assert reader.sql("SELECT count(*) FROM tokens").fetchall()[0][0] >= n
            seen.append(n)
            if done:
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    reader.catalog.refresh = 0.0
    assert len(reader.acts("r", "h")) == 600
    assert seen == sorted(seen)


def test_threads_of_one_process_share_a_remote_store(s3_bucket):
    url = f"{s3_bucket}/threads"
    st = actstore.open(url, create=True)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(5):
                st.sql("SELECT count(*) FROM runs").fetchall()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(InputError, match="check that the bucket exists"):
        actstore.open("s3://no-such-bucket-here/store", create=True)
    with pytest.raises(NotAStoreError, match="not an actstore store"):
        actstore.open("s3://no-such-bucket-here/store")


def test_a_commit_that_loses_the_race_is_run_again(s3_bucket):
    url = f"{s3_bucket}/retry"
    actstore.open(url, create=True)
    ingest, other = RemoteCatalog(Location.parse(url)), RemoteCatalog(Location.parse(url))
    calls = []

    def body(con):
        calls.append(len(calls))
        con.execute("INSERT INTO meta VALUES ('ingest', ?)", [str(len(calls))])
        if len(calls) == 1:  # another process publishes first, while this commit is under way
            other.transact(lambda c: c.execute("INSERT INTO meta VALUES ('analysis', 'x')"))

    ingest.transact(body)
    assert calls == [0, 1]
    rows = actstore.open(url).sql("SELECT key, value FROM meta WHERE key IN ('ingest', 'analysis')")
    assert sorted(rows.fetchall()) == [("analysis", "x"), ("ingest", "2")]


def test_a_store_made_again_at_the_same_url_does_not_read_the_old_cache(s3_bucket):
    url = f"{s3_bucket}/again"
    st = actstore.open(url, create=True)
    objects.add_prompt_set(st, name="old", table=pa.table({"text": ["a"]}))
    assert actstore.open(url).sql("SELECT name FROM prompt_sets").fetchall() == [("old",)]
    fs = s3fs.S3FileSystem()
    fs.rm(url, recursive=True)
    fs.invalidate_cache()
    again = actstore.open(url, create=True)  # its generations are numbered from 1 again
    objects.add_prompt_set(again, name="new", table=pa.table({"text": ["b"]}))
    assert actstore.open(url).sql("SELECT name FROM prompt_sets").fetchall() == [("new",)]
    assert again.marker["store_id"] != st.marker["store_id"]


def _lease_writer_run(url: str) -> str:
    st = actstore.open(url, create=True)
    ps = objects.add_prompt_set(st, name="p", table=pa.table({"text": ["a"]}))
    objects.create_run(st, name="r", prompt_set_id=ps, hooks={"h": (0, 4)}, store_dtype="float16")
    return url


def test_a_dead_writers_lease_on_this_host_is_taken_over_at_once(s3_bucket):
    url = _lease_writer_run(f"{s3_bucket}/dead")
    code = (
        f"import os, actstore; w = actstore.open({url!r}).writer('r'); "
        "os._exit(0)  # dies holding the lease"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert Location.parse(url).exists("write.lock")
    actstore.open(url).writer("r").close()  # no wait for the lease to expire
    assert not Location.parse(url).exists("write.lock")


def test_unlock_ends_the_lease_of_a_writer_killed_elsewhere(s3_bucket):
    import json
    import time

    from click.testing import CliRunner

    from actstore.cli import main

    url = _lease_writer_run(f"{s3_bucket}/unlock")
    held = {"token": "t", "host": "node17", "pid": 4242, "since": "then", "renewed": time.time()}
    Location.parse(url).write_bytes("write.lock", json.dumps(held).encode())
    with pytest.raises(StoreLockedError, match=f"`actstore unlock {url}` ends its lease"):
        actstore.open(url).writer("r")
    res = CliRunner().invoke(main, ["unlock", url])
    assert res.exit_code == 0 and "ended the write lease of host node17 pid 4242" in res.output
    actstore.open(url).writer("r").close()
    res = CliRunner().invoke(main, ["unlock", url])
    assert res.exit_code == 0 and "has no write lease" in res.output


def test_kill_9_in_s3_then_resume_is_bit_identical(tmp_path, llama_dir, s3_bucket):
    import os
    import signal
    import time

    from tests.ingest.test_runner import KILLABLE, _write_toml
    from tests.ingest.test_runner import job_dict as runner_job
    from tests.ingest.test_runner import make_prompts as runner_prompts

    base = runner_job(
        tmp_path, llama_dir, batch_size=2, commit_interval=0.0, store_dtype="bfloat16"
    )
    runner_prompts(tmp_path / "prompts.jsonl", n=40, seed=1)
    url = f"{s3_bucket}/killed"
    killed = _write_toml(tmp_path / "killed.toml", {**base, "store": url})
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(killed)])
    st, n, deadline = None, 0, time.monotonic() + 120
    while time.monotonic() < deadline and n < 4:
        if Location.parse(url).exists("actstore.json"):
            st = st or actstore.open(url)
            st.catalog.refresh = 0.0
            n = st.sql("SELECT count(*) FROM batches").fetchall()[0][0]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = actstore.open(url).sql("SELECT count(*) FROM batches").fetchall()[0][0]
    assert 4 <= committed < 20, "kill the job in the middle"
    resumed = run_job(IngestJob.from_toml(killed), quiet=True)  # takes over the dead lease
    assert resumed.runs[0].status == "resumed"
    run_job(IngestJob.from_dict({**base, "store": str(tmp_path / "whole")}), quiet=True)
    a, b = actstore.open(url), actstore.open(tmp_path / "whole")
    for h in a.hooks("main/pairs"):
        x, y = a.acts("main/pairs", h).numpy(), b.acts("main/pairs", h).numpy()
        assert x.shape == y.shape and x.shape[0] > 100
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))
    q = "SELECT * FROM tokens ORDER BY prompt_idx, position"
    assert a.sql(q).fetchall() == b.sql(q).fetchall()
