"""Row selections: SQL columns, hook patterns, block reads and float conversion."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from actstore.analysis.rows import (
    as_float,
    default_block_rows,
    resolve_hooks,
    run_info,
    select,
)
from actstore.errors import HookNotFoundError, RunNotFoundError


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_as_float_is_exact(dtype):
    x = (np.random.default_rng(0).standard_normal((5, 7)) * 100).astype(dtype)
    for out in (np.float32, np.float64):
        got = as_float(x, out)
        assert got.dtype == out
        np.testing.assert_array_equal(got, x.astype(np.float64).astype(out))


def test_default_block_rows_bounds_bytes():
    assert default_block_rows(4096) * 4096 * 8 <= 64 << 20
    assert default_block_rows(10**9) == 256


def test_select_blocks_and_columns(synth):
    st = synth.store
    sel = select(
        st,
        run="base",
        where="position_role = 'last' AND prompt_idx < $n",
        params={"n": 10},
        columns={"y": "triggered", "r2": "reward * 2"},
    )
    assert sel.n == 10 and sel.run == "base" and sel.run_id == run_info(st, "base").run_id
    np.testing.assert_allclose(sel.column("_r2"), 2 * sel.column("reward"))
    assert (sel.column("_y") == sel.column("triggered")).all()
    want = st.acts("base", "blocks.1.hook_resid_post", rows=sel.rows).numpy(np.float64)
    got = np.vstack([b for _, b in sel.blocks(st, ["blocks.1.hook_resid_post"], block_rows=3)])
    np.testing.assert_array_equal(got, want)
    both = sel.read(st, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert both.shape == (10, 32)
    np.testing.assert_array_equal(both[:, 16:], want)
    sub = sel.take(sel.column("_y"))
    assert sub.n == 5 and sub.meta.num_rows == 5


def test_hooks_and_runs(synth32):
    st = synth32.store
    assert resolve_hooks(st, "base", "blocks.[12].*") == [
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post",
    ]
    assert resolve_hooks(st, "base", None) == run_info(st, "base").hooks
    info = run_info(st, 2)
    assert info.name == "ft" and info.width("blocks.0.hook_resid_post") == 16
    assert info.layer("blocks.2.hook_resid_post") == 2
    with pytest.raises(HookNotFoundError, match="not in run 'ft'"):
        info.row("blocks.5.hook_resid_post")
    with pytest.raises(RunNotFoundError, match="runs: \\['base', 'ft'\\]"):
        run_info(st, "nope")
