"""Raw sharded arrays read without zarr: the same rows, and zarr never imported.

Reference: zarr's own read of the same array (``zarr.open_array(...)[rows]``), and
the array's layout as zarr parses it (``shardio.parse_layout``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

import actstore
from actstore.errors import CorruptChunkError
from actstore.store import arrays, objects
from actstore.store.mapped import MappedArray, open_mapped

HOOK = "blocks.0.hook_resid_post"


def _store(tmp_path, dtype: str, n: int = 300, d: int = 6):
    st = actstore.open(tmp_path / "s", create=True)
    rid = objects.create_run(st, name="r", hooks={HOOK: (0, d)}, store_dtype=dtype)
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32) * 5
    with st.writer(rid) as w:
        w.append(
            arrays={HOOK: arrays.to_disk(x, dtype)},
            tokens={"prompt_idx": [0] * n, "position": list(range(n)), "row": list(range(n))},
            first_prompt=0,
            n_prompts=1,
        )
    return st, st.array_info("r", HOOK)["path"]


def _zarr_rows(st, path: str, rows, dtype: str) -> np.ndarray:
    z = zarr.open_array(str(st.root / path), mode="r")
    return arrays.from_disk(np.asarray(z[np.sort(rows)])[np.argsort(np.argsort(rows))], dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_acts_of_a_raw_array_come_from_its_metadata_and_equal_zarr(tmp_path, dtype):
    st, path = _store(tmp_path, dtype)
    arr, _ = st.reads.reader("r", HOOK)
    assert isinstance(arr, MappedArray)
    rows = np.array([299, 0, 17, 17, 150])
    got = st.acts("r", HOOK, rows=rows).numpy()
    want = _zarr_rows(st, path, rows, dtype)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_a_compressed_array_is_read_through_zarr(tmp_path):
    st, path = _store(tmp_path, "float32")  # float32 is zstd-compressed by default
    assert open_mapped(st.root, path) is None
    arr, _ = st.reads.reader("r", HOOK)
    assert isinstance(arr, zarr.Array)
    rows = np.array([5, 1])
    np.testing.assert_array_equal(
        st.acts("r", HOOK, rows=rows).numpy(), _zarr_rows(st, path, rows, "float32")
    )


def test_first_read_in_a_fresh_process_does_not_import_zarr(tmp_path):
    st, path = _store(tmp_path, "float16")
    code = (
        "import sys, actstore, numpy as np\n"
        f"x = actstore.open({str(st.root)!r}).acts('r', {HOOK!r}, rows=[3, 1]).numpy()\n"
        "print(int('zarr' in sys.modules), x.astype(np.float64).tobytes().hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, hexed = out.stdout.split()
    assert imported == "0"
    want = _zarr_rows(st, path, np.array([3, 1]), "float16").astype(np.float64)
    assert bytes.fromhex(hexed) == want.tobytes()


def test_damaged_metadata_is_reported_by_the_zarr_open(tmp_path):
    st, path = _store(tmp_path, "float16")
    meta = st.root / path / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    fresh = actstore.open(st.root)
    with pytest.raises(CorruptChunkError, match="cannot be opened"):
        fresh.acts("r", HOOK, rows=[0])


def test_metadata_outside_the_rules_gets_no_mapped_array(tmp_path):
    st, path = _store(tmp_path, "float16")
    meta = st.root / path / "zarr.json"
    md = json.loads(meta.read_text())
    assert open_mapped(st.root, path) is not None
    for change in (
        {"fill_value": "0x7e00"},  # a hex fill: left to zarr
        {"chunk_key_encoding": {"name": "v2"}},
        {"data_type": {"name": "float16"}},
    ):
        meta.write_text(json.dumps({**md, **change}))
        assert open_mapped(st.root, path) is None
    meta.write_text(json.dumps({**md, "fill_value": "NaN"}))
    m = open_mapped(st.root, path)
    assert m is not None and np.isnan(m.layout.fill_value)
