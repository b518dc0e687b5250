"""Catalog metadata cached per commit (:mod:`actstore.store.readcache`).

Every cached answer is checked against an uncached one: a fresh ``Store``, SQL
over ``labeled_tokens``, and zarr's own reads of the arrays.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import actstore
from actstore.errors import CorruptChunkError, HookNotFoundError, InputError, RunNotFoundError
from actstore.store import arrays, objects, readcache

HOOK = "blocks.0.hook_resid_post"
D = 8
ROWS_PER_BATCH = 40

APPEND = """
import sys, numpy as np, actstore
st = actstore.open(sys.argv[1])
n = int(st.array_info("r", "{hook}")["n_rows"])
with st.writer("r") as w:
    w.append(arrays={{"{hook}": np.full(({k}, {d}), 7, np.float16)}},
             tokens={{"prompt_idx": [n // 10] * {k}, "position": list(range({k})),
                      "row": list(range({k}))}}, first_prompt=n // 10, n_prompts=1)
"""


def _append(st: actstore.Store, value: float, k: int = ROWS_PER_BATCH) -> None:
    n = int(st.array_info("r", HOOK)["n_rows"])
    with st.writer("r") as w:
        w.append(
            arrays={HOOK: np.full((k, D), value, np.float16)},
            tokens={"prompt_idx": [n // 10] * k, "position": list(range(k)), "row": list(range(k))},
            first_prompt=n // 10,
            n_prompts=1,
        )


def _store(root: Path) -> actstore.Store:
    st = actstore.open(root, create=True)
    prompts = pa.table(
        {"prompt": [f"p{i}" for i in range(40)], "odd": [i % 2 == 1 for i in range(40)]}
    )
    ps = objects.add_prompt_set(st, name="ps", table=prompts, text_column="prompt")
    objects.create_run(st, name="r", prompt_set_id=ps, hooks={HOOK: (0, D)}, store_dtype="float16")
    rng = np.random.default_rng(0)
    with st.writer("r") as w:
        for b in range(3):
            x = rng.standard_normal((ROWS_PER_BATCH, D)).astype(np.float16)
            w.append(
                arrays={HOOK: x},
                tokens={
                    "prompt_idx": np.arange(ROWS_PER_BATCH) // 10 + 4 * b,
                    "position": np.arange(ROWS_PER_BATCH) % 10,
                    "row": np.arange(ROWS_PER_BATCH),
                },
                first_prompt=4 * b,
                n_prompts=4,
            )
    return st


def _settle(st: actstore.Store) -> None:
    """Age the catalog files, so the cache may trust their stamp (as long after a commit)."""
    old = time.time() - 60
    for p in (st.catalog.path, Path(str(st.catalog.path) + ".wal")):
        if p.exists():
            os.utime(p, (old, old))


def _zarr_rows(st: actstore.Store, rows) -> np.ndarray:
    arr, _ = st.array("r", HOOK)
    return arrays.read_rows(arr, np.asarray(rows))  # zarr's own read, no cache of ours


@pytest.fixture
def st(tmp_path) -> actstore.Store:
    return _store(tmp_path / "s")


@pytest.mark.parametrize("copy", [None, "joined", "unjoined"])
def test_acts_equal_uncached_reads(st, copy, monkeypatch):
    """Settled, the selection and metadata come from the session's copy of the run's rows."""
    settled = copy is not None
    if settled:
        _settle(st)
    if copy == "unjoined":  # as for a run whose prompt texts repeated per token are big
        monkeypatch.setattr(readcache, "COPY_MAX_BYTES", 0)
    rows = np.array([5, 0, 119, 5, 64])
    a = st.acts("r", HOOK, rows=rows)
    assert callable(a._meta)  # metadata not fetched until asked for
    np.testing.assert_array_equal(a.numpy(), _zarr_rows(st, rows))
    want = (
        st.sql('SELECT * FROM labeled_tokens WHERE run = ? ORDER BY "row"', ["r"])
        .arrow()
        .take(pa.array(rows))
    )
    assert a.meta.equals(want) and a.run == "r"
    w = st.acts("r", HOOK, where="odd AND position < ?", params=[3])
    sel = (
        st.sql(
            'SELECT "row" FROM labeled_tokens WHERE run = ? AND odd AND position < 3 ORDER BY "row"',
            ["r"],
        )
        .arrow()
        .column("row")
        .to_numpy()
    )
    np.testing.assert_array_equal(w.rows, sel)
    np.testing.assert_array_equal(w.numpy(), _zarr_rows(st, sel))
    assert w.meta.column("row").to_numpy().tolist() == sel.tolist()
    blocks = list(st.iter_acts("r", HOOK, where="odd", block_rows=16))
    np.testing.assert_array_equal(
        np.concatenate([b.numpy() for b in blocks]), st.acts("r", HOOK, where="odd").numpy()
    )
    assert pa.concat_tables([b.meta for b in blocks]).equals(st.acts("r", HOOK, where="odd").meta)
    assert (st.reads._copy is not None) == settled
    if settled:
        assert st.reads._copy[2].endswith("_all") == (copy == "joined")
    with pytest.raises(InputError, match=r"SQL error: .*nope"):
        st.acts("r", HOOK, where="nope > 1")


def test_commit_by_another_store_instance_invalidates(st):
    _settle(st)
    assert st.array_info("r", HOOK)["n_rows"] == 120  # cached, stamp trusted
    assert st.reads._stamp is not None
    other = actstore.open(st.root)
    _append(other, 3.0)
    assert st.array_info("r", HOOK)["n_rows"] == 160
    np.testing.assert_array_equal(st.acts("r", HOOK, rows=[159]).numpy(), np.full((1, D), 3.0))
    objects.create_run(other, name="r2", hooks={HOOK: (0, D)}, store_dtype="float16")
    assert st.run_id("r2") == other.run_id("r2") and st.hooks("r2") == [HOOK]
    fresh = actstore.open(st.root)
    assert st.reads.runs() == fresh.reads.runs()
    assert st.array_info("r", HOOK) == fresh.array_info("r", HOOK)


def test_commit_by_another_process_invalidates(st):
    st.acts("r", HOOK, rows=[0])
    _settle(st)
    before = st.reads.seq()
    assert st.reads._stamp is not None
    code = APPEND.format(hook=HOOK, k=ROWS_PER_BATCH, d=D)
    subprocess.run([sys.executable, "-c", code, str(st.root)], check=True, env=os.environ.copy())
    assert st.reads.seq() > before
    a = st.acts("r", HOOK, rows=np.arange(115, 160))
    np.testing.assert_array_equal(a.numpy(), _zarr_rows(st, np.arange(115, 160)))
    assert (a.numpy()[5:] == 7).all()
    assert a.meta.equals(actstore.open(st.root).acts("r", HOOK, rows=np.arange(115, 160)).meta)


def test_a_recent_commit_is_rechecked_on_every_read(st):
    """A stamp is trusted only once its time is older than the file system's resolution."""
    os.utime(st.catalog.path)  # as a commit just now leaves it
    st.reads.seq()
    assert st.reads._stamp is None  # written just now: its stamp is not trusted
    _settle(st)
    st.reads.seq()
    assert st.reads._stamp is not None


def test_misses_name_what_exists(st):
    with pytest.raises(RunNotFoundError, match=r"run 'nope' not in store .*runs: \['r'\]"):
        st.acts("nope", HOOK, rows=[0])
    with pytest.raises(HookNotFoundError, match=r"hook 'h' not in run 'r'; it has \['blocks.0"):
        st.acts("r", "h", rows=[0])


def test_shard_damaged_after_a_cached_read_is_an_error(st):
    _settle(st)
    np.testing.assert_array_equal(st.acts("r", HOOK, rows=[1]).numpy(), _zarr_rows(st, [1]))
    _, info = st.array("r", HOOK)
    shard = Path(st.root) / info["path"] / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0xFF  # a value of row 1, in a chunk this process verified already
    shard.write_bytes(bytes(raw))
    later = time.time() + 5  # the write is later than the verified version of the file
    os.utime(shard, (later, later))
    with pytest.raises(CorruptChunkError, match=r"chunk 0 \(rows 0-.*is corrupt \(crc32c"):
        st.acts("r", HOOK, rows=[1])
    shard.unlink()
    with pytest.raises(CorruptChunkError, match="shard"):
        st.acts("r", HOOK, rows=[1])
