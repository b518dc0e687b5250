"""Fixtures for the report tests: the demo store's report, and a small store with HTML in it.

The demo store is the session's ``actstore demo`` run (tests/conftest.py), shared
with tests/demo; its report is built once here. The small store is the tiny
Llama over prompts whose text and labels contain HTML, with stored analyses of
kinds the report has no renderer for (a patching grid, a steering curve, a
trajectory), so they are drawn by the generic renderer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actstore
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.report import ReportOptions, build_report
from actstore.store import objects

HTML_PROMPT = "<script>window.__pwned = 1</script> the cat <img src=x onerror=alert(1)> & dog"
"""A prompt that would run code if the report pasted text into HTML."""

GRID_LAYERS = [0, 1, 2]
GRID_POSITIONS = ["<bos>", "the", "cat", "sat"]
GRID = (np.arange(12).reshape(3, 4) / 11.0).round(4).tolist()
STEERING = [
    {"alpha": a, "rate_triggered": r, "rate_clean": c}
    for a, r, c in ((-1.0, 0.1, 0.0), (0.0, 0.4, 0.02), (1.0, 0.9, 0.5))
]
TRAJECTORY = {"step": [0, 25, 50, 100], "auroc": [0.5, 0.7, 0.95, 1.0]}


@pytest.fixture(scope="session")
def demo_report(demo_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo store's report, built once: its folder, the store path and the build summary."""
    _, out = demo_run
    site = tmp_path_factory.mktemp("demo_report") / "report"
    summary = build_report(out / "store", site)
    return {"site": site, "store": out / "store", "summary": summary}


@pytest.fixture(scope="session")
def html_store(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """A tiny-Llama store whose prompts and labels contain HTML, with generic analyses."""
    root = tmp_path_factory.mktemp("report_html")
    prompts = root / "prompts.jsonl"
    rows = [
        {"prompt": HTML_PROMPT, "triggered": True, "note": "<b>bold?</b>"},
        {"prompt": "the cat sat", "triggered": False, "note": "plain"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = root / "store"
    job = {
        "store": str(store),
        "model": {"path": str(llama_dir), "name": "tiny"},
        "checkpoints": [{"label": "base", "path": str(llama_dir)}],
        "prompts": [{"name": "html<set>", "path": str(prompts)}],
        "capture": {"hooks": ["blocks.*.hook_resid_post"], "store_dtype": "float32"},
        "generate": {"max_new_tokens": 3},
        "scorers": [{"name": "cat", "regex": r"cat"}],
    }
    run_job(IngestJob.from_dict(job), quiet=True)
    st = actstore.open(store)
    objects.add_direction(
        st,
        name="<i>dir</i>",
        vector=np.random.default_rng(0).standard_normal(32),
        hook="blocks.1.hook_resid_post",
        method="mean_diff",
    )
    objects.add_analysis(
        st,
        name="<b>patching</b>",
        kind="patching",
        params={"metric": "logit_diff"},
        result={"layers": GRID_LAYERS, "positions": GRID_POSITIONS, "restored": GRID},
    )
    objects.add_analysis(
        st, name="steer", kind="steering", params={}, result={"curve": STEERING, "hook": "h"}
    )
    objects.add_analysis(st, name="traj", kind="trajectory", params={}, result=TRAJECTORY)
    st.close()
    return store


@pytest.fixture(scope="session")
def html_report(html_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small store's report folder."""
    site = tmp_path_factory.mktemp("html_report") / "report"
    build_report(html_store, site, ReportOptions(prompts_per_set=2))
    return site
