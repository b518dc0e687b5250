"""Write benchmark: store write throughput against a raw file write of the same bytes.

A (262144, 768) float16 array (384 MiB) is written in 1024-row batches, in one
process, several times over, by:

* ``RunWriter``: ``RunWriter.append`` batch by batch, as an ingest does (the
  writer streams each shard's inner chunks to the shard's file straight from the
  batches that complete them, ``shardio.ShardStream``, and commits each shard's batches to the
  catalog); the time its array writes and its catalog commits take is recorded too;
* ``write_rows``: ``arrays.write_rows`` of one whole shard at a time (the array
  write alone, without the writer's buffering and catalog commits);
* the same two with the direct shard writer (``actstore.store.shardio``) turned
  off, so every shard goes through zarr's sharding codec (``(zarr)`` rows);
* ``raw``: ``file.write`` of each batch's bytes to one file (page cache, no fsync:
  the durability the store's array files have too);
* ``raw+fsync``: the same followed by ``os.fsync`` (what ``bench_ingest.py`` compares to).

Each repeat runs every writer once, in turn, each into a fresh directory that is
removed afterwards, after an ``os.sync`` so that no writer pays for the
write-back of another's files. The goal is ``RunWriter`` / ``raw`` >= 0.5.

Usage: ``python benchmarks/bench_write.py [--rows 262144] [--d 768] [--repeats 5]``.
Writes ``benchmarks/results/write.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

import actstore
from actstore.store import arrays, objects, shardio
from actstore.store.writer import RunWriter

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def zarr_only(on: bool) -> Iterator[None]:
    """While ``on``, no array counts as raw-sharded: every write goes through zarr."""
    real = shardio.raw_layout
    if on:
        shardio.raw_layout = lambda arr: None
    try:
        yield
    finally:
        shardio.raw_layout = real


@contextlib.contextmanager
def timed(owner: Any, name: str, spent: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in ``owner.name`` to ``spent[key]`` while in the block."""
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t0

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, real)


def run_writer(
    root: Path, data_ND: np.ndarray, batch: int, *, zarr: bool = False, parts: dict | None = None
) -> float:
    """Seconds to append ``data_ND`` to a new run through ``RunWriter``."""
    n, d = data_ND.shape
    st = actstore.open(root / "store", create=True)
    ps = objects.add_prompt_set(
        st, name="p", table=pa.table({"text": [str(i) for i in range(n // batch)]})
    )
    rid = objects.create_run(
        st, name="r", prompt_set_id=ps, hooks={"h": (0, d)}, store_dtype="float16"
    )
    spent = {"array_writes": 0.0, "catalog_commits": 0.0}
    with (
        zarr_only(zarr),
        timed(arrays, "write_rows", spent, "array_writes"),
        timed(shardio.ShardStream, "append", spent, "array_writes"),
        timed(shardio.ShardStream, "snapshot", spent, "array_writes"),
        timed(shardio.ShardStream, "finish", spent, "array_writes"),
        timed(RunWriter, "_commit", spent, "catalog_commits"),
    ):
        t0 = time.perf_counter()
        with st.writer(rid) as w:
            for b in range(n // batch):
                w.append(
                    arrays={"h": data_ND[b * batch : (b + 1) * batch]},
                    tokens={
                        "prompt_idx": np.full(batch, b),
                        "position": np.arange(batch),
                        "row": np.arange(batch),
                    },
                    first_prompt=b,
                    n_prompts=1,
                )
        seconds = time.perf_counter() - t0
    if parts is not None:
        for k, v in spent.items():
            parts.setdefault(k, []).append(v)
    got = st.acts("r", "h").numpy()
    if not np.array_equal(got.view(np.uint16), data_ND.view(np.uint16)):
        raise AssertionError("RunWriter: the store does not read back what was written")
    return seconds


def shard_writes(root: Path, data_ND: np.ndarray, batch: int, *, zarr: bool = False) -> float:
    """Seconds to write ``data_ND`` with ``arrays.write_rows``, one whole shard at a time."""
    n, d = data_ND.shape
    arr = arrays.create_array(root, "a", d=d, dtype="float16", capacity=n)
    shard = arr.shards[0] if arr.shards else arr.chunks[0]
    with zarr_only(zarr):
        t0 = time.perf_counter()
        for a in range(0, n, shard):
            arrays.write_rows(arr, a, data_ND[a : a + shard])
        return time.perf_counter() - t0


def raw_write(root: Path, data_ND: np.ndarray, batch: int, *, fsync: bool = False) -> float:
    """Seconds to write the bytes of ``data_ND`` to one file, batch by batch."""
    t0 = time.perf_counter()
    with (root / "raw.bin").open("wb") as f:
        for a in range(0, data_ND.shape[0], batch):
            f.write(data_ND[a : a + batch].data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "write.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data_ND = rng.standard_normal((args.rows, args.d), dtype=np.float32).astype(np.float16)
    gb = data_ND.nbytes / 1e9
    parts: dict[str, list[float]] = {}
    writers: dict[str, Callable[[Path, np.ndarray, int], float]] = {
        "RunWriter": partial(run_writer, parts=parts),
        "RunWriter (zarr)": partial(run_writer, zarr=True),
        "write_rows": shard_writes,
        "write_rows (zarr)": partial(shard_writes, zarr=True),
        "raw": raw_write,
        "raw+fsync": partial(raw_write, fsync=True),
    }
    seconds: dict[str, list[float]] = {k: [] for k in writers}
    with tempfile.TemporaryDirectory() as tmp:
        # first-use costs (imports, DuckDB, zarr) out of the timings
        small = data_ND[: 4 * args.batch]
        for fn in writers.values():
            fn(Path(tempfile.mkdtemp(dir=tmp)), small, args.batch)
        parts.clear()
        for _ in range(args.repeats):
            for k, fn in writers.items():
                root = Path(tempfile.mkdtemp(dir=tmp))
                os.sync()
                seconds[k].append(fn(root, data_ND, args.batch))
                shutil.rmtree(root)
    best = {k: gb / min(v) for k, v in seconds.items()}
    median = {k: gb / statistics.median(v) for k, v in seconds.items()}
    res = {
        "rows": args.rows,
        "d": args.d,
        "dtype": "float16",
        "batch": args.batch,
        "bytes": data_ND.nbytes,
        "repeats": args.repeats,
        "seconds": seconds,
        "runwriter_seconds_in": parts,
        "best_gbps": best,
        "median_gbps": median,
        "ratio_runwriter_over_raw": best["RunWriter"] / best["raw"],
        "ratio_runwriter_over_raw_fsync": best["RunWriter"] / best["raw+fsync"],
        "ratio_write_rows_over_raw": best["write_rows"] / best["raw"],
        "ratio_write_rows_zarr_over_raw": best["write_rows (zarr)"] / best["raw"],
        "median_ratio_runwriter_over_raw": median["RunWriter"] / median["raw"],
        "median_ratio_write_rows_over_raw": median["write_rows"] / median["raw"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"({args.rows}, {args.d}) float16, {gb:.3f} GB, {args.batch}-row batches")
    print("| writer | best GB/s | median GB/s | best / raw best | median / raw median |")
    print("|---|---|---|---|---|")
    for k in writers:
        print(
            f"| {k} | {best[k]:.3f} | {median[k]:.3f} | {best[k] / best['raw']:.2f} "
            f"| {median[k] / median['raw']:.2f} |"
        )
    total = statistics.median(seconds["RunWriter"])
    print(
        "\nRunWriter (median seconds): "
        + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in parts.items())
        + f", total {total:.3f}"
    )


if __name__ == "__main__":
    main()
