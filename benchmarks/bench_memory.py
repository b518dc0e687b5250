"""Ingest memory and allocator cost: peak RSS against the number of prompts, page faults, system time.

On a randomly initialised model of GPT-2-small shape (12 layers x 768), capturing every layer's
``resid_post`` at every token, float16 on disk, batch 16 (the conditions of ``bench_ingest.py``),
each ingest runs in a fresh process and reports its peak RSS (``ru_maxrss``), minor page faults
and user/system CPU time. Five allocator settings, in the same run:

* ``default`` (what ``run_job`` does): glibc's thresholds adapted as the ingest starts
  (``heap.adapt_thresholds``); the heap's freed top kept between batches
  (``heap.keep_heap_top``: glibc does not trim it on free); and the writer's heap bound
  (``actstore.store.heap``): freed heap pages go back to the OS (``malloc_trim``) whenever
  resident memory grew 256 MiB past its level (measured after the first batch, and after the
  first batch following each release);
* ``top_trimmed``: the same, but glibc trims the heap's top whenever more than 64 MiB is free
  there (what ``run_job`` did before ``keep_heap_top``);
* ``unadapted``: the heap bound alone: glibc's adaptive mmap and trim thresholds left at their
  initial 128 KiB / 256 KiB until a large block happens to be freed, the top not kept;
* ``unbounded``: thresholds adapted and the top kept, no heap bound (freed pages are never given
  back);
* ``mmap_4mib``: ``mallopt(M_MMAP_THRESHOLD, 4 MiB)`` set for the whole process first, the
  setting the runner used to make, which turns every tensor over 4 MiB into a fresh mapping
  that the kernel faults in and zeroes.

Peak RSS must not grow with the prompts: the writer streams each shard to its file straight
from the batches (one inner chunk per hook held), and the heap bound returns what the
batches free.

Usage: ``python benchmarks/bench_memory.py [--counts 256,512,1024] [--seq 64] [--batch 16]``.
Writes ``benchmarks/results/memory.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_ingest import build, job, write_prompts  # noqa: E402

INGEST = """
import ctypes, ctypes.util, json, resource, sys, time
if sys.argv[3] == "mmap_4mib":
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 4 << 20)
import actstore.store.heap
if sys.argv[3] in ("mmap_4mib", "unbounded"):  # no heap bound: nothing released
    actstore.store.heap.DEFAULT_SLACK = 1 << 60
if sys.argv[3] == "unadapted":  # the heap bound, glibc's thresholds left where they start
    actstore.store.heap._adapted = True
import torch
torch.set_num_threads(int(sys.argv[2]))
from actstore.ingest.job import IngestJob
from actstore.ingest import runner
from actstore.ingest.runner import run_job
if sys.argv[3] == "top_trimmed":  # glibc gives the heap's freed top back on free, as it did
    import contextlib
    runner.keep_heap_top = lambda: contextlib.nullcontext(False)
t0 = time.perf_counter()
s = run_job(IngestJob.from_dict(json.load(open(sys.argv[1]))), quiet=True)
dt = time.perf_counter() - t0
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": s.runs[0].seconds, "job_seconds": dt, "rows": s.runs[0].rows,
                  "peak_rss_mb": u.ru_maxrss / 1024, "minor_faults": u.ru_minflt,
                  "user_s": u.ru_utime, "system_s": u.ru_stime}))
"""


def run_one(spec: dict, root: Path, threads: int, malloc: str) -> dict:
    p = root / f"job-{malloc}-{len(list(root.iterdir()))}.json"
    p.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, "-c", INGEST, str(p), str(threads), malloc],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="256,512,1024", help="prompt counts, comma-separated")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--malloc",
        default="default,top_trimmed,unadapted,unbounded,mmap_4mib",
        help="allocator settings to run",
    )
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    settings = args.malloc.split(",")
    vocab = 1000
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build(root, args.layers, vocab)
        for n in counts:
            pr = root / f"p{n}.jsonl"
            write_prompts(pr, n, args.seq, vocab)
            for m in settings:  # interleaved: the settings see the same machine load
                store = root / f"s-{m}-{n}"
                r = run_one(job(root, model, pr, store, args.batch), root, args.threads, m)
                rows.append({"malloc": m, "prompts": n, **r})
                print(json.dumps(rows[-1]), file=sys.stderr)
    res = {"seq": args.seq, "batch": args.batch, "layers": args.layers, "runs": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory.json").write_text(json.dumps(res, indent=2))
    print(
        "| malloc | prompts | rows | peak RSS MiB | minor faults | system s | user s | ingest s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['malloc']} | {r['prompts']} | {r['rows']} | {r['peak_rss_mb']:.0f} | "
            f"{r['minor_faults']:,} | {r['system_s']:.1f} | {r['user_s']:.1f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
