"""A small store with planted effects, and its dense ground truth, for the query tests.

Two runs (``base/p`` and ``ft/p``) over one prompt set of 48 prompts (24 matched
pairs: prompt ``2i`` triggered, ``2i + 1`` not; a reward label; a boolean label
``flag`` that is NULL on some prompts). Every token is listed in ``tokens``; the
first token of each prompt is not stored (``row`` NULL), as a positions policy
would do. Hooks: ``blocks.0.hook_resid_post`` (float16, raw: the memory-mapped
path) and ``blocks.1.hook_mlp_out`` (float32, zstd: the zarr path).

SAE ``sae`` (64 features) is encoded on both runs, with planted effects:

* feature 17 fires only on triggered prompts;
* feature 5's value grows with the prompt's reward;
* feature 63 never fires;
* feature 40 fires more in ``ft/p`` than in ``base/p``;
* the others fire at random (probability 0.1, exponential values).

SAE ``other`` is registered but never encoded (for error paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import actstore
import actstore.queries  # installs the session extension
from actstore.store import objects

HOOK16 = "blocks.0.hook_resid_post"
HOOK32 = "blocks.1.hook_mlp_out"
D, F, N_PROMPTS = 16, 64, 48
RUNS = ("base/p", "ft/p")


@dataclass
class Truth:
    """The dense data behind the store (zeros filled in)."""

    store: actstore.Store
    prompts: pa.Table
    tokens: dict[str, pa.Table]  # run -> every token: prompt_idx, position, role, row (-1: none)
    dense: dict[str, np.ndarray]  # run -> (N, F) float32 feature values
    acts16: dict[str, np.ndarray]  # run -> (N, D) float16
    acts32: dict[str, np.ndarray]  # run -> (N, D) float32
    direction: np.ndarray  # (D,) float64, stored as "dir"

    def rows(self, run: str) -> dict[str, np.ndarray]:
        """Per stored row: prompt_idx, position, role, triggered, pair_id, reward, flag."""
        t = self.tokens[run]
        keep = t["row"] >= 0
        out = {k: v[keep] for k, v in t.items()}
        order = np.argsort(out["row"])
        out = {k: v[order] for k, v in out.items()}
        p = self.prompts
        for col in ("triggered", "pair_id", "reward", "flag"):
            vals = np.array(p.column(col).to_pylist(), dtype=object)
            out[col] = vals[out["prompt_idx"]]
        return out


def _tokens(rng: np.random.Generator) -> dict[str, np.ndarray]:
    lengths = rng.integers(3, 9, N_PROMPTS)
    prompt_idx = np.repeat(np.arange(N_PROMPTS), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    last = np.concatenate([np.arange(n) == n - 1 for n in lengths])
    stored = position > 0
    row = np.full(prompt_idx.size, -1)
    row[stored] = np.arange(int(stored.sum()))
    return {
        "prompt_idx": prompt_idx,
        "position": position,
        "role": np.where(last, "last", "prompt"),
        "row": row,
        "token_id": rng.integers(0, 30, prompt_idx.size),
    }


def build_store(root: Path, seed: int = 0) -> Truth:
    """Write the store described in the module docstring and return its ground truth."""
    rng = np.random.default_rng(seed)
    st = actstore.open(root, create=True)
    triggered = np.arange(N_PROMPTS) % 2 == 0
    reward = rng.standard_normal(N_PROMPTS)
    flag = [None if i % 5 == 0 else bool(i % 3 == 0) for i in range(N_PROMPTS)]
    prompts = pa.table(
        {
            "text": [f"prompt {i}" for i in range(N_PROMPTS)],
            "triggered": triggered,
            "pair_id": np.arange(N_PROMPTS) // 2,
            "reward": reward,
            "flag": pa.array(flag, pa.bool_()),
        }
    )
    ps = objects.add_prompt_set(st, name="pairs", table=prompts)
    sae = objects.add_sae(st, name="sae", hook=HOOK16, d_in=D, d_sae=F)
    objects.add_sae(st, name="other", hook=HOOK16, d_in=D, d_sae=8)
    tok = _tokens(rng)
    stored = tok["row"] >= 0
    n = int(stored.sum())
    truth = Truth(st, prompts, {}, {}, {}, {}, rng.standard_normal(D))
    objects.add_direction(st, name="dir", vector=truth.direction, hook=HOOK16)
    objects.add_direction(st, name="wide", vector=np.ones(D + 1), hook=HOOK16)
    for r, run in enumerate(RUNS):
        rid = objects.create_run(
            st,
            name=run,
            prompt_set_id=ps,
            hooks={HOOK16: (0, D)},
            store_dtype="float16",
        )
        p_of_row = tok["prompt_idx"][stored]
        dense = np.where(rng.random((n, F)) < 0.1, rng.exponential(1.0, (n, F)), 0.0).astype(
            np.float32
        )
        dense[:, 17] = np.where(triggered[p_of_row], rng.uniform(1, 2, n), 0).astype(np.float32)
        dense[:, 5] = np.where(
            rng.random(n) < 0.9, np.exp(reward[p_of_row]) * rng.uniform(0.8, 1.2, n), 0
        ).astype(np.float32)
        dense[:, 63] = 0
        if r == 1:
            dense[:, 40] = np.where(rng.random(n) < 0.7, rng.uniform(2, 3, n), 0).astype(np.float32)
        acts16 = rng.standard_normal((n, D)).astype(np.float16)
        with st.writer(rid) as w:
            # two batches, split at a prompt boundary, so there are two feature parts
            cut_p = N_PROMPTS // 2
            for lo, hi in ((0, cut_p), (cut_p, N_PROMPTS)):
                sel = (tok["prompt_idx"] >= lo) & (tok["prompt_idx"] < hi)
                rows = tok["row"][sel]
                glob = rows[rows >= 0]
                first = int(glob.min())
                local = np.where(rows >= 0, rows - first, -1)
                b_rows, b_feat = np.nonzero(dense[glob])
                w.append(
                    arrays={HOOK16: acts16[glob]},
                    tokens={
                        "prompt_idx": tok["prompt_idx"][sel],
                        "position": tok["position"][sel],
                        "token_id": tok["token_id"][sel],
                        "token_text": [f"w{t}" for t in tok["token_id"][sel]],
                        "position_role": tok["role"][sel].tolist(),
                        "row": pa.array([int(x) if x >= 0 else None for x in local], pa.int64()),
                    },
                    first_prompt=lo,
                    n_prompts=hi - lo,
                    features={sae: (b_rows, b_feat, dense[glob][b_rows, b_feat])},
                )
                w.flush()
        truth.tokens[run] = tok
        truth.dense[run] = dense
        truth.acts16[run] = acts16
    # a float32 (zstd) run for the zarr fallback of the array functions
    rid = objects.create_run(
        st, name="f32/p", prompt_set_id=ps, hooks={HOOK32: (1, D)}, store_dtype="float32"
    )
    acts32 = rng.standard_normal((n, D)).astype(np.float32)
    with st.writer(rid) as w:
        w.append(
            arrays={HOOK32: acts32},
            tokens={
                "prompt_idx": tok["prompt_idx"],
                "position": tok["position"],
                "position_role": tok["role"].tolist(),
                "row": pa.array([int(x) if x >= 0 else None for x in tok["row"]], pa.int64()),
            },
            first_prompt=0,
            n_prompts=N_PROMPTS,
        )
    truth.tokens["f32/p"] = tok
    truth.acts32["f32/p"] = acts32
    return truth


@pytest.fixture(scope="session")
def truth(tmp_path_factory: pytest.TempPathFactory) -> Truth:
    return build_store(tmp_path_factory.mktemp("queries") / "store")
