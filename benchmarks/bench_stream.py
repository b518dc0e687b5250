"""Training-stream benchmark: ``Store.batches`` against a raw memory-mapped read of the same rows.

A (262144, 768) float16 run (384 MiB) is written once; then, in paired rounds,

* ``memmap, shuffled blocks``: the same bytes in a raw ``np.memmap`` file, read in
  a block-shuffled order (256-row blocks, a random permutation), 16 blocks
  concatenated into each 4096-row batch and cast to a float32 torch tensor; no
  checksums, no shuffle buffer (the cheapest a block-shuffled stream can be);
* ``memmap, sequential``: the memmap read front to back in 4096-row batches;
* ``Store.batches`` (shuffle: 256-row blocks, 65536-row buffer) and
  ``Store.batches(shuffle=False)``, batch 4096, float32 tensors.

Both wall-clock and process CPU time are recorded (the ``cpu_`` entries): on a
shared, loaded machine wall time mostly measures the scheduler, while the
single-threaded (``torch.set_num_threads(1)``) CPU time of the same paired calls
measures what each reader costs. Each timed call streams 3 epochs (one ``Store.batches`` call, as a trainer
consumes it, so its setup, a few catalog reads, is paid once). Rows/s are the median of the paired rounds; the goal is ``Store.batches`` at
least 0.5x the shuffled memmap read (so that an SAE trainer never waits for the
store). The store's first pass verifies each chunk's crc32c; it is warmed up
once before timing, as a trainer's second epoch would be.

Usage: ``python benchmarks/bench_stream.py [--rows 262144] [--d 768] [--rounds 5]``.
Writes ``benchmarks/results/stream.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

import actstore
from actstore.store import objects

HERE = Path(__file__).resolve().parent
HOOK = "blocks.0.hook_resid_post"
BATCH, BLOCK = 4096, 256
EPOCHS = 3
"""Epochs per timed call: one stream, as a trainer consumes it (setup and first-touch costs amortised)."""


def build(root: Path, n: int, d: int) -> tuple[actstore.Store, np.memmap]:
    st = actstore.open(root / "store", create=True)
    objects.create_run(st, name="r", hooks={HOOK: (0, d)}, store_dtype="float16")
    rng = np.random.default_rng(0)
    raw = np.lib.format.open_memmap(root / "raw.npy", "w+", np.float16, (n, d))
    step = 16384
    with st.writer("r") as w:
        for a in range(0, n, step):
            x = rng.standard_normal((min(step, n - a), d)).astype(np.float16)
            raw[a : a + x.shape[0]] = x
            w.append(
                arrays={HOOK: x},
                tokens={"prompt_idx": np.arange(x.shape[0]) + a, "row": np.arange(x.shape[0])},
                first_prompt=a,
                n_prompts=x.shape[0],
            )
    raw.flush()
    return st, np.load(root / "raw.npy", mmap_mode="r")


def memmap_shuffled(raw: np.memmap, seed: int) -> Iterator[torch.Tensor]:
    n = raw.shape[0]
    for e in range(EPOCHS):
        order = np.random.default_rng([seed, e]).permutation(-(-n // BLOCK))
        per = BATCH // BLOCK
        for g in range(0, order.size, per):
            blocks = [raw[b * BLOCK : (b + 1) * BLOCK] for b in order[g : g + per]]
            yield torch.from_numpy(np.concatenate(blocks)).float()


def memmap_sequential(raw: np.memmap) -> Iterator[torch.Tensor]:
    for _ in range(EPOCHS):
        for a in range(0, raw.shape[0], BATCH):
            yield torch.from_numpy(np.array(raw[a : a + BATCH])).float()


def consume(stream: Iterable[torch.Tensor]) -> int:
    """Rows streamed, each batch held until the next arrives (as a training step holds it)."""
    total = 0
    for x_BD in stream:
        total += x_BD.shape[0]
    return total


def store_stream(st: actstore.Store, shuffle: bool, seed: int) -> int:
    return consume(st.batches("r", HOOK, BATCH, shuffle=shuffle, seed=seed, epochs=EPOCHS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        st, raw = build(Path(tmp), args.rows, args.d)
        cases = {
            "memmap, shuffled blocks": lambda s: consume(memmap_shuffled(raw, s)),
            "memmap, sequential": lambda s: consume(memmap_sequential(raw)),
            "Store.batches (block shuffle + buffer)": lambda s: store_stream(st, True, s),
            "Store.batches(shuffle=False)": lambda s: store_stream(st, False, s),
        }
        for fn in cases.values():  # warm: page cache, crc32c verification, imports
            assert fn(0) == EPOCHS * args.rows
        times: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        for r in range(args.rounds):
            for name, fn in cases.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn(r + 1)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    rate = {k: EPOCHS * args.rows / statistics.median(v) for k, v in times.items()}
    cpu_rate = {k: EPOCHS * args.rows / statistics.median(v) for k, v in cpu.items()}
    base, cpu_base = rate["memmap, shuffled blocks"], cpu_rate["memmap, shuffled blocks"]
    result = {
        "rows": args.rows,
        "d": args.d,
        "dtype": "float16",
        "batch_size": BATCH,
        "block_rows": BLOCK,
        "rounds": args.rounds,
        "epochs_per_call": EPOCHS,
        "rows_per_s": rate,
        "ratio_vs_shuffled_memmap": {k: v / base for k, v in rate.items()},
        "cpu_rows_per_s": cpu_rate,
        "cpu_ratio_vs_shuffled_memmap": {k: v / cpu_base for k, v in cpu_rate.items()},
        "seconds": times,
        "cpu_seconds": cpu,
    }
    out = HERE / "results" / "stream.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| reader | rows/s | / shuffled memmap | CPU rows/s | / shuffled memmap (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for k, v in rate.items():
        c = cpu_rate[k]
        print(f"| {k} | {v:,.0f} | {v / base:.2f}x | {c:,.0f} | {c / cpu_base:.2f}x |")


if __name__ == "__main__":
    main()
