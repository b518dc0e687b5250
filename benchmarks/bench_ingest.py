"""Ingest benchmark: overhead over a bare forward pass, write throughput, peak memory, peers.

On a randomly initialised model of GPT-2-small shape (12 layers, d_model 768), capturing
every layer's ``resid_post`` at every token, in one run:

* ingest wall time / the bare forward pass over the same prompts and batch size (goal <= 1.05x);
* peak RSS of an ingest of N and of 2N prompts (memory must not grow with the prompts);
* store write throughput / a raw file write of the same bytes (goal >= 0.5);
* the same job with TransformerLens ``run_with_cache`` + ``np.save``, as a ratio.

Usage: ``python benchmarks/bench_ingest.py [--prompts 48] [--seq 64] [--batch 16]``.
Writes ``benchmarks/results/ingest.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def build(root: Path, n_layers: int, vocab: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from actstore.demo.tokenizer import build_word_tokenizer

    words = [f"w{i}" for i in range(vocab - 4)]
    tok = build_word_tokenizer(words)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=1024,
        n_embd=768,
        n_layer=n_layers,
        n_head=12,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    d = root / "gpt2small"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_prompts(path: Path, n: int, seq: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(n):
            words = [f"w{j}" for j in rng.integers(0, vocab - 4, seq - 1)]
            f.write(json.dumps({"prompt": " ".join(words), "i": i}) + "\n")


def job(root: Path, model: Path, prompts: Path, store: Path, batch: int) -> dict:
    return {
        "store": str(store),
        "model": {"path": str(model), "device": "cpu"},
        "prompts": [{"name": "p", "path": str(prompts)}],
        "capture": {
            "hooks": ["blocks.*.hook_resid_post"],
            "store_dtype": "float16",
            "batch_size": batch,
            "max_length": 4096,
        },
    }


def bare_forward(model_dir: Path, prompts: Path, batch: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["prompt"] for line in prompts.open()]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], return_tensors="pt", padding=True)
            model(**enc)
    return time.perf_counter() - t0


def tl_run_with_cache(model_dir: Path, prompts: Path, batch: int, out: Path) -> float:
    """The TransformerLens way: run_with_cache, then np.save each layer's resid_post."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
    )
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    tl.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["prompt"] for line in prompts.open()]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], return_tensors="pt", padding=True)
            _, cache = tl.run_with_cache(
                enc["input_ids"], names_filter=lambda n: n.endswith("hook_resid_post")
            )
            mask = enc["attention_mask"].bool()
            for name, acts in cache.items():
                np.save(out / f"{name}.{i}.npy", acts[mask].to(torch.float16).numpy())
    return time.perf_counter() - t0


INGEST = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
t0 = time.perf_counter()
s = run_job(IngestJob.from_dict(json.load(open(sys.argv[1]))), quiet=True)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": s.runs[0].seconds, "job_seconds": dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "bytes": s.runs[0].bytes, "rows": s.runs[0].rows}))
"""


def run_ingest(spec: dict, root: Path, threads: int) -> dict:
    p = root / f"job{time.monotonic_ns()}.json"
    p.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, "-c", INGEST, str(p), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def store_write_throughput(root: Path, rows: int, d: int) -> tuple[float, float]:
    """GB/s of RunWriter appends vs a raw file write of the same float16 bytes."""
    import pyarrow as pa

    import actstore
    from actstore.store import objects

    data = np.random.default_rng(0).standard_normal((rows, d)).astype(np.float16)
    batch = 1024
    warm = actstore.open(
        root / "warm", create=True
    )  # imports and first-use costs out of the timing
    objects.create_run(warm, name="r", hooks={"h": (0, d)})
    st = actstore.open(root / "wstore", create=True)
    ps = objects.add_prompt_set(
        st, name="p", table=pa.table({"text": [str(i) for i in range(rows // batch)]})
    )
    rid = objects.create_run(
        st, name="r", prompt_set_id=ps, hooks={"h": (0, d)}, store_dtype="float16"
    )
    t0 = time.perf_counter()
    with st.writer(rid) as w:
        for b in range(rows // batch):
            w.append(
                arrays={"h": data[b * batch : (b + 1) * batch]},
                tokens={
                    "prompt_idx": np.full(batch, b),
                    "position": np.arange(batch),
                    "row": np.arange(batch),
                },
                first_prompt=b,
                n_prompts=1,
            )
    store_s = time.perf_counter() - t0
    raw = root / "raw.bin"
    t0 = time.perf_counter()
    with raw.open("wb") as f:
        for b in range(rows // batch):
            f.write(data[b * batch : (b + 1) * batch].tobytes())
        f.flush()
        os.fsync(f.fileno())
    raw_s = time.perf_counter() - t0
    return data.nbytes / store_s / 1e9, data.nbytes / raw_s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 1000
    res: dict = {
        "prompts": args.prompts,
        "seq": args.seq,
        "batch": args.batch,
        "layers": args.layers,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build(root, args.layers, vocab)
        pr = root / "p.jsonl"
        write_prompts(pr, args.prompts, args.seq, vocab)
        pr2 = root / "p2.jsonl"
        write_prompts(pr2, 2 * args.prompts, args.seq, vocab)
        bare_forward(model, pr, args.batch)  # warm-up
        fwd = min(bare_forward(model, pr, args.batch) for _ in range(2))
        ing = [
            run_ingest(job(root, model, pr, root / f"s{i}", args.batch), root, args.threads)
            for i in range(2)
        ]
        # memory: the writer buffers at most a shard (16384 rows at d=768) per hook, so compare
        # N and 2N prompts past that point, on a 2-layer model of the same width (cheaper)
        small = build(root / "small", 2, vocab)
        big_n = 16384 * 2 // args.seq
        pm = root / "pm.jsonl"
        write_prompts(pm, big_n, args.seq, vocab)
        pm2 = root / "pm2.jsonl"
        write_prompts(pm2, 2 * big_n, args.seq, vocab)
        mem1 = run_ingest(job(root, small, pm, root / "m1", args.batch), root, args.threads)
        mem2 = run_ingest(job(root, small, pm2, root / "m2", args.batch), root, args.threads)
        tl = tl_run_with_cache(model, pr, args.batch, root / "tl")
        wr_store, wr_raw = store_write_throughput(root, 131072, 768)
    best = min(ing, key=lambda r: r["seconds"])
    res.update(
        {
            "bare_forward_s": fwd,
            "ingest_s": best["seconds"],
            "ingest_over_forward": best["seconds"] / fwd,
            "tl_run_with_cache_np_save_s": tl,
            "tl_over_ingest": tl / best["seconds"],
            "rss_rows_N": mem1["rows"],
            "peak_rss_mb_N": mem1["rss_mb"],
            "rss_rows_2N": mem2["rows"],
            "peak_rss_mb_2N": mem2["rss_mb"],
            "store_bytes": best["bytes"],
            "rows": best["rows"],
            "store_write_gbps": wr_store,
            "raw_write_gbps": wr_raw,
            "write_ratio": wr_store / wr_raw,
        }
    )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "ingest.json").write_text(json.dumps(res, indent=2))
    print("| measure | value |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
