"""The contenders of ``bench_peers.py``, each run in a fresh process: ``python peers_contenders.py SPEC``.

Each reads its job (model directory, token ids, batch, threads, where to write) from the JSON
``SPEC``, loads the model, times its capture loop and writes ``{"loop_s": ..., ...}`` to the
spec's ``result`` path. See ``bench_peers.py`` for what each contender does.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RUN = "main/p"  # actstore's run name: checkpoint label / prompt set name


def job_dict(spec: dict[str, Any], store: Path, hooks: list[str]) -> dict[str, Any]:
    return {
        "store": str(store),
        "model": {"path": spec["model"], "device": "cpu"},
        "prompts": [{"name": "p", "path": spec["prompts"]}],
        "capture": {
            "hooks": hooks,
            "store_dtype": "float16",
            "batch_size": spec["batch"],
            "max_length": spec["seq"] + 8,
        },
    }


def du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- contenders -------------------------------------------------------------------------


def _model_and_ids(cfg: dict[str, Any]) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cfg["threads"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]).eval()
    ids = torch.from_numpy(np.load(cfg["ids"]))
    return model, ids


def _batches(ids: Any, batch: int) -> list[Any]:
    return [ids[i : i + batch] for i in range(0, len(ids), batch)]


def _save(out: Path, layer: int, b: int, acts_BSD: Any) -> None:
    import torch

    np.save(
        out / f"L{layer}_b{b}.npy",
        acts_BSD.to(torch.float16).reshape(-1, acts_BSD.shape[-1]).numpy(),
    )


def child_bare(cfg: dict[str, Any], full: bool, adapted: bool = False) -> dict[str, Any]:
    from contextlib import nullcontext

    import torch

    from actstore.store.heap import adapt_thresholds, keep_heap_top

    if adapted:  # glibc's heap settings where actstore's ingest puts them
        adapt_thresholds()
    model, ids = _model_and_ids(cfg)
    run = model if full else model.transformer
    t0 = time.perf_counter()
    with torch.inference_mode(), keep_heap_top() if adapted else nullcontext():
        for x in _batches(ids, cfg["batch"]):
            run(x, use_cache=False)  # the least work: no KV cache to fill
    return {"loop_s": time.perf_counter() - t0}


def child_hf_hidden(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    model, ids = _model_and_ids(cfg)
    out = Path(cfg["work"]) / "out"
    out.mkdir()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b, x in enumerate(_batches(ids, cfg["batch"])):
            hs = model(x, output_hidden_states=True).hidden_states  # [embeddings, block 0, ...]
            for layer in range(cfg["layers"]):
                _save(out, layer, b, hs[layer + 1])
    return {"loop_s": time.perf_counter() - t0, "out_dir": str(out)}


def child_nnsight(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from nnsight import NNsight

    model, ids = _model_and_ids(cfg)
    nm = NNsight(model)
    out = Path(cfg["work"]) / "out"
    out.mkdir()
    n_layers = cfg["layers"]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b, x in enumerate(_batches(ids, cfg["batch"])):
            saved: list[Any] = []  # filled inside the trace (a list made there stays there)
            with nm.trace(x):
                for layer in range(n_layers):
                    saved.append(nm.transformer.h[layer].output.save())
            for layer, acts in enumerate(saved):
                _save(out, layer, b, acts[0] if isinstance(acts, tuple) else acts)
    return {"loop_s": time.perf_counter() - t0, "out_dir": str(out)}


def child_tlens(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf, ids = _model_and_ids(cfg)
    c = hf.config
    tcfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
    )
    tl = HookedTransformer(tcfg)
    tl.load_state_dict(convert_gpt2_weights(hf, tcfg), strict=False)
    tl.eval()
    del hf
    out = Path(cfg["work"]) / "out"
    out.mkdir()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b, x in enumerate(_batches(ids, cfg["batch"])):
            _, cache = tl.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
            for layer in range(cfg["layers"]):
                _save(out, layer, b, cache[f"blocks.{layer}.hook_resid_post"])
    return {"loop_s": time.perf_counter() - t0, "out_dir": str(out)}


def child_saelens(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    torch.set_num_threads(cfg["threads"])
    ids = np.load(cfg["ids"])
    n, seq = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist()})  # pre-tokenized: rows used as they are
    layers = range(cfg["layers"]) if cfg["saelens_hooks"] == "all" else [cfg["layers"] - 1]
    bytes_per_token = cfg["d"] * 2
    loop = 0.0
    dirs = {}
    for layer in layers:
        hook = f"transformer.h.{layer}"
        out = Path(cfg["work"]) / f"out_{layer}"
        runner = CacheActivationsRunner(
            CacheActivationsRunnerConfig(
                dataset_path=cfg["ids"],  # only a label here: override_dataset is what is read
                model_name=cfg["model"],
                model_class_name="AutoModelForCausalLM",
                model_batch_size=cfg["batch"],
                hook_name=hook,
                d_in=cfg["d"],
                training_tokens=n * seq,
                context_size=seq,
                new_cached_activations_path=str(out),
                shuffle=False,
                streaming=False,
                prepend_bos=False,  # the ids start with BOS already
                dtype="float16",
                device="cpu",
                # one buffer holding every token (the default 2 GB would drop a partial buffer)
                buffer_size_gb=(n * seq * bytes_per_token + 0.5) / 1e9,
            ),
            override_dataset=ds,
        )
        t0 = time.perf_counter()
        runner.run()
        loop += time.perf_counter() - t0
        dirs[layer] = str(out)
        del runner
    return {
        "loop_s": loop,
        "out_dirs": dirs,
        "out_bytes": sum(du(Path(p)) for p in dirs.values()),
        "values": n * seq * len(layers) * cfg["d"],
        "hooks_captured": len(layers),
    }


def child_run_job(cfg: dict[str, Any], hooks: list[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg["threads"])
    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import run_job

    store = Path(cfg["work"]) / "store"
    t0 = time.perf_counter()
    s = run_job(IngestJob.from_dict(job_dict(cfg, store, hooks)), quiet=True)
    job_s = time.perf_counter() - t0
    r = s.runs[0]
    import actstore

    shard_rows = actstore.open(store).sql("SELECT max(shard_rows) FROM arrays").fetchall()[0][0]
    return {
        "shard_rows": int(shard_rows),
        "loop_s": r.seconds,
        "job_s": job_s,
        "rows": r.rows,
        "array_bytes": r.bytes,
        "out_bytes": du(store),
        "values": r.rows * (cfg["layers"] if "*" in hooks[0] else len(hooks)) * cfg["d"],
    }


def child_paired(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bare body, the same under the ingest's heap settings, and ``run_job``, alternating.

    One process: the steady-state ratios. One warm-up round first (imports, first-use
    costs; its ``run_job`` adapts glibc's thresholds for the whole process), then
    ``cfg["pairs"]`` rounds, the order reversed every other one; each ``run_job`` writes
    a fresh store and loads its own model. ``bare_kept_s`` is the bare body inside
    ``heap.keep_heap_top``, as the ingest runs its batches.
    """
    import torch

    from actstore.ingest.job import IngestJob
    from actstore.ingest.runner import run_job
    from actstore.store.heap import keep_heap_top

    model, ids = _model_and_ids(cfg)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in _batches(ids, cfg["batch"]):
                model.transformer(x, use_cache=False)
        return time.perf_counter() - t0

    def kept() -> float:
        with keep_heap_top():
            return bare()

    def ours(i: int) -> float:
        store = Path(cfg["work"]) / f"store{i}"
        job = job_dict(cfg, store, ["blocks.*.hook_resid_post"])
        s = run_job(IngestJob.from_dict(job), quiet=True)
        shutil.rmtree(store, ignore_errors=True)
        return float(s.runs[0].seconds)

    bare(), ours(-1), kept()
    pairs = []
    for i in range(cfg["pairs"]):
        if i % 2 == 0:
            b, k, r = bare(), kept(), ours(i)
        else:
            r, k, b = ours(i), kept(), bare()
        pairs.append(
            {
                "bare_body_s": b,
                "bare_kept_s": k,
                "run_job_s": r,
                "ratio": r / b,
                "ratio_kept": r / k,
            }
        )
    return {"pairs": pairs, "loop_s": sum(p["run_job_s"] for p in pairs)}


def child_main(spec_path: Path) -> None:
    """Run the contender a spec names; its measurements to the spec's ``result`` file."""
    cfg = json.loads(spec_path.read_text())
    name = cfg["contender"]
    all_hooks = ["blocks.*.hook_resid_post"]
    if name in ("bare_body", "bare_full", "bare_body_adapted"):
        got = child_bare(cfg, full=name == "bare_full", adapted=name == "bare_body_adapted")
    elif name == "hf_hidden":
        got = child_hf_hidden(cfg)
    elif name == "nnsight":
        got = child_nnsight(cfg)
    elif name == "tlens":
        got = child_tlens(cfg)
    elif name == "saelens":
        got = child_saelens(cfg)
    elif name == "run_job":
        got = child_run_job(cfg, all_hooks)
    elif name == "paired":
        got = child_paired(cfg)
    elif name == "layers03":
        got = child_run_job(cfg, [f"blocks.{i}.hook_resid_post" for i in range(4)])
    else:
        raise SystemExit(f"unknown contender {name!r}")
    import torch

    got["torch_threads"] = torch.get_num_threads()
    got["rusage_self_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if "out_dir" in got:
        got["out_bytes"] = du(Path(got["out_dir"]))
        got["values"] = cfg["n"] * cfg["seq"] * cfg["layers"] * cfg["d"]
    Path(cfg["result"]).write_text(json.dumps(got))


if __name__ == "__main__":
    child_main(Path(sys.argv[1]))
