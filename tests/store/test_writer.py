"""The atomic append protocol: kills, resumes, concurrent readers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa

import actstore
from actstore.store import objects
from actstore.store.catalog import TABLES

from .conftest import HOOKS, batch


def snapshot(st_):
    """Everything a reader can see: every catalog table and every committed array row."""
    tables = {t: st_.sql(f"SELECT * FROM {t}").arrow().to_pylist() for t in TABLES}
    tables["meta"] = [r for r in tables["meta"] if r["key"] != "commit_seq"]
    arrays = {}
    for run in st_.runs().arrow().to_pylist():
        for h in st_.hooks(run["name"]):
            arrays[(run["name"], h)] = st_.acts(run["name"], h).numpy().copy()
    files = (
        sorted(
            str(p.relative_to(st_.root)) for p in (st_.root / "features").rglob("*") if p.is_file()
        )
        if (st_.root / "features").exists()
        else []
    )
    return tables, arrays, files


def assert_same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    assert a[2] == b[2]


KILLER = textwrap.dedent(
    """
    import os, sys, numpy as np
    sys.path.insert(0, {tests!r})
    import actstore
    from store.conftest import batch
    st = actstore.open({root!r})
    w = st.writer("run1")
    w._before_commit = lambda: os._exit(9)
    rng = np.random.default_rng(7)
    tokens, arrays = batch(6, [40, 30], 0, rng)
    feats = {{1: (np.arange(70), np.full(70, 3), np.ones(70, np.float32))}}
    w.append(arrays=arrays, tokens=tokens, first_prompt=6, n_prompts=2, features=feats)
    w.flush()
    print("not killed")
    """
)


def test_kill_between_array_write_and_commit_leaves_store_as_before(filled_store):
    st_, _ = filled_store
    objects.add_sae(st_, name="s", hook="blocks.0.hook_resid_post", d_in=8, d_sae=16)
    before = snapshot(st_)
    tests_dir = os.path.dirname(os.path.dirname(__file__))
    code = KILLER.format(tests=tests_dir, root=str(st_.root))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    # the arrays were written and the part was renamed into place, but nothing is visible
    assert list((st_.root / "features").rglob("*.parquet"))
    assert_same((*snapshot(st_)[:2], before[2]), before)
    st_.recover()
    assert not list((st_.root / "features").rglob("*.parquet"))
    assert_same(snapshot(st_), before)
    # and the store still takes appends after the failed one
    rng = np.random.default_rng(1)
    tokens, arrays = batch(6, [2], 0, rng)
    with st_.writer("run1") as w:
        w.append(arrays=arrays, tokens=tokens, first_prompt=6, n_prompts=1)
    assert (
        st_.acts("run1", "blocks.0.hook_resid_post").numpy().shape[0]
        == len(before[1][("run1", "blocks.0.hook_resid_post")]) + 2
    )


def test_resume_inside_a_shard_is_bit_identical(tmp_path):
    """Commit part of a shard, reopen, append the rest: equals one uninterrupted write."""
    rng = np.random.default_rng(3)
    batches = [batch(i, [int(n)], 0, rng) for i, n in enumerate(rng.integers(1, 60, 12))]

    def build(path, reopen_every):
        st_ = actstore.open(path, create=True)
        ps = objects.add_prompt_set(
            st_, name="p", table=pa.table({"text": [str(i) for i in range(12)]})
        )
        rid = objects.create_run(
            st_, name="r", prompt_set_id=ps, hooks=HOOKS, store_dtype="float16", compression="zstd"
        )
        w = st_.writer(rid)
        for i, (tokens, arrays) in enumerate(batches):
            w.append(arrays=arrays, tokens=tokens, first_prompt=i, n_prompts=1)
            if reopen_every and i % reopen_every == reopen_every - 1:
                w.close()
                w = st_.writer(rid)
        w.close()
        return st_

    one = build(tmp_path / "one", 0)
    many = build(tmp_path / "many", 3)
    a, b = snapshot(one), snapshot(many)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k].view(np.uint16), b[1][k].view(np.uint16))
    drop = {"batches"}  # commit times differ
    for t in TABLES:
        if t not in drop:
            assert a[0][t] == b[0][t] or t in ("runs", "prompt_sets"), t
    # small arrays fill no shard: writes wait for close, and the writer commits nothing early
    assert one.sql("SELECT count(*) FROM batches").fetchall() == [(12,)]


WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np
    import actstore
    from actstore.store import objects
    st = actstore.open({root!r})
    w = st.writer("r", commit_interval=0.0)
    for b in range({n}):
        rows = np.arange(b * 50, (b + 1) * 50)
        vals = np.repeat(rows[:, None].astype(np.float32), 8, axis=1)
        w.append(arrays={{"h": vals}},
                 tokens={{"prompt_idx": np.full(50, b), "position": np.arange(50), "row": np.arange(50)}},
                 first_prompt=b, n_prompts=1)
        # the first commits wait until the reader has seen them (however loaded the machine)
        deadline = time.monotonic() + 120
        while b < 3 and time.monotonic() < deadline:
            try:
                if int(open({sync!r}).read() or -1) >= (b + 1) * 50:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
    w.close()
    """
)


def test_reader_sees_only_committed_batches_while_writer_appends(tmp_path):
    st_ = actstore.open(tmp_path / "s", create=True)
    ps = objects.add_prompt_set(
        st_, name="p", table=pa.table({"text": [str(i) for i in range(40)]})
    )
    objects.create_run(st_, name="r", prompt_set_id=ps, hooks={"h": (0, 8)}, store_dtype="float32")
    sync = tmp_path / "seen"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(root=str(st_.root), n=40, sync=str(sync))]
    )
    reader = actstore.open(st_.root, read_only=True)
    seen, slowest = [], 0.0
    try:
        while True:
            t0 = time.monotonic()
            a = reader.acts("r", "h")
            slowest = max(slowest, time.monotonic() - t0)
            n = len(a)
            assert n % 50 == 0  # whole batches only
            np.testing.assert_array_equal(a.numpy()[:, 0], np.arange(n))  # committed rows are right
            tok = reader.sql("SELECT count(*) FROM tokens").fetchall()[0][0]
            assert tok >= n  # tokens commit with their rows (the count may have moved on since)
            seen.append(n)
            tmp = sync.with_suffix(".tmp")
            tmp.write_text(str(n))
            tmp.replace(sync)  # what the reader has seen: the writer's first commits wait for it
            if proc.poll() is not None and n == 2000:
                break
            assert proc.poll() in (None, 0)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert seen == sorted(seen) and seen[-1] == 2000
    assert len(set(seen)) > 2, "the reader should have seen intermediate commits"
    assert slowest < 30  # a lock wait is bounded by one commit, far below this


def test_rows_across_shards_stream_or_go_through_one_reused_buffer(tmp_path):
    """Batches that end on, span and resume inside shard boundaries are stored exactly
    (float16, bfloat16 and float32 bits). Streamed layouts (16-bit, uncompressed) hold
    one inner chunk per hook, never a shard: the writer's memory is one chunk plus one
    batch's work. A compressed layout (float32) goes through one preallocated shard
    buffer per hook, the same for every shard, and zarr encodes shards from it."""
    import tracemalloc

    import ml_dtypes

    from actstore.store import arrays as _arrays
    from actstore.store import hookstats

    d = 4096
    shard = _arrays.default_layout(d, "float16").shard_rows  # 4096 rows: 32 MiB
    shard32 = _arrays.default_layout(d, "float32").shard_rows * d * 4  # 2048 rows: 32 MiB
    chunk_bytes = _arrays.default_layout(d, "float16").chunk_rows * d * 2
    sizes = [128] * (shard // 128) + [100] * 44  # the 32nd batch ends on a boundary
    assert sum(sizes) > 2 * shard  # and a later one spans the next

    base = np.random.default_rng(5).standard_normal((128, d)).astype(np.float32)

    def rows(i):  # batch i, made again for the reference (not held while writing)
        return base[: sizes[i]] * np.float32(1 + i / 7) + np.float32(i / 3)

    st_ = actstore.open(tmp_path / "s", create=True)
    ps = objects.add_prompt_set(
        st_, name="p", table=pa.table({"text": [str(i) for i in range(len(sizes))]})
    )
    for dtype, ref in (
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
        ("float32", np.float32),
    ):
        streamed = dtype != "float32"
        rid = objects.create_run(
            st_, name=dtype, prompt_set_id=ps, hooks={"h": (0, d)}, store_dtype=dtype
        )
        w = st_.writer(rid)
        tracemalloc.start()
        pointers = set()
        for i, n in enumerate(sizes):
            tok = {"prompt_idx": np.full(n, i), "position": np.arange(n), "row": np.arange(n)}
            w.append(arrays={"h": rows(i)}, tokens=tok, first_prompt=i, n_prompts=1)
            hb = w._buffers["h"]
            if streamed:
                assert hb.buf is None and hb.held_nbytes in (0, chunk_bytes), (dtype, i)
            else:
                pointers.add(hb.buf.__array_interface__["data"][0])
            if i == 36:  # commit inside a shard, reopen: the new writer resumes from disk
                w.close()
                w = st_.writer(rid)
                pointers = set()
                tracemalloc.reset_peak()  # from here on: appends and whole-shard writes
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        w.close()
        batch_work = 128 * d * (4 + 2 * 8)  # a float32 batch, its float64 statistics
        if streamed:
            assert peak < chunk_bytes + batch_work + (6 << 20) < shard * d * 2, (peak >> 20, dtype)
        else:
            assert len(pointers) == 1  # the same buffer for every shard of the second writer
            # the buffer, and zarr's encoding of a full shard (about two copies more)
            assert peak < 3 * shard32 + batch_work + (6 << 20), (peak >> 20, dtype)
        assert w._buffers["h"].buf is None and w._buffers["h"].held_nbytes == 0  # given back
        bits = f"u{np.dtype(ref).itemsize}"
        got = st_.acts(dtype, "h").numpy().view(bits)
        assert got.shape == (sum(sizes), d)
        ends = np.cumsum(sizes)
        mean = np.zeros(d)
        for i, end in enumerate(ends):
            want = rows(i).astype(ref)
            assert np.array_equal(got[end - sizes[i] : end], want.view(bits)), (dtype, i)
            mean += want.astype(np.float64).sum(0)
        stats = hookstats.read(st_, rid)["h"]
        assert stats.n == sum(sizes)
        np.testing.assert_allclose(stats.mean_D, mean / sum(sizes), atol=1e-9)
