"""Direct shard writes: byte-identical to zarr's files, read back exactly, corruption caught."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actstore.errors import CorruptChunkError, InputError
from actstore.store import access, arrays, shardio

RAW_DTYPES = ["float16", "float32", "bfloat16"]  # all with compression "none"


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _data(rng: np.random.Generator, n: int, d: int, dtype: str) -> np.ndarray:
    return arrays.to_disk((rng.standard_normal((n, d)) * 10).astype(np.float32), dtype)


@pytest.fixture
def spy(monkeypatch):
    """Count the shards :func:`arrays.write_rows` hands to the direct writer."""
    calls: list[tuple[int, int]] = []
    real = shardio.write_shards

    def counting(lay, start, rows_ND):
        calls.append((start, start + rows_ND.shape[0]))
        real(lay, start, rows_ND)

    monkeypatch.setattr(shardio, "write_shards", counting)
    return calls


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(RAW_DTYPES),
    n=st.integers(1, 250),
    d=st.integers(1, 24),
    chunk_rows=st.integers(1, 16),
    chunks_per_shard=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_whole_array_write_is_byte_identical_to_zarr(
    tmp_path_factory, spy, dtype, n, d, chunk_rows, chunks_per_shard, seed
):
    layout = arrays.Layout(chunk_rows, chunk_rows * chunks_per_shard, "none")
    data = _data(np.random.default_rng(seed), n, d, dtype)
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("zarr")
    mine = arrays.create_array(ours, "x", d=d, dtype=dtype, capacity=n, layout=layout)
    ref = arrays.create_array(theirs, "x", d=d, dtype=dtype, capacity=n, layout=layout)
    spy.clear()
    arrays.write_rows(mine, 0, data)
    ref[:] = data
    assert spy == [(0, n)]  # every shard, the partial last one too, went the direct way
    assert _files(ours) == _files(theirs)
    back = arrays.open_array(ours, "x", mode="r")
    np.testing.assert_array_equal(back[:].view(np.uint8), data.view(np.uint8))
    rows = np.random.default_rng(seed).integers(0, n, size=min(n, 13))
    np.testing.assert_array_equal(
        arrays.read_rows(back, rows).view(np.uint8), data[rows].view(np.uint8)
    )
    access.clear_cache()
    np.testing.assert_array_equal(
        access.read_rows(back, rows).view(np.uint8), data[rows].view(np.uint8)
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(RAW_DTYPES),
    n=st.integers(1, 250),
    d=st.integers(1, 12),
    chunk_rows=st.integers(1, 8),
    chunks_per_shard=st.integers(1, 4),
    splits=st.lists(st.integers(0, 250), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_mixed_writes_and_growth_match_zarr_file_for_file(
    tmp_path_factory, dtype, n, d, chunk_rows, chunks_per_shard, splits, seed
):
    """Writes in pieces (direct whole shards, zarr partial ones) while the array grows."""
    layout = arrays.Layout(chunk_rows, chunk_rows * chunks_per_shard, "none")
    data = _data(np.random.default_rng(seed), n, d, dtype)
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("zarr")
    mine = arrays.create_array(ours, "x", d=d, dtype=dtype, capacity=0, layout=layout)
    ref = arrays.create_array(theirs, "x", d=d, dtype=dtype, capacity=0, layout=layout)
    for a, b in itertools.pairwise(sorted({0, n, *[s for s in splits if s < n]})):
        arrays.write_rows(mine, a, data[a:b])
        arrays.ensure_capacity(ref, b)
        ref[a:b] = data[a:b]
        assert _files(ours) == _files(theirs)
    back = arrays.open_array(ours, "x", mode="r")
    np.testing.assert_array_equal(back[:n].view(np.uint8), data.view(np.uint8))


@pytest.fixture
def streams(monkeypatch):
    """Record the streamed shards: per shard file, the chunk counts after each write, and finishes."""
    log: dict[str, list[int | str]] = {}
    real_append, real_finish = shardio.ShardStream.append, shardio.ShardStream.finish

    def appending(self, rows_ND):
        before = self.chunks
        real_append(self, rows_ND)
        if self.chunks > before:
            log.setdefault(self.path.parent.name, []).append(self.chunks)

    def finishing(self):
        real_finish(self)
        log.setdefault(self.path.parent.name, []).append("finished")

    monkeypatch.setattr(shardio.ShardStream, "append", appending)
    monkeypatch.setattr(shardio.ShardStream, "finish", finishing)
    return log


def test_runwriter_streams_shards_chunk_by_chunk_and_matches_zarr(tmp_path, streams, monkeypatch):
    import actstore
    from actstore.store import objects

    monkeypatch.setattr(arrays, "TARGET_CHUNK_BYTES", 1024)  # d=16 float16: 32-row chunks
    monkeypatch.setattr(arrays, "CHUNKS_PER_SHARD", 4)  # 128-row shards
    store = actstore.open(tmp_path / "s", create=True)
    rid = objects.create_run(store, name="r", hooks={"h": (0, 16)}, store_dtype="float16")
    data = _data(np.random.default_rng(0), 3 * 128 + 50, 16, "float16")
    with store.writer(rid) as w:
        for b in range(0, data.shape[0], 30):
            rows = data[b : b + 30]
            w.append(
                arrays={"h": rows},
                tokens={"prompt_idx": np.full(len(rows), b), "row": np.arange(len(rows))},
                first_prompt=b,
                n_prompts=1,
            )
            if b == 180:
                w.flush()  # a partial shard (a snapshot of the stream), replaced whole later
    # 3 full shards of 4 chunks and the last (50 rows: a full chunk and an edge chunk), each
    # file streamed: its chunks went to disk as batches filled them, then it was finished
    assert streams == {
        "0": [1, 2, 3, 4, "finished"],
        "1": [1, 2, 3, 4, "finished"],
        "2": [1, 2, 3, 4, "finished"],
        "3": [1, "finished"],
    }
    assert not list((tmp_path / "s").rglob("*.partial"))
    np.testing.assert_array_equal(
        store.acts("r", "h").numpy().view(np.uint16), data.view(np.uint16)
    )
    arr, _ = store.array("r", "h")
    ref = arrays.create_array(
        tmp_path / "ref",
        "x",
        d=16,
        dtype="float16",
        capacity=arr.shape[0],
        layout=arrays.Layout(32, 128, "none"),
    )
    ref[: data.shape[0]] = data
    ours = _files(Path(arr.store.root) / arr.path / "c")
    assert ours == _files(tmp_path / "ref" / "x" / "c")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(["float16", "bfloat16"]),
    d=st.integers(1, 12),
    chunk_rows=st.integers(1, 8),
    chunks_per_shard=st.integers(1, 4),
    batches=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    flush_after=st.sets(st.integers(0, 11), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_streamed_runwriter_files_equal_zarrs(
    tmp_path_factory,
    monkeypatch,
    dtype,
    d,
    chunk_rows,
    chunks_per_shard,
    batches,
    flush_after,
    seed,
):
    """Any batch sizes, commits mid-shard, a growing array: the files are zarr's, byte for byte."""
    import actstore
    from actstore.store import objects

    layout = arrays.Layout(chunk_rows, chunk_rows * chunks_per_shard, "none")
    monkeypatch.setattr(arrays, "default_layout", lambda *a, **k: layout)
    root = tmp_path_factory.mktemp("w")
    store = actstore.open(root / "s", create=True)
    rid = objects.create_run(store, name="r", hooks={"h": (0, d)}, store_dtype=dtype)
    data = _data(np.random.default_rng(seed), sum(batches), d, dtype)
    with store.writer(rid) as w:
        a = 0
        for i, n in enumerate(batches):
            w.append(
                arrays={"h": arrays.from_disk(data[a : a + n], dtype)},
                tokens={"prompt_idx": np.full(n, i), "row": np.arange(n)},
                first_prompt=i,
                n_prompts=1,
            )
            a += n
            if i in flush_after:
                w.flush()
    arr, _ = store.array("r", "h")
    ref = arrays.create_array(root / "ref", "x", d=d, dtype=dtype, capacity=0, layout=layout)
    arrays.ensure_capacity(ref, arr.shape[0])
    ref[: data.shape[0]] = data
    assert _files(Path(arr.store.root) / arr.path / "c") == _files(root / "ref" / "x" / "c")
    np.testing.assert_array_equal(
        store.acts("r", "h").numpy().view(np.uint16), data.view(np.uint16)
    )
    assert not list(root.rglob("*.partial"))


def _direct_array(root: Path, n: int = 40, d: int = 3) -> tuple[object, np.ndarray]:
    layout = arrays.Layout(chunk_rows=4, shard_rows=16, compression="none")
    arr = arrays.create_array(root, "x", d=d, dtype="float16", capacity=n, layout=layout)
    data = _data(np.random.default_rng(1), n, d, "float16")
    shardio.write_shards(shardio.raw_layout(arr), 0, data)
    return arr, data


@pytest.mark.parametrize("where", ["chunk", "crc", "index"])
def test_corrupt_direct_shard_is_detected(tmp_path, where):
    _, data = _direct_array(tmp_path)
    path = tmp_path / "x" / "c" / "1" / "0"  # rows 16-31: chunks 4-7
    raw = bytearray(path.read_bytes())
    at = {"chunk": 2 * (4 * 3 * 2 + 4) + 5, "crc": 4 * 3 * 2 + 1, "index": len(raw) - 20}[where]
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    fresh = arrays.open_array(tmp_path, "x", mode="r")
    np.testing.assert_array_equal(arrays.read_rows(fresh, np.arange(16)), data[:16])
    match = {"chunk": "chunk 6 ", "crc": "chunk 4 ", "index": "chunk 4 "}[where]
    with pytest.raises(CorruptChunkError, match=match + r".*c/1/0"):
        arrays.read_rows(fresh, np.arange(16, 32))
    access.clear_cache()
    with pytest.raises(CorruptChunkError, match=r"c/1/0"):
        access.read_rows(fresh, np.arange(16, 32))


def test_edge_shard_holds_only_chunks_inside_the_array(tmp_path):
    arr, data = _direct_array(tmp_path, n=37)  # last shard: rows 32-36, chunks 8 (full) and 9
    raw = (tmp_path / "x" / "c" / "2" / "0").read_bytes()
    index = np.frombuffer(raw[-(16 * 4 + 4) : -4], "<u8").reshape(4, 2)
    chunk = 4 * 3 * 2 + 4
    assert index.tolist() == [[0, chunk], [chunk, chunk], *[[shardio.MISSING] * 2] * 2]
    pad = np.frombuffer(raw[chunk : 2 * chunk - 4], np.float16).reshape(4, 3)
    np.testing.assert_array_equal(pad[0], data[36])
    assert not pad[1:].any()  # padded with the fill value
    arrays.ensure_capacity(arr, 64)  # growing shows the fill value there
    assert not arrays.read_rows(arr, np.arange(37, 64)).any()


def test_layout_agrees_with_the_mmap_reader(tmp_path):
    cases = [
        ("float16", None),
        ("bfloat16", None),
        ("float32", arrays.Layout(8, 32, "none")),
        ("float32", None),  # zstd
        ("float16", arrays.Layout(8, 32, "blosc")),
    ]
    for i, (dtype, layout) in enumerate(cases):
        arr = arrays.create_array(tmp_path, f"a{i}", d=8, dtype=dtype, capacity=50, layout=layout)
        ours, theirs = shardio.raw_layout(arr), access.shard_layout(arr)
        assert (ours is None) == (theirs is None), (dtype, layout)
        if ours is not None:
            for f in ("directory", "n_rows", "d", "dtype", "chunk_rows", "shard_rows"):
                assert getattr(ours, f) == getattr(theirs, f), f
            assert ours.fill_value == theirs.fill_value
    assert shardio.raw_layout(arrays.open_array(tmp_path, "a0", mode="r")) is None


def test_compressed_arrays_are_written_through_zarr(tmp_path, spy):
    arr = arrays.create_array(tmp_path, "z", d=4, dtype="float32", capacity=0)
    data = _data(np.random.default_rng(2), 100, 4, "float32")
    arrays.write_rows(arr, 0, data)
    assert spy == []
    np.testing.assert_array_equal(arrays.read_rows(arr, np.arange(100)), data)


def test_whole_shards_spans():
    lay = shardio.RawShardLayout(Path("a"), 70, 4, np.dtype("<f2"), 8, 32, 0)
    assert shardio.whole_shards(lay, 0, 32) == (0, 32)
    assert shardio.whole_shards(lay, 0, 31) == (0, 0)
    assert shardio.whole_shards(lay, 1, 64) == (32, 64)
    assert shardio.whole_shards(lay, 33, 70) == (64, 70)
    assert shardio.whole_shards(lay, 40, 69) == (64, 64)


def test_misaligned_direct_write_is_refused(tmp_path):
    arr, _ = _direct_array(tmp_path)
    lay = shardio.raw_layout(arr)
    with pytest.raises(InputError, match="not whole shards"):
        shardio.write_shards(lay, 4, np.zeros((12, 3), np.float16))
    with pytest.raises(InputError, match="stores float16"):
        shardio.write_shards(lay, 0, np.zeros((16, 3), np.float32))


def test_failed_write_keeps_the_old_shard_and_no_temporary(tmp_path, monkeypatch):
    arr, data = _direct_array(tmp_path)
    before = _files(tmp_path)

    def broken(fd, pieces):
        os.write(fd, b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(shardio, "_write_all", broken)
    with pytest.raises(OSError, match="disk full"):
        shardio.write_shards(shardio.raw_layout(arr), 0, np.zeros_like(data))
    assert _files(tmp_path) == before


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    arr, data = _direct_array(tmp_path)
    lay = shardio.raw_layout(arr)
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [bytes(bufs[0])[:7]]))
    shardio.write_shards(lay, 0, data[::-1].copy())
    monkeypatch.undo()
    for s in range(3):
        assert lay.shard_path(s).read_bytes() == shardio.shard_bytes(
            lay, s, data[::-1][16 * s : 16 * (s + 1)]
        )


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_stream_snapshot_equals_zarrs_partial_shard(tmp_path, monkeypatch, kernel_copy):
    """A snapshot mid-shard (chunks copied from the stream's file, the edge chunk and index
    added) is the file zarr writes for those rows; the stream goes on and finishes as zarr's
    whole shard. Also through memory where the file system has no ``copy_file_range``."""
    if not kernel_copy:

        def no_copy(*a, **k):
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "copy_file_range", no_copy)
    layout = arrays.Layout(4, 16, "none")
    data = _data(np.random.default_rng(3), 16, 5, "float16")
    mine = arrays.create_array(
        tmp_path / "a", "x", d=5, dtype="float16", capacity=16, layout=layout
    )
    ref = arrays.create_array(tmp_path / "b", "x", d=5, dtype="float16", capacity=16, layout=layout)
    s = shardio.ShardStream(shardio.raw_layout(mine), 0)
    s.append(data[:3])
    s.append(data[3:10])  # completes chunk 0 from the held rows, chunk 1 straight from these
    assert (s.chunks, s.rows) == (2, 10)
    s.snapshot()
    ref[:10] = data[:10]
    visible = {k: v for k, v in _files(tmp_path / "a" / "x" / "c").items() if "partial" not in k}
    assert visible == _files(tmp_path / "b" / "x" / "c")  # beside the stream's temporary file
    s.append(data[10:])
    with pytest.raises(InputError, match="exceed"):
        s.append(data[:1])  # more rows than the shard holds
    s.finish()
    ref[10:] = data[10:]
    assert _files(tmp_path / "a" / "x" / "c") == _files(tmp_path / "b" / "x" / "c")
    assert not list(tmp_path.rglob("*.partial"))
