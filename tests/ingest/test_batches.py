"""Batch helpers of the ingest: the statistics summed on the model's threads.

Reference: numpy's float64 mean, variance and row norms of the rows as stored
(the same check as ``tests/store/test_hookstats.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.errors import InputError
from actstore.ingest.batches import stored_stats
from actstore.store.hookstats import HookStats
from tests.store.test_hookstats import _check


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_stored_stats_equal_numpy_of_the_stored_rows(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 7, generator=g) * 3 + 40).to(dtype)  # a mean far from zero
    got = stored_stats({"h": x, "empty": x[:0]})
    _check(got["h"], x.double().numpy())
    assert got["empty"].n == 0
    np.testing.assert_allclose(
        got["h"].m2_D, HookStats.of(x.float().numpy()).m2_D, rtol=1e-12, atol=1e-12
    )


def _files(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_writer_refuses_statistics_of_other_rows(tmp_path):
    import actstore
    from actstore.store import objects

    st = actstore.open(tmp_path / "s", create=True)
    rid = objects.create_run(st, name="r", hooks={"h": (0, 3)}, store_dtype="float32")
    rows = np.ones((2, 3), np.float32)
    w = st.writer(rid)
    before = _files(tmp_path / "s")
    with pytest.raises(InputError, match="statistics must cover"):
        w.append(
            arrays={"h": rows},
            tokens={"prompt_idx": [0, 0], "position": [0, 1], "row": [0, 1]},
            first_prompt=0,
            n_prompts=1,
            stats={"h": HookStats.of(rows[:1])},
        )
    assert _files(tmp_path / "s") == before
    w.abort()
