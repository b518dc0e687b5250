"""Fast row reads from memory-mapped shards: byte-identical to zarr, checksums enforced."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actstore.errors import CorruptChunkError, InputError
from actstore.store import access, arrays, mapped


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(sorted(arrays.STORE_DTYPES)),
    compression=st.sampled_from(["none", "none", "zstd"]),
    d=st.integers(1, 24),
    chunk_rows=st.sampled_from([1, 2, 4, 8, 16]),
    chunks_per_shard=st.sampled_from([1, 2, 4]),
    n=st.integers(0, 150),
    spare=st.integers(0, 70),
    splits=st.lists(st.integers(0, 150), max_size=4),
    rows=st.lists(st.integers(0, 10_000), max_size=60),
    seed=st.integers(0, 2**16),
)
def test_fast_reads_equal_zarr_reads(
    tmp_path_factory,
    dtype,
    compression,
    d,
    chunk_rows,
    chunks_per_shard,
    n,
    spare,
    splits,
    rows,
    seed,
):
    root = tmp_path_factory.mktemp("a")
    rng = np.random.default_rng(seed)
    layout = arrays.Layout(chunk_rows, chunk_rows * chunks_per_shard, compression)
    arr = arrays.create_array(root, "x", d=d, dtype=dtype, capacity=n + spare, layout=layout)
    data = (rng.standard_normal((n, d)) * 10).astype(arrays.STORE_DTYPES[dtype])
    cuts = sorted({0, n, *[s for s in splits if s < n]})
    for a, b in itertools.pairwise(cuts):  # partial shard writes leave irregular shards
        arrays.write_rows(arr, a, data[a:b])
    arr = arrays.open_array(root, "x", mode="r")
    total = arr.shape[0]
    assert (access.shard_layout(arr) is not None) == (compression == "none")
    want = np.array([r % total for r in rows], np.int64) if total else np.zeros(0, np.int64)
    fast = access.read_rows(arr, want, name="x")
    slow = arrays.read_rows(arr, want, name="x")
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast.view(np.uint8), slow.view(np.uint8))
    # the same array opened from its zarr.json alone (no zarr): the same layout and bytes
    lay, m = access.shard_layout(arr), mapped.open_mapped(root, "x")
    assert (m is not None) == (lay is not None)
    if m is not None:
        assert m.layout == lay and m.layout.fill_value.dtype == lay.fill_value.dtype
        assert dict(m.attrs) == dict(arr.attrs) and m.shape == arr.shape
        got = access.read_rows(m, want, name="x")
        np.testing.assert_array_equal(got.view(np.uint8), slow.view(np.uint8))
        assert got.dtype == slow.dtype
    if total:
        everything = access.read_rows(arr, slice(None))
        np.testing.assert_array_equal(everything[:n].view(np.uint8), data.view(np.uint8))
        assert not everything[n:].view(np.uint8).any()  # never written: fill value 0


def test_out_is_filled_in_place(tmp_path):
    arr = arrays.create_array(tmp_path, "x", d=3, dtype="bfloat16", capacity=0)
    arrays.write_rows(arr, 0, np.arange(30, dtype=np.float32).reshape(10, 3))
    for dtype in (arrays.STORE_DTYPES["bfloat16"], np.float32):
        out = np.empty((2, 3), dtype)
        assert access.read_rows(arr, [9, 1], out=out) is out
        assert out.astype(np.float32).tolist() == [[27, 28, 29], [3, 4, 5]]


def test_gaps_read_as_fill_and_both_gather_paths_agree(tmp_path):
    lay = arrays.Layout(chunk_rows=4, shard_rows=16, compression="none")
    arr = arrays.create_array(tmp_path, "x", d=2, dtype="float16", capacity=64, layout=lay)
    arrays.write_rows(arr, 0, np.ones((16, 2), np.float16))  # shard 0: complete
    arrays.write_rows(arr, 20, np.full((4, 2), 2, np.float16))  # shard 1: chunk 1 only
    arrays.write_rows(arr, 32, np.full((4, 2), 3, np.float16))  # shard 2: chunks 0 and 2,
    arrays.write_rows(arr, 40, np.full((4, 2), 4, np.float16))  # a hole between them
    lay_ = access.shard_layout(arr)
    assert lay_ is not None
    rows = np.arange(64)
    got = access.read_rows(arr, rows)
    np.testing.assert_array_equal(got.view(np.uint16), arrays.read_rows(arr, rows).view(np.uint16))
    s0, s1, s2 = (access._shard(lay_, s) for s in range(3))
    assert s0.view is not None and len(s0.view) == 4  # one strided gather for the shard
    assert s1.view is not None and (s1.first, len(s1.view)) == (1, 1)
    assert s2.view is None  # chunks not packed in order: one gather per chunk
    assert access._shard(lay_, 3) is None  # shard file never written
    np.testing.assert_array_equal(access.read_rows(arr, [21, 22])[:, 0], [2, 2])
    np.testing.assert_array_equal(access.read_rows(arr, [33, 36, 41])[:, 0], [3, 0, 4])


def test_rewritten_shard_is_remapped(tmp_path):
    arr = arrays.create_array(tmp_path, "x", d=2, dtype="float16", capacity=0)
    arrays.write_rows(arr, 0, np.zeros((5, 2), np.float16))
    assert access.read_rows(arr, [4]).tolist() == [[0, 0]]
    arrays.write_rows(arr, 3, np.full((2, 2), 7, np.float16))  # zarr writes a new shard file
    assert access.read_rows(arr, [4]).tolist() == [[7, 7]]


def test_rows_out_of_range(tmp_path):
    arr = arrays.create_array(tmp_path, "x", d=2, dtype="float16", capacity=4)
    with pytest.raises(InputError, match=r"array nm: rows outside 0-3 requested"):
        access.read_rows(arr, [4], name="nm")


def _corruptible(tmp_path):
    layout = arrays.Layout(chunk_rows=16, shard_rows=64, compression="none")
    arr = arrays.create_array(
        tmp_path, "arrays/run000001/h", d=4, dtype="float32", capacity=0, layout=layout
    )
    arrays.write_rows(arr, 0, np.arange(128 * 4, dtype=np.float32).reshape(128, 4))
    return tmp_path / "arrays/run000001/h/c/1/0"


def _same_error(arr, rows) -> str:
    """Both readers must raise CorruptChunkError naming the same array and chunk."""
    with pytest.raises(CorruptChunkError) as fast:
        access.read_rows(arr, rows, name="myarray")
    with pytest.raises(CorruptChunkError) as slow:
        arrays.read_rows(arr, rows, name="myarray")
    head = str(slow.value).split(" is corrupt")[0]
    assert str(fast.value).startswith(head + " is corrupt (")
    assert str(fast.value).endswith(
        "re-ingest this run into a new store or restore the file from a backup"
    )
    return str(fast.value)


def test_corrupt_chunk_raises_naming_array_and_chunk(tmp_path):
    shard = _corruptible(tmp_path)
    fresh = arrays.open_array(tmp_path, "arrays/run000001/h", mode="r")
    np.testing.assert_array_equal(access.read_rows(fresh, np.arange(100))[:, 0], np.arange(100) * 4)
    raw = bytearray(shard.read_bytes())
    raw[40] ^= 0xFF  # inside the first inner chunk of shard 1 (rows 64-79), already verified
    shard.write_bytes(bytes(raw))
    np.testing.assert_array_equal(access.read_rows(fresh, np.arange(10))[:, 0], np.arange(10) * 4)
    msg = _same_error(fresh, np.array([3, 70]))
    assert msg.startswith(
        "array myarray: chunk 4 (rows 64-79, in shard file c/1/0) is corrupt (crc32c"
    )
    # rows of the shard's intact chunks stay readable
    np.testing.assert_array_equal(access.read_rows(fresh, [90])[:, 0], [360])


def test_corrupt_shard_index_and_truncation(tmp_path):
    shard = _corruptible(tmp_path)
    fresh = arrays.open_array(tmp_path, "arrays/run000001/h", mode="r")
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the shard index
    shard.write_bytes(bytes(raw))
    msg = _same_error(fresh, np.array([100, 127]))
    assert "chunk 6 (rows 96-111, in shard file c/1/0)" in msg and "shard index" in msg
    shard.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    _same_error(fresh, np.array([65]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_and_numpy_gathers_give_the_same_bytes(tmp_path, monkeypatch, dtype):
    """Packed shards are gathered by torch.index_select when torch is imported, else numpy."""
    import sys

    layout = arrays.Layout(8, 32, "none")
    arr = arrays.create_array(tmp_path, "x", d=5, dtype=dtype, capacity=0, layout=layout)
    data = np.random.default_rng(0).standard_normal((200, 5)).astype(arrays.STORE_DTYPES[dtype])
    arrays.write_rows(arr, 0, data)
    arr = arrays.open_array(tmp_path, "x", mode="r")
    rows = np.random.default_rng(1).integers(0, 200, 300)  # unsorted, repeats, every shard
    access.clear_cache()
    with_torch = access.read_rows(arr, rows)
    assert any(sh.rows_t is not None for sh in access._SHARDS.values())
    access.clear_cache()
    monkeypatch.setitem(sys.modules, "torch", None)
    without = access.read_rows(arr, rows)
    assert all(sh.rows_t is None for sh in access._SHARDS.values())
    monkeypatch.undo()
    access.clear_cache()
    np.testing.assert_array_equal(with_torch.view(np.uint8), data[rows].view(np.uint8))
    np.testing.assert_array_equal(without.view(np.uint8), data[rows].view(np.uint8))
