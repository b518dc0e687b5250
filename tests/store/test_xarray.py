"""xarray and dask open a store's arrays (dimension names, one Zarr group per run).

The values are compared with ``Store.acts`` and with the data that was written.
"""

from __future__ import annotations

import dask.array as da
import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
import xarray as xr
import zarr

import actstore
from actstore.store import objects
from tests.store.conftest import HOOKS


def test_a_run_opens_as_an_xarray_dataset(filled_store):
    st, expected = filled_store
    (path,) = st.sql(
        "SELECT DISTINCT regexp_extract(path, '^(.*)/[^/]+$', 1) FROM arrays"
    ).fetchall()[0]
    ds = xr.open_zarr(st.root / path, consolidated=False)
    assert set(ds.data_vars) == set(HOOKS)
    assert ds.attrs["run"] == "run1" and ds.attrs["run_id"] == 1
    for hook in HOOKS:
        n = st.sql("SELECT n_rows FROM arrays WHERE hook = ?", [hook]).fetchall()[0][0]
        v = ds[hook]
        assert v.dims == ("row", "d")
        assert isinstance(v.data, da.Array)  # lazy, chunked as stored
        got = v.isel(row=slice(0, n)).values
        np.testing.assert_array_equal(got, st.acts("run1", hook).numpy())
        np.testing.assert_array_equal(got, expected[hook])
        # the rows picked by SQL, picked in xarray
        rows = (
            st.sql(
                "SELECT row FROM labeled_tokens WHERE triggered AND position_role = 'last' ORDER BY row"
            )
            .df()["row"]
            .to_numpy()
        )
        np.testing.assert_array_equal(
            v.isel(row=rows).values,
            st.acts("run1", hook, where="triggered AND position_role = 'last'").numpy(),
        )


def test_the_arrays_tree_is_a_zarr_hierarchy(filled_store):
    st, _ = filled_store
    root = zarr.open_group(st.root / "arrays", mode="r")
    run = root["run000001"]
    assert isinstance(run, zarr.Group)
    for hook in HOOKS:
        arr = run[hook]
        assert arr.metadata.dimension_names == ("row", "d")
        assert arr.attrs["hook"] == hook


@pytest.fixture
def mixed_store(tmp_path):
    """One bfloat16 run with hooks of two widths, and one float16 run with one hook."""
    st = actstore.open(tmp_path / "store", create=True)
    ps = objects.add_prompt_set(st, name="p", table=pa.table({"text": ["a b c", "d e"]}))
    rng = np.random.default_rng(1)
    hooks = {"blocks.0.hook_resid_post": (0, 8), "blocks.0.mlp.hook_post": (0, 12)}
    data = {}
    for name, dtype, hk in (
        ("mixed", "bfloat16", hooks),
        ("one", "float16", {"blocks.0.hook_resid_post": (0, 8)}),
    ):
        rid = objects.create_run(st, name=name, prompt_set_id=ps, hooks=hk, store_dtype=dtype)
        arrays = {h: rng.standard_normal((5, d)).astype(np.float32) for h, (_, d) in hk.items()}
        with st.writer(rid) as w:
            w.append(
                arrays=arrays,
                tokens={
                    "prompt_idx": [0, 0, 0, 1, 1],
                    "position": [0, 1, 2, 0, 1],
                    "row": np.arange(5),
                },
                first_prompt=0,
                n_prompts=2,
            )
        data[name] = arrays
    return st, data


def test_widths_that_differ_get_their_own_dimension_and_bfloat16_is_a_view(mixed_store):
    st, data = mixed_store
    ds = xr.open_zarr(st.root / "arrays/run000001", consolidated=False)
    v8, v12 = ds["blocks.0.hook_resid_post"], ds["blocks.0.mlp.hook_post"]
    assert (v8.dims, v12.dims) == (("row", "d8"), ("row", "d12"))
    assert v8.dtype == np.uint16  # bfloat16 bits: the actstore_dtype attribute says so
    assert v8.attrs["actstore_dtype"] == "bfloat16"
    for hook, v in (("blocks.0.hook_resid_post", v8), ("blocks.0.mlp.hook_post", v12)):
        got = v.isel(row=slice(0, 5)).values.view(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got, st.acts("mixed", hook).numpy())
        np.testing.assert_array_equal(
            got.astype(np.float32),
            data["mixed"][hook].astype(ml_dtypes.bfloat16).astype(np.float32),
        )


def test_a_one_hook_run_opens_as_a_dataarray_and_in_dask(mixed_store):
    st, data = mixed_store
    path = st.root / "arrays/run000002"
    a = xr.open_dataarray(path, engine="zarr", chunks={}, consolidated=False)
    assert a.name == "blocks.0.hook_resid_post" and a.dims == ("row", "d")
    want = st.acts("one", "blocks.0.hook_resid_post").numpy()
    np.testing.assert_array_equal(a.isel(row=slice(0, 5)).values, want)
    d = da.from_zarr(str(path / "blocks.0.hook_resid_post"))
    np.testing.assert_array_equal(d[:5].compute(), want)
    np.testing.assert_array_equal(want, data["one"]["blocks.0.hook_resid_post"].astype(np.float16))
