"""Shard selection: whole batches, contiguous ranges that partition a run, recorded in the run."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as hst

import actstore
from actstore.errors import InputError, SpecError
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.ingest.shards import (
    Shard,
    job_run_names,
    n_batches,
    parse_shard,
    shard_batches,
    shard_store_paths,
    split_run_hash,
    unsharded_store_path,
)
from tests.ingest.test_runner import job_dict


@given(n_prompts=hst.integers(1, 500), batch_size=hst.integers(1, 40), count=hst.integers(1, 12))
def test_shards_partition_the_batches_in_order(n_prompts, batch_size, count):
    got = [
        b
        for i in range(count)
        for b in shard_batches(n_prompts=n_prompts, batch_size=batch_size, shard=Shard(i, count))
    ]
    assert got == list(shard_batches(n_prompts=n_prompts, batch_size=batch_size))
    k = n_batches(n_prompts, batch_size)
    sizes = [len(Shard(i, count).batch_range(k)) for i in range(count)]
    assert max(sizes) - min(sizes) <= 1  # balanced to one batch
    # batch b is prompts [b B, (b+1) B): the composition a single process uses
    assert all(lo == b * batch_size and hi == min(n_prompts, lo + batch_size) for b, lo, hi in got)


def test_resume_skips_the_committed_batches_of_the_shard():
    sh = Shard(1, 3)
    assert [b for b, _, _ in shard_batches(n_prompts=20, batch_size=2, shard=sh)] == [3, 4, 5]
    assert [b for b, _, _ in shard_batches(n_prompts=20, batch_size=2, shard=sh, start=2)] == [5]


def test_parse_and_paths():
    assert Shard.parse(" 2 / 8 ") == Shard(2, 8) == parse_shard((2, 8))
    assert str(Shard(2, 8)) == "2/8" and parse_shard(None) is None
    assert shard_store_paths("runs/x/", 2) == ["runs/x.shard-0-of-2", "runs/x.shard-1-of-2"]
    assert unsharded_store_path("/a/runs/x.shard-1-of-2/") == "/a/runs/x"
    assert split_run_hash(Shard(3, 4).run_hash("abc")) == ("abc", Shard(3, 4))
    assert job_run_names(["a", "b"], ["p"], "ablate") == ["a/p+ablate", "b/p+ablate"]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("3/3", r"shard index 3 is outside 0-2 for 3 shards; .*--array=0-2"),
        ("1/0", "shard count must be >= 1"),
        ("1of3", "not of the form i/N"),
        ((1, 2, 3), "'i/N' or a pair"),
        ((-1, 3), "outside 0-2"),
    ],
)
def test_bad_shards_say_how_to_fix_them(value, match):
    with pytest.raises(SpecError, match=match):
        Shard.parse(value)


def test_sharded_ingest_runs_its_batches_into_its_own_store(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir, batch_size=2)  # 12 prompts: 6 batches
    job = IngestJob.from_dict(d)
    summary = run_job(job, shard="1/3", quiet=True)
    assert summary.store == d["store"] + ".shard-1-of-3"
    assert [(r.status, r.prompts) for r in summary.runs] == [("ingested", 4)]
    st = actstore.open(d["store"] + ".shard-1-of-3")
    # local batch numbers, global prompts, rows from 0
    assert st.sql(
        "SELECT batch_idx, first_prompt, n_prompts FROM batches ORDER BY 1"
    ).fetchall() == [
        (0, 4, 2),
        (1, 6, 2),
    ]
    assert st.sql("SELECT min(prompt_idx), max(prompt_idx), min(row) FROM tokens").fetchall() == [
        (4, 7, 0)
    ]
    # the run records the unsharded job hash plus its shard
    ((job_hash, prov, n_prompts),) = st.sql(
        "SELECT job_hash, provenance, n_prompts FROM runs"
    ).fetchall()
    rec = json.loads(prov)["shard"]
    assert job_hash == f"{rec['job_hash']}:shard-1-of-3" and n_prompts == 12
    assert {k: rec[k] for k in ("index", "count", "batches", "n_batches", "batch_size")} == {
        "index": 1,
        "count": 3,
        "batches": [2, 4],
        "n_batches": 6,
        "batch_size": 2,
    }
    assert rec["job_runs"] == ["main/pairs"]
    # the unsharded job would record exactly that hash
    run_job(job, quiet=True)
    whole = actstore.open(d["store"])
    assert whole.sql("SELECT job_hash FROM runs").fetchall() == [(rec["job_hash"],)]
    # re-running the shard adds nothing; running it into the unsharded store is refused
    again = run_job(job, shard=(1, 3), quiet=True)
    assert [r.status for r in again.runs] == ["already complete"]
    with pytest.raises(InputError, match="already exists and was made by a different job"):
        run_job(job, shard=(0, 3), store=d["store"], quiet=True)


def test_more_shards_than_batches_leaves_some_empty(tmp_path, llama_dir):
    d = job_dict(tmp_path, llama_dir, batch_size=8)  # 12 prompts: 2 batches
    summary = run_job(IngestJob.from_dict(d), shard=(0, 3), store=str(tmp_path / "s0"), quiet=True)
    assert [(r.status, r.prompts, r.rows) for r in summary.runs] == [("ingested", 0, 0)]
    st = actstore.open(tmp_path / "s0")
    assert st.sql("SELECT status FROM runs").fetchall() == [("complete",)]
