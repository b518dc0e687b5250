"""Encoding stored activations with an SAE after the ingest (:mod:`actstore.ingest.encode`).

A tiny Llama is ingested without SAEs (float32 and bfloat16 stores); SAEs are
real sae_lens SAEs with random weights saved by sae_lens. References: sae_lens'
own ``encode`` of the rows as stored, and scipy's Welch t-test for
``trigger_diff``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

import actstore
import actstore.queries as q
from actstore.cli import main
from actstore.errors import HookNotFoundError, InputError, NotFoundError
from actstore.ingest.encode import encode
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from tests.ingest.test_runner import job_dict

HOOK = "blocks.1.hook_resid_post"
RUN = "main/pairs"


def _save_sae(path: Path, arch: str = "standard", d_in: int = 32, hook: str = HOOK, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook)
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=48, k=6, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=48, metadata=meta))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    sae.save_model(path)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory, llama_dir) -> dict[str, Path]:
    """dtype -> a pristine store of the tiny Llama's resid_post, ingested without SAEs."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        root = tmp_path_factory.mktemp(f"enc_{dtype}")
        d = job_dict(root, llama_dir, hooks=["blocks.*.hook_resid_post"], store_dtype=dtype)
        run_job(IngestJob.from_dict(d), quiet=True)
        out[dtype] = Path(d["store"])
    return out


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("enc_saes")
    return {
        "standard": _save_sae(root / "l1_std"),
        "topk": _save_sae(root / "l1_topk", "topk", seed=1),
        "other": _save_sae(root / "other_weights" / "l1_std", seed=2),
        "narrow": _save_sae(root / "narrow", d_in=16),
        "nohook": _save_sae(root / "nohook", hook="blocks.9.hook_resid_post"),
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _dense(st: actstore.Store, sae: str, n: int, d_sae: int, run: str = RUN) -> np.ndarray:
    f = st.sql(
        "SELECT row, feature, value FROM feature_acts WHERE sae = ? AND run = ?", [sae, run]
    ).numpy()
    out = np.zeros((n, d_sae), np.float32)
    out[f["row"], f["feature"]] = f["value"]
    assert (out != 0).sum() == len(f["row"])
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".write.lock"
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_features_equal_sae_encode_of_stored_rows(tmp_path, stores, sae_dirs, dtype, arch):
    from sae_lens import SAE

    st = actstore.open(_copy(stores[dtype], tmp_path / "s"))
    res = st.encode(str(sae_dirs[arch]), part_rows=50)
    assert [r.run for r in res] == [RUN] and res[0].status == "encoded"
    sae = SAE.load_from_disk(str(sae_dirs[arch]))
    stored = st.acts(RUN, HOOK).numpy()  # ml_dtypes.bfloat16 for a bfloat16 store
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(stored.astype(np.float32))).numpy()
    got = _dense(st, sae_dirs[arch].name, stored.shape[0], 48)
    np.testing.assert_array_equal(got, want)
    assert res[0].n_rows == res[0].rows_encoded == stored.shape[0]
    assert res[0].nonzeros == int((want != 0).sum()) > 0
    assert res[0].parts == -(-stored.shape[0] // 50)
    row = st.sql("SELECT hook, d_in, d_sae, architecture FROM saes").fetchall()
    assert row == [(HOOK, 32, 48, arch)]


def test_trigger_diff_on_encoded_features_matches_scipy(tmp_path, stores, sae_dirs):
    from sae_lens import SAE

    st = actstore.open(_copy(stores["float32"], tmp_path / "s"))
    st.encode(str(sae_dirs["standard"]), runs=[RUN], name="enc")
    a = st.acts(RUN, HOOK)
    sae = SAE.load_from_disk(str(sae_dirs["standard"]))
    with torch.no_grad():
        X = sae.encode(torch.from_numpy(a.numpy())).numpy().astype(np.float64)
    g = np.asarray(a.meta.column("triggered").to_pylist(), bool)
    res = q.run_named(st, "trigger_diff", run=RUN, sae="enc", group_a="triggered").df()
    res = res.sort_values("feature")
    with np.errstate(invalid="ignore", divide="ignore"):
        t, p = stats.ttest_ind(X[g], X[~g], equal_var=False, axis=0)
    np.testing.assert_allclose(res["mean_a"], X[g].mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res["mean_b"], X[~g].mean(0), rtol=1e-9, atol=1e-12)
    ok = np.isfinite(t)
    assert ok.sum() > 10
    np.testing.assert_allclose(res["t"].to_numpy()[ok], t[ok], rtol=1e-7)
    np.testing.assert_allclose(res["p"].to_numpy()[ok], p[ok], rtol=1e-6, atol=1e-300)


def test_second_call_adds_nothing_and_catalog_sae_by_name(tmp_path, stores, sae_dirs):
    st = actstore.open(_copy(stores["float32"], tmp_path / "s"))
    first = st.encode(str(sae_dirs["standard"]))
    before = _snapshot(tmp_path / "s")
    again = st.encode(str(sae_dirs["standard"]))
    by_name = st.encode("l1_std")  # the catalog's SAE, reloaded from its recorded source
    assert [r.status for r in again] == [r.status for r in by_name] == ["up-to-date"]
    assert again[0].sae_id == first[0].sae_id and again[0].rows_encoded == 0
    assert _snapshot(tmp_path / "s") == before


KILLABLE = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    import actstore
    from actstore.ingest.encode import encode
    st = actstore.open(sys.argv[1])
    encode(st, sys.argv[2], part_rows=7, _before_commit=lambda row: time.sleep(0.01))
    """
)


def _parts(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / "features").rglob("*"))
        if p.is_file()
    }


def test_kill_9_at_random_points_then_resume_is_bit_identical(tmp_path, stores, sae_dirs):
    sae = str(sae_dirs["standard"])
    whole = actstore.open(_copy(stores["bfloat16"], tmp_path / "whole"))
    encode(whole, sae, part_rows=7)
    killed_root = _copy(stores["bfloat16"], tmp_path / "killed")
    rng = np.random.default_rng(0)
    n_parts = whole.sql("SELECT count(*) FROM feature_files").fetchall()[0][0]
    for target in rng.integers(2, n_parts - 2, size=1):  # one kill: a start costs ~10 s
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(killed_root), sae])
        st = actstore.open(killed_root)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if st.sql("SELECT count(*) FROM feature_files").fetchall()[0][0] >= target:
                    break
            except Exception:  # the catalog does not list the SAE yet
                pass
            time.sleep(float(rng.uniform(0.0, 0.03)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    st = actstore.open(killed_root)
    done = st.sql("SELECT count(*) FROM feature_files").fetchall()[0][0]
    assert 2 <= done < n_parts, "kill the encode in the middle"
    with pytest.raises(NotFoundError, match="encode is in progress or was interrupted"):
        q.run_named(st, "feature_density", run=RUN, sae="l1_std")
    res = encode(st, sae, part_rows=7)
    assert res[0].status == "resumed" and res[0].parts == n_parts - done
    assert _parts(killed_root) == _parts(tmp_path / "whole")
    query = "SELECT * FROM feature_files ORDER BY first_row"
    assert st.sql(query).fetchall() == whole.sql(query).fetchall()
    for rel in _parts(killed_root):  # every part is a readable, committed Parquet file
        assert pq.read_table(killed_root / rel).num_rows >= 0
    q.run_named(st, "feature_density", run=RUN, sae="l1_std")


def test_an_uncommitted_part_is_removed_and_rewritten(tmp_path, stores, sae_dirs):
    st = actstore.open(_copy(stores["float32"], tmp_path / "s"))

    def die(row: int) -> None:
        if row == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode(st, str(sae_dirs["standard"]), part_rows=10, _before_commit=die)
    assert st.sql("SELECT max(first_row) FROM feature_files").fetchall() == [(10,)]
    res = encode(st, str(sae_dirs["standard"]), part_rows=10)
    assert res[0].status == "resumed"
    ref = actstore.open(_copy(stores["float32"], tmp_path / "ref"))
    encode(ref, str(sae_dirs["standard"]), part_rows=10)
    assert _parts(tmp_path / "s") == _parts(tmp_path / "ref")


@pytest.mark.parametrize(
    ("which", "kwargs", "exc", "match"),
    [
        ("narrow", {}, InputError, r"expects d_in=16 but run 'main/pairs' stores hook"),
        ("nohook", {}, HookNotFoundError, r"which no run of store .* stores"),
        ("nohook", {"runs": [RUN]}, HookNotFoundError, r"which run 'main/pairs' does not store"),
        ("standard", {"runs": ["nope"]}, actstore.errors.RunNotFoundError, r"run 'nope' not in"),
        ("missing", {}, InputError, r"is not a directory, an SAE in this store"),
        ("notsae", {}, InputError, r"not a sae_lens SAE directory \(no cfg.json\)"),
        ("release", {}, InputError, r"'no-such-release' is not .* a sae_lens pretrained release"),
        ("bad_id", {}, InputError, r"release 'gpt2-small-res-jb' has no SAE 'nope'"),
        ("standard", {"part_rows": 0}, InputError, r"part_rows must be >= 1"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    tmp_path, stores, sae_dirs, which, kwargs, exc, match
):
    root = _copy(stores["float32"], tmp_path / "s")
    (tmp_path / "notsae").mkdir()
    sae = {
        "missing": str(tmp_path / "missing"),
        "notsae": str(tmp_path / "notsae"),
        "release": "no-such-release/blocks.0.hook_resid_pre",
        "bad_id": "gpt2-small-res-jb/nope",
    }.get(which) or str(sae_dirs[which])
    before = _snapshot(root)
    with pytest.raises(exc, match=match):
        encode(actstore.open(root), sae, **kwargs)
    assert _snapshot(root) == before


def test_same_name_other_weights_is_refused(tmp_path, stores, sae_dirs):
    root = _copy(stores["float32"], tmp_path / "s")
    st = actstore.open(root)
    st.encode(str(sae_dirs["standard"]))
    before = _snapshot(root)
    with pytest.raises(InputError, match=r"SAE 'l1_std' is already in the store with other"):
        st.encode(str(sae_dirs["other"]))
    assert _snapshot(root) == before
    res = st.encode(str(sae_dirs["other"]), name="l1_other")  # another name is fine
    assert res[0].status == "encoded"


def test_cli_encode(tmp_path, stores, sae_dirs):
    root = _copy(stores["float32"], tmp_path / "s")
    runner = CliRunner()
    r = runner.invoke(
        main, ["encode", str(root), "--sae", str(sae_dirs["topk"]), "--run", RUN, "--format", "csv"]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith('"run","sae"') and '"encoded"' in lines[1]
    r = runner.invoke(main, ["encode", str(root), "--sae", str(sae_dirs["narrow"])])
    assert r.exit_code == 1 and r.output.startswith("Error: SAE 'narrow' expects d_in=16")
    assert len(r.output.strip().splitlines()) == 1


def test_pretrained_release_offline_says_the_hub_is_unreachable(tmp_path, stores, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    root = _copy(stores["float32"], tmp_path / "s")
    before = _snapshot(root)
    with pytest.raises(InputError, match=r"hub, which is unreachable from here"):
        encode(actstore.open(root), "gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert _snapshot(root) == before
