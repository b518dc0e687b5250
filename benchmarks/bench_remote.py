"""Benchmark a store in S3 against the same store on local disk.

Starts an S3-compatible server on loopback (``moto.server``, a separate process),
writes the same synthetic float16 run (``--rows`` x ``--d``, batches of 32768 rows)
into a local directory and into ``s3://``, then times, on each:

* **write**: appending the run through ``Store.writer`` (arrays, tokens, commits);
* **SQL**: one small catalog statement (``SELECT count(*) FROM tokens``), warm
  (within ``RemoteCatalog.refresh`` of the last listing), and with the newest
  generation looked up first (a LIST request for S3; nothing for a local store);
* **random rows**: ``Store.acts(rows=...)`` of ``--sample`` rows chosen at random;
* **scan**: the in-process exact PCA over every row (one streamed pass).

Each figure is the best of ``--repeats`` runs; the ratio is S3 time / local time.
Loopback moto is not AWS (no network latency, a Python server): read the ratios as
the cost of going through fsspec and the catalog protocol, not as S3's speed.
Prints a markdown table and writes ``benchmarks/results/remote.json``.

Example
-------
.venv/bin/python benchmarks/bench_remote.py --rows 131072 --d 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import actstore
from actstore.analysis.pca import pca

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from bench_dask import HOOK, build  # noqa: E402

from tests.helpers.s3 import ENV, environment, moto_server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "remote.json"


def best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(url: str, rows: int, d: int, sample: np.ndarray, repeats: int) -> dict[str, float]:
    """Seconds of each operation on the store at ``url`` (written here first)."""
    kw: dict[str, Any] = dict(run="r", hooks=HOOK, k=10, method="exact", project=False, save=False)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    build(url, rows, d)  # type: ignore[arg-type]
    t["write"] = time.perf_counter() - t0
    st = actstore.open(url, read_only=True)
    st.sql("SELECT 1").fetchall()  # warm: the catalog generation is cached
    t["sql"] = best(lambda: st.sql("SELECT count(*) FROM tokens").fetchall(), 10)
    if hasattr(st.catalog, "refresh"):
        st.catalog.refresh = 0.0  # list the generations before every statement
    t["sql_fresh"] = best(lambda: st.sql("SELECT count(*) FROM tokens").fetchall(), 10)
    t["rows"] = best(lambda: st.acts("r", HOOK, rows=sample).numpy(), repeats)
    t["scan"] = best(lambda: pca(st, **kw), repeats)
    st.close()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--sample", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(args.rows, size=min(args.sample, args.rows), replace=False))
    out: dict[str, dict[str, float]] = {}
    with (
        moto_server() as endpoint,
        tempfile.TemporaryDirectory() as tmp,
        environment({**ENV, "AWS_ENDPOINT_URL": endpoint, "ACTSTORE_CACHE": f"{tmp}/cache"}),
    ):
        import s3fs

        s3fs.S3FileSystem().mkdir("bench")
        for where, url in [("local", f"{tmp}/s"), ("s3", "s3://bench/s")]:
            out[where] = measure(url, args.rows, args.d, sample, args.repeats)
    mb = args.rows * args.d * 2 / 1e6
    result = {
        "rows": args.rows,
        "d": args.d,
        "dtype": "float16",
        "sample": int(sample.size),
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "seconds": out,
        "ratio_s3_over_local": {k: out["s3"][k] / out["local"][k] for k in out["local"]},
    }
    print(f"{args.rows} rows x {args.d} float16 ({mb:.0f} MB), S3 = moto on loopback\n")
    print("| operation | local | S3 | S3 / local |")
    print("|---|---:|---:|---:|")
    labels = {
        "write": "write the run",
        "sql": "one catalog statement (warm)",
        "sql_fresh": "one catalog statement, newest generation looked up",
        "rows": f"{sample.size} random rows",
        "scan": "PCA scan of every row",
    }
    for k, label in labels.items():
        lo, s3 = out["local"][k], out["s3"][k]
        print(f"| {label} | {lo * 1e3:,.1f} ms | {s3 * 1e3:,.1f} ms | {s3 / lo:.1f}x |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
