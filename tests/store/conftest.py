"""Fixtures for store tests: an empty store and a small filled one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import actstore
from actstore.store import objects

HOOKS = {"blocks.0.hook_resid_post": (0, 8), "blocks.1.hook_mlp_out": (1, 8)}


def batch(first_prompt: int, lengths: list[int], first_row: int, rng: np.random.Generator):
    """Tokens and per-hook rows for prompts of the given lengths (every token stored)."""
    prompt_idx = np.repeat(np.arange(first_prompt, first_prompt + len(lengths)), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    n = int(sum(lengths))
    roles = np.where(np.concatenate([np.arange(n_) == n_ - 1 for n_ in lengths]), "last", "prompt")
    tokens = {
        "prompt_idx": prompt_idx,
        "position": position,
        "token_id": rng.integers(0, 50, n),
        "token_text": [f"w{i}" for i in rng.integers(0, 50, n)],
        "position_role": roles.tolist(),
        "row": np.arange(n),
    }
    arrays = {h: rng.standard_normal((n, d)).astype(np.float32) for h, (_, d) in HOOKS.items()}
    return tokens, arrays


@pytest.fixture
def empty_store(tmp_path):
    return actstore.open(tmp_path / "store", create=True)


@pytest.fixture
def filled_store(tmp_path):
    """A store with one run of 6 prompts (labels: triggered, reward), written in 3 batches."""
    st = actstore.open(tmp_path / "store", create=True)
    prompts = pa.table(
        {
            "prompt": [f"prompt {i}" for i in range(6)],
            "triggered": [i % 2 == 0 for i in range(6)],
            "reward": [float(i) / 10 for i in range(6)],
        }
    )
    ps = objects.add_prompt_set(st, name="pairs", table=prompts, text_column="prompt")
    rid = objects.create_run(st, name="run1", prompt_set_id=ps, hooks=HOOKS, store_dtype="float32")
    rng = np.random.default_rng(0)
    expected = {h: [] for h in HOOKS}
    with st.writer(rid) as w:
        row = 0
        for b in range(3):
            lengths = [3 + b, 2]
            tokens, arrays = batch(2 * b, lengths, row, rng)
            w.append(arrays=arrays, tokens=tokens, first_prompt=2 * b, n_prompts=2)
            for h in HOOKS:
                expected[h].append(arrays[h])
            row += sum(lengths)
    return st, {h: np.concatenate(v) for h, v in expected.items()}
