"""Benchmark analyses on Dask: streamed PCA covariance throughput with 1 and 2 workers.

Builds a synthetic float16 store of ``--rows`` x ``--d``, then times

* the in-process exact PCA (:func:`actstore.analysis.pca.pca`, numpy with its own
  BLAS threads), as the baseline;
* the Dask exact PCA (:func:`actstore.analysis.dask.pca`) on a ``LocalCluster`` of
  1 and of 2 single-threaded worker processes;
* the covariance pass alone on Dask (``X^T X`` and the column sums of the
  :func:`~actstore.analysis.dask.to_dask` view, without the SQL row selection and
  the eigendecomposition).

Both clusters run side by side and the configurations take turns, ``--repeats``
rounds after a warm-up; each figure is the best of its runs (these VMs are shared:
expect +-20-30% noise, and measure when the machine is otherwise idle).
Prints a markdown table and writes ``benchmarks/results/dask.json``.

Example
-------
.venv/bin/python benchmarks/bench_dask.py --rows 131072 --d 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pyarrow as pa

import actstore
from actstore.analysis import dask as adask
from actstore.analysis.pca import pca as local_pca
from actstore.store import objects

HOOK = "blocks.0.hook_resid_post"
RESULTS = Path(__file__).parent / "results" / "dask.json"


def build(root: Path, n_rows: int, d: int, tokens_per_prompt: int = 16) -> actstore.Store:
    st = actstore.open(root, create=True)
    n_prompts = n_rows // tokens_per_prompt
    ps = objects.add_prompt_set(
        st, name="p", table=pa.table({"text": [f"p{i}" for i in range(n_prompts)]})
    )
    rid = objects.create_run(st, name="r", prompt_set_id=ps, hooks={HOOK: (0, d)})
    rng = np.random.default_rng(0)
    mix_DD = rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)
    per_batch = max(1, 32768 // tokens_per_prompt)
    with st.writer(rid) as w:
        for a in range(0, n_prompts, per_batch):
            b = min(n_prompts, a + per_batch)
            n = (b - a) * tokens_per_prompt
            x = rng.standard_normal((n, d), dtype=np.float32) @ mix_DD + 1.0
            w.append(
                arrays={HOOK: x.astype(np.float16)},
                tokens={
                    "prompt_idx": np.repeat(np.arange(a, b), tokens_per_prompt),
                    "position": np.tile(np.arange(tokens_per_prompt), b - a),
                    "row": np.arange(n),
                },
                first_prompt=a,
                n_prompts=b - a,
            )
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--block-rows", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    n, d = args.rows, args.d
    kw: dict[str, Any] = dict(run="r", hooks=HOOK, k=10, method="exact", project=False, save=False)
    times: dict[str, list[float]] = {}

    def timed(key: str, fn: Callable[[], Any]) -> None:
        t = time.perf_counter()
        fn()
        times.setdefault(key, []).append(time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        st = build(Path(tmp) / "s", n, d)
        X, _ = adask.to_dask(st, run="r", hooks=HOOK, block_rows=args.block_rows)
        # both clusters live side by side and the configurations take turns, so that a
        # change in the load other processes put on the machine hits them all alike
        with (
            adask.local_client(n_workers=1, threads_per_worker=1) as c1,
            adask.local_client(n_workers=2, threads_per_worker=1) as c2,
        ):
            clients = {1: c1, 2: c2}

            def run_local() -> None:
                local_pca(st, **kw, block_rows=args.block_rows)

            def run_pca(w: int) -> None:
                adask.pca(st, **kw, block_rows=args.block_rows, client=clients[w])

            def run_cov(w: int) -> None:
                Xs = X - 1.0
                dask.compute(Xs.T @ Xs, Xs.sum(axis=0), scheduler=clients[w])

            run_local()  # warm-up: the page cache, and the workers import their modules
            for w in clients:
                run_pca(w)
            for _ in range(args.repeats):
                timed("local", run_local)
                for w in clients:
                    timed(f"pca{w}", lambda w=w: run_pca(w))
                    timed(f"cov{w}", lambda w=w: run_cov(w))
        st.close()
    rows: list[dict[str, Any]] = [
        {"engine": "in-process", "workers": 1, "pca_s": min(times["local"]), "cov_s": None}
    ] + [
        {
            "engine": "dask",
            "workers": w,
            "pca_s": min(times[f"pca{w}"]),
            "cov_s": min(times[f"cov{w}"]),
        }
        for w in (1, 2)
    ]
    for r in rows:
        r["pca_rows_per_s"] = n / r["pca_s"]
        r["cov_rows_per_s"] = n / r["cov_s"] if r["cov_s"] else None
    one = next(r for r in rows if r["engine"] == "dask" and r["workers"] == 1)
    two = next(r for r in rows if r["engine"] == "dask" and r["workers"] == 2)
    result = {
        "rows": n,
        "d": d,
        "dtype": "float16",
        "block_rows": args.block_rows,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_after": os.getloadavg()[0],
        "results": rows,
        "pca_speedup_2_vs_1_workers": two["pca_rows_per_s"] / one["pca_rows_per_s"],
        "cov_speedup_2_vs_1_workers": two["cov_rows_per_s"] / one["cov_rows_per_s"],
    }
    print(f"PCA covariance, {n} rows x {d} float16, blocks of {args.block_rows} rows\n")
    print("| engine | workers | PCA rows/s | covariance pass rows/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        cov_rate = f"{r['cov_rows_per_s']:,.0f}" if r["cov_rows_per_s"] else "-"
        print(f"| {r['engine']} | {r['workers']} | {r['pca_rows_per_s']:,.0f} | {cov_rate} |")
    print(
        f"\n2 workers / 1 worker: PCA {result['pca_speedup_2_vs_1_workers']:.2f}x, "
        f"covariance pass {result['cov_speedup_2_vs_1_workers']:.2f}x"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
