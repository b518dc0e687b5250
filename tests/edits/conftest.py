"""Fixtures for the edit tests: one store ingested once per session, copied per test.

The session store holds two checkpoints of the tiny Llama (``base`` and ``ft``, a
perturbed copy) over 8 prompts, every ``resid_post`` hook in float32, greedy
completions (3 tokens) with a regex behaviour scorer, an SAE at layer 1, and a
few directions at layer 1.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actstore
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.store import objects
from tests.edits.helpers import (
    HOOK,
    D,
    job_dict,
    make_prompts,
    perturbed_copy,
    save_tiny_sae,
)

DIRECTIONS = ("dir_a", "dir_b", "dir_c")


@pytest.fixture(scope="session")
def edit_env(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> dict[str, Any]:
    """Paths of the session store and what it was built from."""
    root = tmp_path_factory.mktemp("edits")
    ft_dir = perturbed_copy(llama_dir, root / "llama_ft")
    sae_dir = save_tiny_sae(root / "sae_l1")
    prompts = make_prompts(root / "prompts.jsonl")
    store = root / "store"
    job = job_dict(store, prompts, {"base": llama_dir, "ft": ft_dir}, sae=sae_dir)
    run_job(IngestJob.from_dict(job), quiet=True)
    st = actstore.open(store)
    rng = np.random.default_rng(3)
    vectors = {}
    for name in DIRECTIONS:
        vectors[name] = rng.standard_normal(D)
        objects.add_direction(st, name=name, vector=vectors[name], hook=HOOK, method="random")
    st.close()
    return {
        "root": root,
        "store": store,
        "job": job,
        "prompts": prompts,
        "base_dir": llama_dir,
        "ft_dir": ft_dir,
        "sae_dir": sae_dir,
        "vectors": vectors,
    }


@pytest.fixture(scope="session")
def store(edit_env: dict[str, Any]) -> actstore.Store:
    """The session store, shared: tests that write use :func:`store_copy`."""
    return actstore.open(edit_env["store"])


@pytest.fixture
def store_copy(edit_env: dict[str, Any], tmp_path: Path) -> actstore.Store:
    """A private copy of the session store, for tests that add edits, runs or scores."""
    dst = tmp_path / "store"
    shutil.copytree(edit_env["store"], dst)
    return actstore.open(dst)


@pytest.fixture(scope="session")
def model(llama_dir: Path) -> Any:
    """The tiny Llama (the ``base`` checkpoint), float32, eval mode."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()
