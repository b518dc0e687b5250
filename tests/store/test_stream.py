"""The training stream (:mod:`actstore.store.stream`): every row once, shuffled, exact values.

Rows carry their identity in column 0 (``10000 * run + row``, exact in float32),
so the stream can be checked against numpy: each epoch is a permutation of the
selected rows, and values equal ``Store.acts`` of the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import actstore
from actstore.errors import HookNotFoundError, InputError
from actstore.store import objects

HOOK = "blocks.0.hook_resid_post"
D = 8


def _store(root: Path, dtype: str, sizes: dict[str, int], width: int = D) -> actstore.Store:
    st = actstore.open(root, create=True)
    n_prompts = max(sizes.values()) // 5 + 1
    prompts = pa.table(
        {
            "prompt": [f"p{i}" for i in range(n_prompts)],
            "triggered": [i % 2 == 0 for i in range(n_prompts)],
        }
    )
    ps = objects.add_prompt_set(st, name="ps", table=prompts, text_column="prompt")
    rng = np.random.default_rng(0)
    for k, (run, n) in enumerate(sizes.items()):
        objects.create_run(
            st, name=run, prompt_set_id=ps, hooks={HOOK: (0, width)}, store_dtype=dtype
        )
        acts = rng.standard_normal((n, width)).astype(np.float32)
        acts[:, 0] = 10000 * (k + 1) + np.arange(n) if dtype == "float32" else acts[:, 0]
        with st.writer(run) as w:
            w.append(
                arrays={HOOK: acts},
                tokens={
                    "prompt_idx": np.arange(n) // 5,
                    "position": np.arange(n) % 5,
                    "row": np.arange(n),
                },
                first_prompt=0,
                n_prompts=(n - 1) // 5 + 1,
            )
    return st


@pytest.fixture(scope="module")
def st(tmp_path_factory) -> actstore.Store:
    return _store(tmp_path_factory.mktemp("stream") / "s", "float32", {"a": 1203, "b": 700})


def _ids(batches) -> np.ndarray:
    return np.concatenate([b[:, 0].numpy() for b in batches]).astype(np.int64)


ALL = np.concatenate([10000 + np.arange(1203), 20000 + np.arange(700)])


@pytest.mark.parametrize(
    ("block_rows", "buffer_rows", "batch_size"),
    [(256, 65536, 128), (16, 200, 64), (1, 0, 100), (300, 50, 7)],
)
def test_each_epoch_is_a_permutation_of_the_selected_rows(st, block_rows, buffer_rows, batch_size):
    out = list(
        st.batches(
            ["a", "b"], HOOK, batch_size, block_rows=block_rows, buffer_rows=buffer_rows, epochs=2
        )
    )
    ids = _ids(out)
    first, second = ids[: ALL.size], ids[ALL.size :]
    assert np.array_equal(np.sort(first), ALL) and np.array_equal(np.sort(second), ALL)
    assert not np.array_equal(first, second)  # reshuffled each epoch
    assert all(b.shape == (batch_size, D) for b in out[:-1] if b.shape[0] == batch_size)
    assert sum(b.shape[0] < batch_size for b in out) <= 2  # one short batch per epoch at most


def test_values_equal_acts_and_unshuffled_order(st):
    out = list(st.batches(["b", "a"], HOOK, 100, shuffle=False))
    assert [tuple(b.shape) for b in out][-1] == (3, D)  # (700 + 1203) % 100
    got = torch.cat(out).numpy()
    want = np.concatenate([st.acts("b", HOOK).numpy(), st.acts("a", HOOK).numpy()])
    np.testing.assert_array_equal(got, want)
    assert out[0].dtype == torch.float32
    drop = list(st.batches("a", HOOK, 100, shuffle=False, drop_last=True))
    assert len(drop) == 12 and all(b.shape[0] == 100 for b in drop)


def test_same_seed_same_stream_other_seed_other(st):
    def ids(seed: int) -> np.ndarray:
        return _ids(st.batches(["a", "b"], HOOK, 64, seed=seed, buffer_rows=512))

    assert np.array_equal(ids(3), ids(3))
    assert not np.array_equal(ids(3), ids(4))


def test_shuffle_quality_a_batch_mixes_many_blocks_and_both_runs(st):
    first = next(iter(st.batches(["a", "b"], HOOK, 256, block_rows=16, buffer_rows=1024)))
    ids = first[:, 0].numpy().astype(np.int64)
    runs = ids // 10000
    assert set(runs.tolist()) == {1, 2}
    blocks = {(int(r), int(i % 10000) // 16) for r, i in zip(runs, ids, strict=True)}
    assert len(blocks) > 40  # 1024-row buffer of 16-row blocks: 64 blocks available
    # no longer sorted runs of consecutive rows
    assert np.mean(np.diff(ids) == 1) < 0.05


def test_where_rows_and_infinite_epochs(st):
    ids = _ids(st.batches("a", HOOK, 50, where="position = 0"))
    assert np.array_equal(np.sort(ids), 10000 + np.arange(0, 1203, 5))
    ids = _ids(st.batches(["a", "b"], HOOK, 10, rows={"a": [5, 1], "b": np.array([699])}))
    assert sorted(ids.tolist()) == [10001, 10005, 20699]
    stream = st.batches("b", HOOK, 256, epochs=None)
    assert sum(next(stream).shape[0] for _ in range(10)) > 700 * 3


def test_bfloat16_rows_are_cast_exactly(tmp_path):
    s = _store(tmp_path / "bf", "bfloat16", {"a": 300})
    want = s.acts("a", HOOK).numpy().astype(np.float32)
    got = torch.cat(list(s.batches("a", HOOK, 64, shuffle=False))).numpy()
    np.testing.assert_array_equal(got, want)
    bf = next(iter(s.batches("a", HOOK, 64, shuffle=False, dtype=torch.bfloat16)))
    assert bf.dtype == torch.bfloat16
    np.testing.assert_array_equal(bf.float().numpy(), want[:64])


def test_bad_requests(st, tmp_path):
    with pytest.raises(InputError, match=r"no rows of hook .* selected .* by where="):
        st.batches("a", HOOK, 8, where="position > 99")
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        st.batches("a", HOOK, 0)
    with pytest.raises(HookNotFoundError, match="hook 'nope' not in run 'a'"):
        st.batches("a", "nope", 8)
    with pytest.raises(InputError, match="no runs given"):
        st.batches([], HOOK, 8)
    mixed = _store(tmp_path / "m", "float32", {"x": 10})
    objects.create_run(mixed, name="y", hooks={HOOK: (0, 4)}, store_dtype="float32")
    with pytest.raises(InputError, match="different widths"):
        mixed.batches(["x", "y"], HOOK, 8)
