"""Reads through the public API: ``Store.acts`` against a raw ``np.memmap`` of the same bytes.

A (65536, 4096) float16 run (512 MiB, the store's default layout) and a raw
``.npy`` copy of it are written once; ~10,000 scattered rows are picked by the
predicate ``token_id < ?``. Timed, interleaved round by round so that load from
other processes hits every method alike (each round's time is the best of 3
back-to-back calls):

* ``raw memmap``: ``mm[rows]`` (rows known in advance: no catalog, no checks);
* ``Store.acts(rows=...)``: the public call, catalog lookup included (cached per
  commit), values read from the memory-mapped shards (chunks verified once);
* the same with ``.meta`` (the rows' ``labeled_tokens`` metadata) fetched;
* ``SQL + raw memmap``: the same rows selected by ``Store.sql``, then ``mm[rows]``;
* ``Store.acts(where=...)``, with and without ``.meta``.

First use, in fresh processes (imports done before the clock starts; page cache
warm): ``np.load(mmap_mode="r")`` + the gather against ``actstore.open`` + one
``Store.acts(rows=...)``, which verifies the crc32c of every chunk it touches
(here nearly all 512 MiB). And a new ``Store`` in a warm process (shards verified
already). Ratios are medians of per-round ratios. CPU time (``process_time``,
which counts DuckDB's threads too) is reported beside wall time, as it is less
disturbed by other processes on a shared machine.

Usage: ``python benchmarks/bench_reads.py [--rows 65536] [--d 4096] [--rounds 9]``.
Writes ``benchmarks/results/reads.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import actstore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_queries import build_array_store  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
RUN = "rows/run"
WHERE = "token_id < ?"

FIRST_USE = """
import sys, time, numpy as np
rows = np.load(sys.argv[2])
if sys.argv[3] == "memmap":
    t0, c0 = time.perf_counter(), time.process_time()
    mm = np.load(sys.argv[1] + "/raw.npy", mmap_mode="r")
    x = mm[rows]
else:
    import actstore
    t0, c0 = time.perf_counter(), time.process_time()
    x = actstore.open(sys.argv[1]).acts("rows/run", "blocks.0.hook_resid_post", rows=rows).numpy()
print(time.perf_counter() - t0, time.process_time() - c0, float(x[:, 0].astype(np.float64).sum()))
"""


def timed(fn: Callable[[], Any], inner: int = 3) -> tuple[float, float]:
    """Best wall and best CPU seconds of ``inner`` back-to-back calls."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(inner):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def first_use(path: Path, rows_file: Path, which: str) -> tuple[float, float, float]:
    out = subprocess.run(
        [sys.executable, "-c", FIRST_USE, str(path), str(rows_file), which],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def ratio(times: dict[str, list[tuple[float, float]]], ours: str, base: str, k: int) -> float:
    return statistics.median(a[k] / b[k] for a, b in zip(times[ours], times[base], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--want", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows"
        raw_path = build_array_store(path, args.rows, args.d)
        st = actstore.open(path)
        cut = round(1000 * args.want / args.rows)
        sel = st.sql(
            f'SELECT "row" FROM labeled_tokens WHERE run = ? AND {WHERE} ORDER BY "row"',
            [RUN, cut],
        )
        rows = sel.arrow().column("row").to_numpy().astype(np.int64)
        rows_file = Path(tmp) / "rows.npy"
        np.save(rows_file, rows)
        mm = np.load(raw_path, mmap_mode="r")
        assert np.array_equal(st.acts(RUN, HOOK, rows=rows).numpy(), mm[rows])
        assert np.array_equal(st.acts(RUN, HOOK, where=WHERE, params=[cut]).rows, rows)

        def sql_memmap() -> np.ndarray:
            got = st.sql(
                f'SELECT "row" FROM labeled_tokens WHERE run = ? AND {WHERE} ORDER BY "row"',
                [RUN, cut],
            )
            return mm[got.arrow().column("row").to_numpy()]

        warm: dict[str, Callable[[], Any]] = {
            "raw memmap": lambda: mm[rows],
            "Store.acts(rows=...)": lambda: st.acts(RUN, HOOK, rows=rows).numpy(),
            "Store.acts(rows=...) + .meta": lambda: st.acts(RUN, HOOK, rows=rows).meta,
            "SQL + raw memmap": sql_memmap,
            "Store.acts(where=...)": lambda: st.acts(RUN, HOOK, where=WHERE, params=[cut]).numpy(),
            "Store.acts(where=...) + .meta": lambda: (
                st.acts(RUN, HOOK, where=WHERE, params=[cut]).meta
            ),
            "new Store + Store.acts(rows=...) (warm process)": lambda: (
                actstore.open(path).acts(RUN, HOOK, rows=rows).numpy()
            ),
        }
        cold = {"first use: raw memmap": "memmap", "first use: Store.acts(rows=...)": "store"}
        for fn in warm.values():
            fn()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in [*warm, *cold]}
        for _ in range(args.rounds):
            for name, fn in warm.items():
                times[name].append(timed(fn))
            for name, which in cold.items():
                wall, cpu, _ = first_use(path, rows_file, which)
                times[name].append((wall, cpu))
        st.close()
    pairs = {
        "Store.acts(rows=...)": "raw memmap",
        "Store.acts(rows=...) + .meta": "raw memmap",
        "Store.acts(where=...)": "raw memmap",
        "Store.acts(where=...) + .meta": "raw memmap",
        "SQL + raw memmap": "raw memmap",
        "new Store + Store.acts(rows=...) (warm process)": "raw memmap",
        "first use: Store.acts(rows=...)": "first use: raw memmap",
    }
    result = {
        "shape": [args.rows, args.d],
        "dtype": "float16",
        "rows_read": int(rows.size),
        "rounds": args.rounds,
        "median_ms": {
            k: {
                "wall": 1e3 * statistics.median(t[0] for t in v),
                "cpu": 1e3 * statistics.median(t[1] for t in v),
            }
            for k, v in times.items()
        },
        "ratio": {
            k: {"baseline": b, "wall": ratio(times, k, b, 0), "cpu": ratio(times, k, b, 1)}
            for k, b in pairs.items()
        },
        "seconds": times,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "reads.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{rows.size:,} rows of a {tuple(result['shape'])} float16 run, median of {args.rounds} rounds\n"
    )
    print("| read | wall ms | CPU ms | / baseline (wall, CPU) |\n|---|---:|---:|---:|")
    for k, v in result["median_ms"].items():
        r = result["ratio"].get(k)
        rel = f"{r['wall']:.2f}x, {r['cpu']:.2f}x (vs {r['baseline']})" if r else "1"
        print(f"| {k} | {v['wall']:.1f} | {v['cpu']:.1f} | {rel} |")


if __name__ == "__main__":
    main()
