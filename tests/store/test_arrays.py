"""Dense arrays: exact round trips for every dtype, layouts, corruption detection."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actstore.errors import CorruptChunkError, InputError
from actstore.store import arrays


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(sorted(arrays.STORE_DTYPES)),
    n=st.integers(0, 300),
    d=st.integers(1, 40),
    compression=st.sampled_from(arrays.COMPRESSIONS),
    splits=st.lists(st.integers(0, 300), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_write_read_roundtrip_is_exact(tmp_path_factory, dtype, n, d, compression, splits, seed):
    root = tmp_path_factory.mktemp("a")
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((n, d)) * 10).astype(arrays.STORE_DTYPES[dtype])
    layout = arrays.Layout(chunk_rows=8, shard_rows=32, compression=compression)
    arr = arrays.create_array(root, "x", d=d, dtype=dtype, capacity=0, layout=layout)
    cuts = sorted({0, n, *[s for s in splits if s < n]})
    for a, b in itertools.pairwise(cuts):
        arrays.write_rows(arr, a, data[a:b])
    back = arrays.read_rows(arrays.open_array(root, "x", mode="r"), np.arange(n))
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back.view(np.uint8), data.view(np.uint8))
    if n:
        pick = rng.integers(0, n, size=min(n, 17))
        np.testing.assert_array_equal(
            arrays.read_rows(arr, pick).view(np.uint8), data[pick].view(np.uint8)
        )


def test_bfloat16_is_stored_as_uint16_bits(tmp_path):
    x = np.array([[1.0, -2.5, 3.140625]], np.float32)
    arr = arrays.create_array(tmp_path, "b", d=3, dtype="bfloat16", capacity=1)
    arrays.write_rows(arr, 0, x)
    assert arr.dtype == np.uint16
    out = arrays.read_rows(arr, [0])
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.astype(np.float32), x)


def test_default_layout_chunks_are_about_a_mebibyte():
    for d in (64, 768, 4096):
        lay = arrays.default_layout(d, "float16")
        assert 512 * 1024 <= lay.chunk_rows * d * 2 <= 1 << 20
        assert lay.shard_rows == 32 * lay.chunk_rows
    assert arrays.default_layout(768, "float32").compression == "zstd"


def test_unknown_dtype_and_compression_are_clear_errors():
    with pytest.raises(InputError, match="store dtype 'int8' is not supported; choose one of"):
        arrays.check_dtype("int8")
    with pytest.raises(InputError, match="compression 'lz4' unknown"):
        arrays.default_layout(8, "float16", "lz4")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_corrupt_chunk_raises_naming_array_and_chunk(tmp_path, compression):
    layout = arrays.Layout(chunk_rows=16, shard_rows=64, compression=compression)
    arr = arrays.create_array(
        tmp_path, "arrays/run000001/h", d=4, dtype="float32", capacity=0, layout=layout
    )
    arrays.write_rows(arr, 0, np.arange(128 * 4, dtype=np.float32).reshape(128, 4))
    shard = tmp_path / "arrays/run000001/h/c/1/0"
    raw = bytearray(shard.read_bytes())
    raw[40] ^= 0xFF  # inside the first inner chunk of shard 1 (rows 64-79)
    shard.write_bytes(bytes(raw))
    fresh = arrays.open_array(tmp_path, "arrays/run000001/h", mode="r")
    np.testing.assert_array_equal(arrays.read_rows(fresh, np.arange(10))[:, 0], np.arange(10) * 4)
    with pytest.raises(
        CorruptChunkError, match=r"array myarray: chunk 4 \(rows 64-79, in shard file c/1/0\)"
    ):
        arrays.read_rows(fresh, np.array([3, 70]), name="myarray")
