"""Ingest against the bare forward pass and against the peers, in one paired, interleaved run.

A randomly initialised GPT-2-small-shape model (``GPT2LMHeadModel`` from a config: 12 layers x
768, vocabulary 50257, tied LM head; about 500 MB of safetensors; ``--layers``/``--width`` for
other shapes, e.g. ``--layers 24 --width 1024`` for GPT-2-medium) is saved to a local directory
with a word-level tokenizer. Every contender captures every layer's ``resid_post`` at every token
of the same token ids (``--prompts`` x ``--seq``, the first a BOS, no padding), in batches of
``--batch``, with the same torch thread count, and writes float16 to disk:

* ``bare body``: ``model.transformer(ids, use_cache=False)``, no capture, no final LM head, no
  KV cache filled (the least work a forward pass can do): **the baseline**;
* ``bare full``: ``model(ids, use_cache=False)``, the same with the LM head (logits);
* ``HF hidden states``: ``model(ids, output_hidden_states=True)`` + ``np.save`` of each layer
  (what a notebook does);
* ``nnsight``: ``NNsight(model).trace(ids)`` with ``model.transformer.h[l].output.save()`` for
  every layer + ``np.save``;
* ``TransformerLens``: ``HookedTransformer.run_with_cache(ids, names_filter=resid_post)`` +
  ``np.save``;
* ``SAELens``: ``CacheActivationsRunner`` offline (``override_dataset`` = a local pre-tokenized
  ``datasets.Dataset``, ``context_size``, ``model_class_name="AutoModelForCausalLM"``). It takes one
  hook per run and stops the model after it, so by default it is timed for ONE hook, the last
  layer's (a whole body pass): its row is per hook, not for all 12 layers. ``--saelens-hooks all``
  loops the runner over all 12 hooks (the model loaded once per hook, as a user's loop does);
* ``actstore ingest (CLI)``: ``python -m actstore.cli ingest job.toml`` (its run time is the
  ``seconds`` column it prints, 0.1 s resolution);

  (the peers run as their users call them, with the model's defaults: HF hidden states and
  nnsight, which calls the HF model, fill its KV cache; actstore's capture pass does not);
* ``actstore run_job``: ``run_job(IngestJob)`` in Python;
* ``actstore layers 0-3``: ``run_job`` capturing only ``blocks.0-3.hook_resid_post``.

Every contender runs in a fresh Python process (``peers_contenders.py``; so no allocator
setting, cache or import is shared), and the contenders alternate: round ``r`` starts at
contender ``r`` mod n. Per contender:

* ``loop s``: the capture itself, from the model loaded to the last byte written (for actstore
  the run's own time: prompt set, run record, forward passes, writes, commit);
* ``process s``: the whole process (interpreter start, imports, model load, capture);
* peak RSS (``wait4``), CPU user/system seconds, minor page faults, bytes on disk per value.

Ratios are the median over rounds of (contender / bare body in the same round). In the first
round each contender's output is checked against a plain torch forward with forward hooks on the
same batch (``peers_check.py``: bit-identical or the max difference), and actstore's stored
token ids against the ids given. Then a longer run in one process (``--pair-prompts``, default 256:
the run's fixed costs, a few tenths of a second, amortised): the bare body, the bare body inside
``heap.keep_heap_top`` (the heap settings the ingest runs its batches with) and ``run_job``,
``--pairs`` rounds after a warm-up round, the order reversed every other round; the median paired
ratios of ``run_job`` to each bare body. Then peak RSS of ``run_job`` against prompt count
(``--rss-prompts``).

Usage: ``python benchmarks/bench_peers.py`` (about 20-25 minutes on 2 cores), or
``--quick`` for a smoke run (16 prompts, one round; writes ``results/peers_quick.*``).
Writes ``benchmarks/results/peers.json`` and ``peers.md`` (the markdown table, also printed).
Needs the ``bench`` extra (``pip install -e '.[bench]'``: nnsight, TransformerLens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from peers_check import check, reference  # benchmarks/ is on sys.path when run as a script
from peers_contenders import RUN, du, job_dict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VOCAB = 50257

CONTENDERS = {
    "bare_body": "bare forward, transformer body only (baseline)",
    "bare_full": "bare forward including the LM head",
    "bare_body_adapted": "bare body, glibc's heap settings as actstore's ingest makes them",
    "hf_hidden": "HF `output_hidden_states` + `np.save`",
    "nnsight": "nnsight trace + `.save()` + `np.save`",
    "tlens": "TransformerLens `run_with_cache` + `np.save`",
    "saelens": "SAELens `CacheActivationsRunner`",
    "cli": "`actstore ingest` (CLI)",
    "run_job": "actstore `run_job` in Python",
    "layers03": "actstore `run_job`, layers 0-3 only",
}


# -- setup (parent) ------------------------------------------------------------------------------


def build_model(root: Path, n_layers: int, width: int, vocab: int) -> Path:
    """Save a random GPT-2-shape model (heads of 64) and a word tokenizer whose ids are the words."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from actstore.demo.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer([f"w{i}" for i in range(vocab - 4)])  # ids 4.. = w0..
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=1024,
        n_embd=width,
        n_layer=n_layers,
        n_head=width // 64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    d = root / "model"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def write_tokens(root: Path, n: int, seq: int, vocab: int, seed: int = 0) -> tuple[Path, Path]:
    """The token ids (``n`` x ``seq``, BOS first) as ``.npy`` and the same prompts as JSONL text."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(n, seq), dtype=np.int64)
    ids[:, 0] = 2  # <bos>, which the tokenizer prepends to each text
    npy = root / f"ids_{n}.npy"
    np.save(npy, ids)
    jsonl = root / f"prompts_{n}.jsonl"
    with jsonl.open("w") as f:
        for i, row in enumerate(ids):
            text = " ".join(f"w{t - 4}" for t in row[1:])
            f.write(json.dumps({"prompt": text, "i": i}) + "\n")
    return npy, jsonl


def job_toml(job: dict[str, Any]) -> str:
    q = json.dumps  # a JSON string is a TOML basic string
    c = job["capture"]
    return "\n".join(
        [
            f"store = {q(job['store'])}",
            "[model]",
            f"path = {q(job['model']['path'])}",
            f"device = {q(job['model']['device'])}",
            "[[prompts]]",
            f"name = {q(job['prompts'][0]['name'])}",
            f"path = {q(job['prompts'][0]['path'])}",
            "[capture]",
            f"hooks = [{', '.join(q(h) for h in c['hooks'])}]",
            f"store_dtype = {q(c['store_dtype'])}",
            f"batch_size = {c['batch_size']}",
            f"max_length = {c['max_length']}",
            "",
        ]
    )


def child_env(threads: int, root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(root / "hf_home"),
            "TQDM_DISABLE": "1",
        }
    )
    return env


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run a process to its end; wall seconds and its own rusage (peak RSS, CPU, faults)."""
    with log.open("w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {p.returncode}:\n{tail}")
    return {
        "process_s": wall,
        "peak_rss_mib": ru.ru_maxrss / 1024,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "minor_faults": ru.ru_minflt,
    }


def run_contender(name: str, spec: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    """One measurement of one contender in a fresh process; its output left in ``work``."""
    env = child_env(spec["threads"], Path(spec["root"]))
    work.mkdir(parents=True)
    res_path = work / "result.json"
    if name == "cli":
        job = job_dict(spec, work / "store", ["blocks.*.hook_resid_post"])
        (work / "job.toml").write_text(job_toml(job))
        cmd = [sys.executable, "-m", "actstore.cli", "ingest", str(work / "job.toml"), "--quiet"]
        got = spawn(cmd, env, log)
        rows = [ln.split() for ln in log.read_text().splitlines() if ln.startswith(RUN + " ")]
        if not rows:
            raise RuntimeError(f"actstore ingest printed no row for {RUN}:\n{log.read_text()}")
        got["loop_s"] = float(rows[0][-1])
        got["out_bytes"] = du(work / "store")
        got["values"] = spec["n"] * spec["seq"] * spec["layers"] * spec["d"]
        return got
    cfg = {**spec, "contender": name, "work": str(work), "result": str(res_path)}
    (work / "spec.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, str(HERE / "peers_contenders.py"), str(work / "spec.json")]
    got = spawn(cmd, env, log)
    got.update(json.loads(res_path.read_text()))
    return got


# -- the run ------------------------------------------------------------------------------------------


def rounds_run(spec: dict[str, Any], names: list[str], rounds: int, root: Path) -> dict[str, Any]:
    per: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    checks: dict[str, str] = {}
    ref = reference(spec)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            work = root / f"r{r}_{name}"
            got = run_contender(name, spec, work, root / f"r{r}_{name}.log")
            if r == 0:
                checks[name] = check(name, got, work, spec, ref)
            per[name].append(got)
            shutil.rmtree(work, ignore_errors=True)
            print(
                f"  round {r} {name:10s} loop {got['loop_s']:7.2f} s  process {got['process_s']:6.2f} s"
                f"  rss {got['peak_rss_mib']:6.0f} MiB",
                file=sys.stderr,
            )
    base = per["bare_body"]
    out = {}
    for name, runs in per.items():
        rss = [g["peak_rss_mib"] for g in runs]
        values = runs[0].get("values", 0)
        out[name] = {
            "label": CONTENDERS[name],
            "loop_s_median": statistics.median(g["loop_s"] for g in runs),
            "process_s_median": statistics.median(g["process_s"] for g in runs),
            "loop_over_bare_body": statistics.median(
                g["loop_s"] / b["loop_s"] for g, b in zip(runs, base, strict=True)
            ),
            "process_over_bare_body": statistics.median(
                g["process_s"] / b["process_s"] for g, b in zip(runs, base, strict=True)
            ),
            "loop_over_bare_body_adapted": statistics.median(
                g["loop_s"] / b["loop_s"]
                for g, b in zip(runs, per.get("bare_body_adapted", base), strict=True)
            ),
            "loop_over_bare_full": statistics.median(
                g["loop_s"] / b["loop_s"] for g, b in zip(runs, per["bare_full"], strict=True)
            ),
            "peak_rss_mib_median": statistics.median(rss),
            "sys_s_median": statistics.median(g["sys_s"] for g in runs),
            "minor_faults_median": statistics.median(g["minor_faults"] for g in runs),
            "bytes_per_value": (runs[0]["out_bytes"] / values) if values else None,
            "check": checks.get(name, ""),
            "runs": runs,
        }
    return out


def paired_run(spec: dict[str, Any], pairs: int, n: int, root: Path) -> dict[str, Any]:
    """Bare body and ``run_job`` over ``n`` prompts, alternating ``pairs`` times in one process."""
    npy, jsonl = write_tokens(root, n, spec["seq"], VOCAB, seed=2)
    s = {**spec, "n": n, "ids": str(npy), "prompts": str(jsonl), "pairs": pairs}
    work = root / "paired"
    got = run_contender("paired", s, work, root / "paired.log")
    shutil.rmtree(work, ignore_errors=True)
    ratios = [p["ratio"] for p in got["pairs"]]
    kept = [p["ratio_kept"] for p in got["pairs"]]
    print(f"  paired: run_job / bare body {[round(r, 3) for r in ratios]}", file=sys.stderr)
    print(f"  paired: run_job / bare body, kept top {[round(r, 3) for r in kept]}", file=sys.stderr)
    return {
        "prompts": n,
        "pairs": got["pairs"],
        "ratio_median": statistics.median(ratios),
        "ratio_kept_median": statistics.median(kept),
        "bare_body_s_median": statistics.median(p["bare_body_s"] for p in got["pairs"]),
        "bare_kept_s_median": statistics.median(p["bare_kept_s"] for p in got["pairs"]),
        "run_job_s_median": statistics.median(p["run_job_s"] for p in got["pairs"]),
    }


def rss_sweep(
    spec: dict[str, Any], counts: list[int], root: Path, measured: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Peak RSS of ``run_job`` (every layer) per prompt count; the rounds' own count reused."""
    res = []
    for n in counts:
        if n == spec["n"] and measured:  # already measured in the rounds: their median-RSS run
            got = sorted(measured, key=lambda g: g["peak_rss_mib"])[len(measured) // 2]
        else:
            npy, jsonl = write_tokens(root, n, spec["seq"], VOCAB, seed=1)
            s = {**spec, "n": n, "ids": str(npy), "prompts": str(jsonl)}
            work = root / f"rss_{n}"
            got = run_contender("run_job", s, work, root / f"rss_{n}.log")
            shutil.rmtree(work, ignore_errors=True)
        print(
            f"  rss {n:5d} prompts: {got['peak_rss_mib']:.0f} MiB, loop {got['loop_s']:.1f} s",
            file=sys.stderr,
        )
        res.append(
            {
                "prompts": n,
                "rows": got["rows"],
                "shard_rows": got["shard_rows"],
                "peak_rss_mib": got["peak_rss_mib"],
                "loop_s": got["loop_s"],
                "store_bytes": got["out_bytes"],
                "array_bytes": got["array_bytes"],
                "bytes_per_value": got["out_bytes"] / got["values"],
                "array_bytes_per_value": got["array_bytes"] / got["values"],
            }
        )
    return res


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    hooks_note = (
        f"all {a['layers']} hooks, one run each"
        if a["saelens_hooks"] == "all"
        else f"one hook per run: layer {a['layers'] - 1} only"
    )
    lines = [
        f"Random GPT-2 shape ({a['layers']} layers x {a['width']}, vocab {VOCAB}), {a['prompts']} prompts x "
        f"{a['seq']} tokens, batch {a['batch']}, {a['threads']} torch threads, every layer's `resid_post` "
        f"at every token, float16 on disk; {a['rounds']} interleaved rounds, one fresh process per "
        f"measurement{' (--quick)' if a['quick'] else ''}. Load average {res['machine']['load_avg_start'][0]:.2f} "
        f"at the start, {res['machine']['load_avg_end'][0]:.2f} at the end.\n",
        "| contender | capture s (median) | / bare body | / bare body, adapted heap | process s | / bare body | peak RSS MiB | bytes / value | values vs torch hooks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, c in res["contenders"].items():
        label = c["label"] + (f", {hooks_note}" if name == "saelens" else "")
        bpv = "" if c["bytes_per_value"] is None else f"{c['bytes_per_value']:.3f}"
        lines.append(
            f"| {label} | {c['loop_s_median']:.2f} | {c['loop_over_bare_body']:.2f}x | "
            f"{c['loop_over_bare_body_adapted']:.2f}x | "
            f"{c['process_s_median']:.1f} | {c['process_over_bare_body']:.2f}x | "
            f"{c['peak_rss_mib_median']:.0f} | {bpv} | {c['check']} |"
        )
    if "layers03" in res["contenders"]:
        lines.append(
            f"\nactstore layers 0-3 / bare full forward (LM head), median paired ratio: "
            f"{res['contenders']['layers03']['loop_over_bare_full']:.2f}x"
        )
    pr = res.get("paired")
    if pr:
        lines.append(
            f"\nA longer run, {pr['prompts']} prompts, in one process (the bare model loaded once, "
            f"`run_job` loading its own; a warm-up round first, then {len(pr['pairs'])} "
            f"rounds, the order reversed every other one): bare body "
            f"{pr['bare_body_s_median']:.2f} s, the bare body inside `heap.keep_heap_top` "
            f"(the ingest's heap settings) {pr['bare_kept_s_median']:.2f} s, `run_job` "
            f"{pr['run_job_s_median']:.2f} s (medians); `run_job` / bare body, median paired "
            f"ratio: {pr['ratio_median']:.3f}x (rounds: "
            + ", ".join(f"{p['ratio']:.3f}" for p in pr["pairs"])
            + f"); against the bare body with the ingest's heap settings: "
            f"{pr['ratio_kept_median']:.3f}x (rounds: "
            + ", ".join(f"{p['ratio_kept']:.3f}" for p in pr["pairs"])
            + ")"
        )
    lines.append("")
    lines.append(
        "| `run_job` prompts | rows | peak RSS MiB | capture s | store bytes / value | array bytes / value |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for m in res["rss"]:
        lines.append(
            f"| {m['prompts']} | {m['rows']} | {m['peak_rss_mib']:.0f} | {m['loop_s']:.1f} | "
            f"{m['bytes_per_value']:.4f} | {m['array_bytes_per_value']:.4f} |"
        )
    lines.append("\n| goal | measured | met |\n|---|---|---|")
    for k, (v, ok) in res["goals"].items():
        lines.append(f"| {k} | {v} | {'n/a' if ok is None else 'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def goals(
    c: dict[str, Any], rss: list[dict[str, Any]], paired: dict[str, Any] | None = None
) -> dict[str, tuple[str, bool | None]]:
    """Each acceptance goal of the issue: (what was measured, met; None where not measurable)."""
    ours = c["run_job"]["loop_s_median"]
    peers = ["hf_hidden", "nnsight", "tlens"] + (
        ["saelens"] if c["saelens"]["runs"][0].get("hooks_captured", 1) > 1 else []
    )
    g: dict[str, tuple[str, bool | None]] = {
        "`run_job` every layer <= 1.10x bare body (goal 1.05x)": (
            f"{c['run_job']['loop_over_bare_body']:.2f}x",
            c["run_job"]["loop_over_bare_body"] <= 1.10,
        ),
        "`run_job` every layer <= 1.10x bare body with the ingest's heap settings": (
            f"{c['run_job']['loop_over_bare_body_adapted']:.2f}x",
            c["run_job"]["loop_over_bare_body_adapted"] <= 1.10,
        ),
        "`actstore ingest` (CLI) every layer <= 1.10x bare body": (
            f"{c['cli']['loop_over_bare_body']:.2f}x",
            c["cli"]["loop_over_bare_body"] <= 1.10,
        ),
        **(
            {
                f"`run_job` every layer <= 1.10x bare body, {paired['prompts']} prompts in one "
                "process (paired)": (
                    f"{paired['ratio_median']:.3f}x",
                    paired["ratio_median"] <= 1.10,
                ),
                f"`run_job` every layer <= 1.10x bare body with the ingest's heap settings, "
                f"{paired['prompts']} prompts in one process (paired)": (
                    f"{paired['ratio_kept_median']:.3f}x",
                    paired["ratio_kept_median"] <= 1.10,
                ),
            }
            if paired
            else {}
        ),
        f"`run_job` ahead of every every-layer peer ({', '.join(peers)})": (
            ", ".join(f"{p} {c[p]['loop_s_median'] / ours:.2f}x ours" for p in peers),
            all(c[p]["loop_s_median"] > ours for p in peers),
        ),
        "layers 0-3 <= 0.5x bare full forward (LM head)": (
            f"{c['layers03']['loop_over_bare_full']:.2f}x",
            c["layers03"]["loop_over_bare_full"] <= 0.5,
        ),
        "layers 0-3 <= 0.5x bare body": (
            f"{c['layers03']['loop_over_bare_body']:.2f}x",
            c["layers03"]["loop_over_bare_body"] <= 0.5,
        ),
    }
    if len(rss) >= 2:
        # the writer holds up to a shard per hook: flat once a shard fills, so the two largest
        # prompt counts are compared, and only if the smaller already fills a shard
        hi, lo = rss[-1], rss[-2]
        key = f"peak RSS flat: {hi['prompts']} vs {lo['prompts']} prompts within 10%"
        if lo["rows"] < lo["shard_rows"]:
            g[key] = (f"n/a: {lo['rows']} rows is under one shard ({lo['shard_rows']})", None)
        else:
            g[key] = (
                f"{hi['peak_rss_mib']:.0f} vs {lo['peak_rss_mib']:.0f} MiB",
                hi["peak_rss_mib"] <= 1.10 * lo["peak_rss_mib"],
            )
    return g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 prompts, one round")
    ap.add_argument("--prompts", type=int, default=None, help="default 64 (quick 16)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument(
        "--width", type=int, default=768, help="d_model (heads of 64); 1024: GPT-2-medium"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (quick 1)")
    ap.add_argument(
        "--rss-prompts", default=None, help="comma-separated (default 64,256,768; quick 16,48)"
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="bare body / run_job pairs alternating in one process (default 4, quick 1; 0: none)",
    )
    ap.add_argument(
        "--pair-prompts",
        type=int,
        default=None,
        help="prompts of each paired run (default 256, quick 32): a longer run, fixed costs amortised",
    )
    ap.add_argument("--saelens-hooks", choices=["last", "all"], default="last")
    ap.add_argument(
        "--only", default=None, help="comma-separated contenders (bare_body always runs)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (temporary)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default results/peers.json (quick: peers_quick.json)",
    )
    args = ap.parse_args(argv)
    n = args.prompts or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 5)
    counts = [
        int(x) for x in (args.rss_prompts or ("16,48" if args.quick else "64,256,768")).split(",")
    ]
    names = list(CONTENDERS)
    if args.only:
        keep = {"bare_body", "bare_full", "bare_body_adapted", *args.only.split(",")}
        names = [k for k in names if k in keep]
    out = args.out or HERE / "results" / ("peers_quick.json" if args.quick else "peers.json")
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_peers_", dir=args.workdir))
    try:
        load0 = os.getloadavg()
        model = build_model(root, args.layers, args.width, VOCAB)
        npy, jsonl = write_tokens(root, n, args.seq, VOCAB)
        for f in model.iterdir():  # the model's bytes in the page cache for every contender alike
            f.read_bytes()
        spec = {
            "root": str(root),
            "model": str(model),
            "ids": str(npy),
            "prompts": str(jsonl),
            "n": n,
            "seq": args.seq,
            "batch": args.batch,
            "layers": args.layers,
            "d": args.width,
            "threads": args.threads,
            "saelens_hooks": args.saelens_hooks,
        }
        contenders = rounds_run(spec, names, rounds, root)
        n_pairs = args.pairs if args.pairs is not None else (1 if args.quick else 4)
        n_pp = args.pair_prompts or (32 if args.quick else 256)
        paired = paired_run(spec, n_pairs, n_pp, root) if n_pairs else None
        rss = rss_sweep(spec, counts, root, contenders.get("run_job", {}).get("runs", []))
        res: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "load_avg_start": load0,
                "load_avg_end": os.getloadavg(),
            },
            "args": {
                "quick": args.quick,
                "prompts": n,
                "seq": args.seq,
                "batch": args.batch,
                "layers": args.layers,
                "width": args.width,
                "threads": args.threads,
                "rounds": rounds,
                "saelens_hooks": args.saelens_hooks,
                "rss_prompts": counts,
            },
            "versions": versions(),
            "contenders": contenders,
            "paired": paired,
            "rss": rss,
        }
        if set(CONTENDERS) <= set(contenders):
            res["goals"] = goals(contenders, rss, paired)
        else:
            res["goals"] = {}
        res["total_s"] = time.perf_counter() - t_start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    md = markdown(res)
    print(md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out} and {out.with_suffix('.md')} in {res['total_s']:.0f} s", file=sys.stderr)
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    got = {}
    for p in ("torch", "transformers", "nnsight", "transformer-lens", "sae-lens", "datasets"):
        try:
            got[p] = version(p)
        except PackageNotFoundError:
            got[p] = "not installed"
    return got


if __name__ == "__main__":
    sys.exit(main())
