"""Benchmark the streamed analyses: throughput, and peak memory against the number of rows.

Builds a synthetic float16 store of ``--rows`` x ``--d`` (plus one of twice the
rows), then times PCA (exact and randomized, no projections) and a contrast
sweep, and records the peak of numpy allocations (``tracemalloc``) and Arrow's
allocator during each. Streamed PCA's peak should not grow with the rows.

Example
-------
.venv/bin/python benchmarks/bench_analysis.py --rows 100000 --d 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import actstore
from actstore.analysis import contrast, pca
from actstore.store import objects

HOOK = "blocks.0.hook_resid_post"


def build(root: Path, n_rows: int, d: int, tokens_per_prompt: int = 16) -> actstore.Store:
    st = actstore.open(root, create=True)
    n_prompts = n_rows // tokens_per_prompt
    labels = pa.table(
        {
            "text": [f"p{i}" for i in range(n_prompts)],
            "triggered": (np.arange(n_prompts) % 2 == 1).tolist(),
        }
    )
    ps = objects.add_prompt_set(st, name="p", table=labels)
    rid = objects.create_run(st, name="r", prompt_set_id=ps, hooks={HOOK: (0, d)})
    rng = np.random.default_rng(0)
    u = rng.standard_normal(d)
    per_batch = max(1, 32768 // tokens_per_prompt)
    with st.writer(rid) as w:
        for a in range(0, n_prompts, per_batch):
            b = min(n_prompts, a + per_batch)
            n = (b - a) * tokens_per_prompt
            prompt_idx = np.repeat(np.arange(a, b), tokens_per_prompt)
            pos = np.tile(np.arange(tokens_per_prompt), b - a)
            x = rng.standard_normal((n, d), dtype=np.float32)
            x += np.outer((prompt_idx % 2 == 1) & (pos == tokens_per_prompt - 1), u)
            w.append(
                arrays={HOOK: x.astype(np.float16)},
                tokens={
                    "prompt_idx": prompt_idx,
                    "position": pos,
                    "position_role": np.where(
                        pos == tokens_per_prompt - 1, "last", "prompt"
                    ).tolist(),
                    "row": np.arange(n),
                },
                first_prompt=a,
                n_prompts=b - a,
            )
    return st


def measure(fn: Any) -> dict[str, float | None]:
    tracemalloc.start()
    arrow0 = pa.total_allocated_bytes()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out: dict[str, float | None] = {
        "seconds": round(seconds, 3),
        "numpy_peak_mib": round(peak / 2**20, 1),
        "arrow_mib": round((pa.total_allocated_bytes() - arrow0) / 2**20, 1),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--block-rows", type=int, default=8192)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.rows, 2 * args.rows):
            st = build(Path(tmp) / f"s{n}", n, args.d)
            gb = n * args.d * 2 / 1e9
            for method in ("exact", "randomized"):
                m = measure(
                    lambda method=method, st=st: pca(
                        st,
                        run="r",
                        hooks=HOOK,
                        k=10,
                        method=method,
                        block_rows=args.block_rows,
                        project=False,
                        save=False,
                    )
                )
                secs = m["seconds"] or float("nan")
                m["gb_per_s_per_pass"] = round(gb / secs, 3) if method == "exact" else None
                print(json.dumps({"analysis": f"pca/{method}", "rows": n, "d": args.d, **m}))
            m = measure(
                lambda st=st: contrast(
                    st,
                    run="r",
                    hooks=HOOK,
                    group="triggered",
                    where="position_role = 'last'",
                    n_random=1000,
                    save=False,
                )
            )
            print(json.dumps({"analysis": "contrast/last", "rows": n, "d": args.d, **m}))
            st.close()


if __name__ == "__main__":
    main()
