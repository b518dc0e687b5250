"""kill -9 at a dozen points of an ingest (SAE features, generation, scores), resumed each time:
the store ends bit-identical to an uninterrupted ingest.

The job runs in a forked child that SIGKILLs itself at its k-th write event
(before or after: creating the prompt set, the run, the SAE; writing a shard;
writing feature parts; a catalog commit; finishing the run), k drawn at random
for each of a dozen children in turn, each resuming what the last one left.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest

import actstore
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.store import objects, writer
from tests.ingest.test_runner import _save_tiny_sae, job_dict, make_prompts

EVENTS = [
    (objects, "add_prompt_set"),
    (objects, "create_run"),
    (objects, "add_sae"),
    (objects, "finish_run"),
    (writer.RunWriter, "_write_parts"),
    (writer.RunWriter, "_commit"),
    (writer._HookBuffer, "write"),  # a partial shard
    (writer._HookBuffer, "_write_full"),  # a whole shard, as it fills
]


def instrument(monkeypatch, kill_at: int | None) -> list[int]:
    """Count write events; SIGKILL this process at event ``kill_at`` (before or after it)."""
    count = [0]

    def wrap(fn):
        def inner(*a, **k):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*a, **k)
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return inner

    for owner, name in EVENTS:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name)))
    return count


def _child(job: dict, k: int) -> None:
    """The job, killed at its ``k``-th write event (run in a forkserver child)."""
    import torch

    torch.set_num_threads(1)
    instrument(pytest.MonkeyPatch(), k)
    run_job(IngestJob.from_dict(job), quiet=True)


def killed_at(job: dict, k: int) -> int:
    """Run ``job`` in a child killed at event ``k``; return the signal that ended it (0: none).

    The child is forked from a forkserver, a clean single-threaded process that has
    imported the model stack once: forking pytest itself, with the threads of torch
    and DuckDB running, can crash the child in a way that has nothing to do with the
    kill being tested.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "actstore.ingest.runner", __name__])
    proc = ctx.Process(target=_child, args=(job, k))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the child killed at event {k} hung")
    return -proc.exitcode if proc.exitcode and proc.exitcode < 0 else 0


def contents(st: actstore.Store) -> dict[str, object]:
    run = "main/pairs"
    out: dict[str, object] = {h: st.acts(run, h).numpy().tobytes() for h in st.hooks(run)}
    for name, q in {
        "tokens": "SELECT * FROM tokens ORDER BY prompt_idx, position",
        "features": "SELECT row, feature, value FROM features ORDER BY row, feature",
        "generations": "SELECT prompt_idx, sample_idx, text, token_ids FROM generations ORDER BY ALL",
        "scores": "SELECT prompt_idx, sample_idx, scorer, value, flag FROM scores ORDER BY ALL",
        "batches": "SELECT batch_idx, first_prompt, n_prompts, first_row, n_rows FROM batches ORDER BY ALL",
        "runs": "SELECT name, status, job_hash FROM runs",
    }.items():
        out[name] = st.sql(q).fetchall()
    return out


def test_a_dozen_kills_then_resume_is_bit_identical(tmp_path, llama_dir, monkeypatch):
    hook = "blocks.1.hook_resid_post"
    d = job_dict(tmp_path, llama_dir, hooks=[hook], batch_size=2, commit_interval=0.0)
    make_prompts(tmp_path / "prompts.jsonl", n=16, seed=2)
    d["saes"] = [{"path": str(_save_tiny_sae(tmp_path / "sae", hook, 32)), "name": "l1"}]
    d["generate"] = {"max_new_tokens": 3}
    d["scorers"] = [{"name": "cat", "regex": r"\bcat\b"}]
    whole = IngestJob.from_dict({**d, "store": str(tmp_path / "whole")})
    with monkeypatch.context() as mp:
        count = instrument(mp, None)
        run_job(whole, quiet=True)
    n_events = count[0]
    want = contents(actstore.open(whole.store, read_only=True))
    rng = np.random.default_rng(13)
    # a resumed child redoes less, so each is killed at its own k-th event: a dozen kills
    # spread over the job, before and after every kind of write
    points = rng.integers(1, 9, size=12).tolist()
    killed_d = {**d, "store": str(tmp_path / "killed")}
    killed = IngestJob.from_dict(killed_d)
    signals = [killed_at(killed_d, k) for k in points]  # each resumes what the last one left
    assert signals.count(signal.SIGKILL) >= 10, (n_events, points, signals)
    summary = run_job(killed, quiet=True)  # the last resume completes the job
    assert [r.status for r in summary.runs] in (["resumed"], ["already complete"], ["ingested"])
    got = contents(actstore.open(killed.store, read_only=True))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key
