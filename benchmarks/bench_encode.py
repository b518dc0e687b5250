"""Encode benchmark: ``Store.encode`` against ``sae.encode`` of the same rows in memory.

A (32768, 256) float16 run is written once, and a random sae_lens standard SAE
(d_sae 1024, encoder bias set so that ~2% of features fire: L0 ~ 20) saved. Paired rounds time

* ``sae.encode in memory``: the rows already in a float32 tensor, ``sae.encode``
  in the same blocks ``encode_sparse`` uses (the dense result, no sparsification);
* ``Store.encode``: the whole command into a fresh copy of the store: read and
  verify the rows, encode, extract the nonzeros, write zstd Parquet parts and
  commit them to the catalog (the SAE is loaded once per round, as the command does).

Rows/s are medians; the ratio says what the store's part costs on top of the
SAE's own arithmetic. Usage: ``python benchmarks/bench_encode.py [--rows 32768]
[--d 256] [--d-sae 1024] [--rounds 3]``. Writes ``benchmarks/results/encode.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import actstore
from actstore.store import objects

HERE = Path(__file__).resolve().parent
HOOK = "blocks.0.hook_resid_post"


def main() -> None:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        st = actstore.open(tmp / "store", create=True)
        objects.create_run(st, name="r", hooks={HOOK: (0, args.d)}, store_dtype="float16")
        x = np.random.default_rng(0).standard_normal((args.rows, args.d)).astype(np.float16)
        with st.writer("r") as w:
            w.append(
                arrays={HOOK: x},
                tokens={"prompt_idx": np.arange(args.rows), "row": np.arange(args.rows)},
                first_prompt=0,
                n_prompts=args.rows,
            )
        sae = StandardSAE(
            StandardSAEConfig(d_in=args.d, d_sae=args.d_sae, metadata=SAEMetadata(hook_name=HOOK))
        )
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.1)
            # pre-activations have std ~0.1 * sqrt(d); a bias of -2 std leaves ~2% of the
            # features active (L0 ~ 20 of 1024), a realistic sparsity
            sae.b_enc.fill_(-2.0 * 0.1 * args.d**0.5)
        sae.save_model(tmp / "sae")
        x_t = torch.from_numpy(x.astype(np.float32))
        block = max(1, (64 * 2**20) // (4 * args.d_sae))
        times: dict[str, list[float]] = {"sae.encode in memory": [], "Store.encode": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            t0 = time.perf_counter()
            with torch.inference_mode():
                for a in range(0, args.rows, block):
                    sae.encode(x_t[a : a + block])
            t1 = time.perf_counter()
            dst = tmp / f"copy{r}"
            shutil.copytree(tmp / "store", dst)
            t2 = time.perf_counter()
            res = actstore.open(dst).encode(str(tmp / "sae"))
            t3 = time.perf_counter()
            assert res[0].rows_encoded == args.rows
            l0 = res[0].nonzeros / args.rows
            if r:
                times["sae.encode in memory"].append(t1 - t0)
                times["Store.encode"].append(t3 - t2)
    rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
    base = rate["sae.encode in memory"]
    out = {
        "rows": args.rows,
        "d": args.d,
        "d_sae": args.d_sae,
        "dtype": "float16",
        "rounds": args.rounds,
        "l0": l0,
        "rows_per_s": rate,
        "ratio_vs_in_memory": {k: v / base for k, v in rate.items()},
        "seconds": times,
    }
    (HERE / "results" / "encode.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"L0 {l0:.1f}\n| encoder | rows/s | / in memory |\n|---|---:|---:|")
    for k, v in rate.items():
        print(f"| {k} | {v:,.0f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
