"""Synthetic stores with planted structure for the analysis tests.

One prompt set of matched pairs (``pair_id``; ``triggered`` toggles within a
pair), a ``split`` label by pair and a ``reward``. Two runs over it (``base`` and
``ft``) with three hooks each (width 16) whose rows align; SAE features (sparse)
for both. Planted:

- at the last prompt token of layers 1 and 2 a unit direction :data:`TRIGGER_DIR`
  is added with weight 3 on triggered prompts (layer 0 carries no signal);
- every token of layer 2 has a low-rank structure (three strong directions);
- SAE feature 3 fires with value ``2 * reward`` on the last token of every
  prompt and feature 7 fires at random, independent of the reward;
- a scorer ``rm`` in ``scores`` whose mean over two samples is the reward;
- run ``ft`` equals ``base`` times 0.9 plus small noise, except that it does not
  carry the trigger direction at layer 2 and SAE feature 9 fires only in ``ft``.

Built once per session and dtype (float32 and float16 stores).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import actstore
from actstore.store import objects

D = 16
N_PROMPTS = 80
HOOKS = {f"blocks.{i}.hook_resid_post": (i, D) for i in range(3)}
SAE_F = 32
rng0 = np.random.default_rng(42)
TRIGGER_DIR = rng0.standard_normal(D)
TRIGGER_DIR /= np.linalg.norm(TRIGGER_DIR)
LOW_RANK_3D = np.linalg.qr(rng0.standard_normal((D, 3)))[0].T  # (3, D) orthonormal


@dataclass
class Synthetic:
    """A built store and what was planted in it."""

    store: actstore.Store
    path: Path
    dtype: str
    n_rows: int
    labels: pa.Table


def _prompts() -> pa.Table:
    pair = np.arange(N_PROMPTS) // 2
    rng = np.random.default_rng(1)
    reward = np.round(rng.random(N_PROMPTS), 3)
    pair_split = np.where(np.arange(N_PROMPTS // 2) % 4 == 0, "test", "train")
    return pa.table(
        {
            "text": [f"prompt {i}" for i in range(N_PROMPTS)],
            "triggered": (np.arange(N_PROMPTS) % 2 == 1).tolist(),
            "pair_id": pair.astype(np.int64),
            "split": pair_split[pair].tolist(),
            "reward": reward,
        }
    )


def _scores(labels: pa.Table, a: int, b: int) -> dict[str, list]:
    """Two samples per prompt scored by ``rm``: reward - 0.1 and reward + 0.1 (mean: reward)."""
    reward = labels.column("reward").to_pylist()[a:b]
    prompts = list(range(a, b))
    return {
        "prompt_idx": prompts * 2,
        "sample_idx": [0] * len(prompts) + [1] * len(prompts),
        "scorer": ["rm"] * (2 * len(prompts)),
        "value": [r - 0.1 for r in reward] + [r + 0.1 for r in reward],
    }


def build_synthetic(root: Path, dtype: str, seed: int = 0) -> Synthetic:
    """Build the store described in the module docstring."""
    st = actstore.open(root, create=True)
    labels = _prompts()
    ps = objects.add_prompt_set(st, name="pairs", table=labels, text_column="text")
    sae_id = objects.add_sae(st, name="sae2", hook="blocks.2.hook_resid_post", d_in=D, d_sae=SAE_F)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 7, N_PROMPTS)
    n = int(lengths.sum())
    prompt_idx = np.repeat(np.arange(N_PROMPTS), lengths)
    position = np.concatenate([np.arange(k) for k in lengths])
    last = np.concatenate([np.arange(k) == k - 1 for k in lengths])
    triggered = np.asarray(labels.column("triggered").to_pylist())[prompt_idx]
    reward = np.asarray(labels.column("reward").to_pylist())[prompt_idx]

    base = {}
    for h, (layer, d) in HOOKS.items():
        x = rng.standard_normal((n, d)) + 2.0  # an offset the centring must remove
        if layer == 2:
            x += (rng.standard_normal((n, 3)) * [6.0, 4.0, 3.0]) @ LOW_RANK_3D
        if layer >= 1:
            x += 3.0 * np.outer(last & triggered, TRIGGER_DIR)
        base[h] = x
    ft = {h: 0.9 * x + 0.1 * rng.standard_normal(x.shape) for h, x in base.items()}
    ft["blocks.2.hook_resid_post"] -= 0.9 * 3.0 * np.outer(last & triggered, TRIGGER_DIR)

    def features(with_nine: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, feats, vals = [], [], []
        r_last = np.flatnonzero(last)
        rows.append(r_last)
        feats.append(np.full(r_last.size, 3))
        vals.append(2.0 * reward[r_last] + 0.01)
        fire7 = np.flatnonzero(rng.random(n) < 0.4)
        rows.append(fire7)
        feats.append(np.full(fire7.size, 7))
        vals.append(rng.random(fire7.size) + 0.5)
        if with_nine:
            fire9 = np.flatnonzero(rng.random(n) < 0.5)
            rows.append(fire9)
            feats.append(np.full(fire9.size, 9))
            vals.append(np.ones(fire9.size))
        r, f, v = (np.concatenate(a) for a in (rows, feats, vals))
        order = np.lexsort((f, r))
        return r[order], f[order].astype(np.int32), v[order].astype(np.float32)

    for run, acts in (("base", base), ("ft", ft)):
        rid = objects.create_run(
            st, name=run, prompt_set_id=ps, hooks=HOOKS, store_dtype=dtype, positions="all"
        )
        feats = features(with_nine=run == "ft")
        with st.writer(rid) as w:
            # three batches of whole prompts
            bounds = [0, N_PROMPTS // 3, 2 * N_PROMPTS // 3, N_PROMPTS]
            for a, b in itertools.pairwise(bounds):
                r0 = int(lengths[:a].sum())
                r1 = int(lengths[:b].sum())
                sel = (feats[0] >= r0) & (feats[0] < r1)
                w.append(
                    arrays={h: x[r0:r1].astype(dtype) for h, x in acts.items()},
                    tokens={
                        "prompt_idx": prompt_idx[r0:r1],
                        "position": position[r0:r1],
                        "token_id": np.zeros(r1 - r0, np.int32),
                        "position_role": np.where(last[r0:r1], "last", "prompt").tolist(),
                        "pos_from_end": position[r0:r1] - lengths[prompt_idx[r0:r1]],
                        "row": np.arange(r1 - r0),
                    },
                    first_prompt=a,
                    n_prompts=b - a,
                    features={sae_id: (feats[0][sel] - r0, feats[1][sel], feats[2][sel])},
                    scores=_scores(labels, a, b),
                )
        objects.finish_run(st, rid)
    return Synthetic(st, root, dtype, n, labels)


@pytest.fixture(scope="session", params=["float32", "float16"])
def synth(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    """The synthetic store, in float32 and float16."""
    return build_synthetic(tmp_path_factory.mktemp(f"synth_{request.param}") / "s", request.param)


@pytest.fixture(scope="session")
def synth32(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    """The synthetic store in float32 only."""
    return build_synthetic(tmp_path_factory.mktemp("synth32") / "s", "float32")
