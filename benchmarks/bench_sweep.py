"""Benchmark a sweep: k settings in one ``run_sweep`` (one model load) vs k ``run_edited`` calls.

Builds a randomly initialised GPT-2 (``--layers`` x 768, word-level vocabulary of 1000),
a prompt file with a ``triggered`` label, ingests the unedited parent once, then runs a
``steer`` over ``--k`` values of alpha on the clean prompts (``where = "NOT triggered"``,
``positions = "after:w1"``, greedy ``--new`` tokens) two ways into two fresh copies of
the store: one sweep, and one ``run_edited`` per setting. It reports both wall times, their
ratio, and the time of one model load, and checks that both ways stored the same completions.

Example
-------
.venv/bin/python benchmarks/bench_sweep.py --k 5 --layers 12
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import actstore
from actstore.edits import run_edited
from actstore.edits.sweep import Sweep, run_sweep
from actstore.ingest.job import IngestJob
from actstore.ingest.models import load_checkpoint
from actstore.ingest.runner import run_job

HOOK = "blocks.6.hook_resid_post"


def build(root: Path, n_layers: int, vocab: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from actstore.demo.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([f"w{i}" for i in range(vocab - 4)])
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=768, n_layer=n_layers, n_head=12,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    d = root / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=5, help="settings (alpha values)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--new", type=int, default=8, help="tokens generated per prompt")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build(root, args.layers, 1000)
        rng = np.random.default_rng(0)
        with (root / "p.jsonl").open("w") as f:
            for i in range(args.prompts):
                words = " ".join(f"w{j}" for j in rng.integers(0, 990, args.seq))
                f.write(json.dumps({"prompt": "w1 " + words, "triggered": i % 2 == 0}) + "\n")
        np.save(root / "v.npy", rng.standard_normal(768).astype(np.float32))
        job = IngestJob.from_dict(
            {
                "store": str(root / "base"),
                "model": {"path": str(model), "name": "gpt2", "device": "cpu"},
                "prompts": [{"name": "p", "path": str(root / "p.jsonl")}],
                "capture": {"hooks": [HOOK], "positions": "last", "batch_size": 32},
                "generate": {"max_new_tokens": args.new},
                "scorers": [{"name": "w5", "regex": r"\bw5\b"}],
            }
        )
        run_job(job, quiet=True)  # the unedited parent (not timed)
        alphas = [float(a) for a in range(args.k)]
        spec = {
            "name": "steer",
            "where": "NOT triggered",
            "ops": [
                {"kind": "steer", "hook": HOOK, "file": str(root / "v.npy"),
                 "alpha": alphas, "positions": "after:w1"}
            ],
        }  # fmt: skip
        for name in ("sweep", "separate"):
            shutil.copytree(root / "base", root / name)
        t0 = time.perf_counter()
        run_sweep(job, spec, quiet=True, store=str(root / "sweep"))
        t_sweep = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _, one in Sweep.from_dict(spec).settings():
            run_edited(job, one, quiet=True, store=str(root / "separate"))
        t_separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_checkpoint(str(model))
        t_load = time.perf_counter() - t0
        gens = [
            actstore.open(root / name)
            .sql("SELECT r.name, g.prompt_idx, g.token_ids FROM generations g JOIN runs r "
                 "USING (run_id) ORDER BY 1, 2")
            .fetchall()
            for name in ("sweep", "separate")
        ]  # fmt: skip
        assert gens[0] == gens[1], "a sweep must store what separate runs store"
    res = {
        "k": args.k,
        "prompts": args.prompts,
        "new_tokens": args.new,
        "layers": args.layers,
        "sweep_s": round(t_sweep, 2),
        "separate_s": round(t_separate, 2),
        "separate_over_sweep": round(t_separate / t_sweep, 2),
        "one_load_s": round(t_load, 2),
    }
    print(json.dumps(res, indent=1))
    out = Path(__file__).parent / "results" / "sweep.json"
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
