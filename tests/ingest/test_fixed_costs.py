"""Fixed costs before the first batch: the tokenizer is loaded and hashed once per job, and
the weights hash is cached by each file's size, times and inode (a changed file re-hashes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from actstore.errors import InputError
from actstore.ingest import models, plan
from actstore.ingest.job import IngestJob
from tests.helpers.tiny import WORDS
from tests.ingest.test_runner import make_prompts


def _job(tmp_path: Path, dirs: list[Path]) -> IngestJob:
    return IngestJob.from_dict(
        {
            "store": str(tmp_path / "store"),
            "model": {"path": str(dirs[0]), "name": "tiny"},
            "checkpoints": [{"label": f"c{i}", "path": str(d)} for i, d in enumerate(dirs)],
            "prompts": [{"name": "p", "path": str(make_prompts(tmp_path / "p.jsonl", n=4))}],
            "capture": {"hooks": ["blocks.0.hook_resid_post"], "batch_size": 4},
        }
    )


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory, gpt2_dir: Path) -> dict[str, Path]:
    """The tiny GPT-2 twice (same tokenizer files), once with its tokenizer files rewritten
    (same tokenizer, other bytes) and once with another vocabulary."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {k: Path(shutil.copytree(gpt2_dir, root / k)) for k in ("a", "b", "rewritten", "other")}
    cfg = out["rewritten"] / "tokenizer_config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()), indent=4))
    from actstore.demo.tokenizer import build_word_tokenizer

    for f in out["other"].glob("tokenizer*"):
        f.unlink()
    build_word_tokenizer([*WORDS[:-1], "elephant"]).save_pretrained(out["other"])
    return out


def _count_loads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = plan.load_tokenizer

    def counted(path, *a, **k):
        calls.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(plan, "load_tokenizer", counted)
    return calls


def test_the_tokenizer_is_loaded_once_for_checkpoints_that_share_its_files(
    tmp_path, monkeypatch, checkpoint_dirs
):
    calls = _count_loads(monkeypatch)
    p = plan.plan(_job(tmp_path, [checkpoint_dirs["a"], checkpoint_dirs["b"]]))
    assert calls == [str(checkpoint_dirs["a"])]
    assert p.tok_hash == models.tokenizer_hash(models.load_tokenizer(str(checkpoint_dirs["b"])))


def test_a_checkpoint_with_other_tokenizer_files_is_still_loaded_and_compared(
    tmp_path, monkeypatch, checkpoint_dirs
):
    calls = _count_loads(monkeypatch)
    plan.plan(_job(tmp_path, [checkpoint_dirs["a"], checkpoint_dirs["rewritten"]]))
    assert calls == [str(checkpoint_dirs["a"]), str(checkpoint_dirs["rewritten"])]  # same vocab
    with pytest.raises(InputError, match="checkpoint 'c1' has a different tokenizer"):
        plan.plan(_job(tmp_path, [checkpoint_dirs["a"], checkpoint_dirs["other"]]))


def _sha(files: list[Path]) -> str:  # the weights hash's definition, independently
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def test_the_weights_hash_is_cached_and_a_changed_file_hashes_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "ck"
    ck.mkdir()
    w = ck / "model.safetensors"
    w.write_bytes(os.urandom(1 << 16))
    (ck / "config.json").write_text("{}")  # not a weight file
    reads: list[int] = []
    real = models._hash_files
    monkeypatch.setattr(models, "_hash_files", lambda fs: reads.append(1) or real(fs))

    first = models.weights_hash(str(ck))
    assert first == _sha([w]) and len(reads) == 1
    assert models.weights_cache_path() == tmp_path / "cache" / "weights-hash.json"
    assert models.weights_hash(str(ck)) == first and len(reads) == 1  # from the cache
    # the same size and mtime, other bytes: the ctime (and a new inode, for a replaced
    # file) still tell it apart
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[100] ^= 0xFF
    w.write_bytes(bytes(data))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns
    second = models.weights_hash(str(ck))
    assert second == _sha([w]) != first and len(reads) == 2
    # a file replaced by another (as a download does), and a new weight file
    tmp = ck / "new.tmp"
    tmp.write_bytes(os.urandom(1 << 16))
    os.replace(tmp, w)
    (ck / "extra.bin").write_bytes(b"x" * 10)
    assert models.weights_hash(str(ck)) == _sha([w, ck / "extra.bin"]) and len(reads) == 3
    # a damaged cache file is not an error: the files are hashed again
    models.weights_cache_path().write_text("{not json")
    assert models.weights_hash(str(ck)) == _sha([w, ck / "extra.bin"]) and len(reads) == 4
    assert models.weights_hash(str(ck), cache=False) == _sha([w, ck / "extra.bin"])
