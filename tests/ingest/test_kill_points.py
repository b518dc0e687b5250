"""kill -9 at a dozen points of an ingest (SAE features, generation, scores), resumed each time:
the store ends bit-identical to an uninterrupted ingest.

The job runs in a forked child that SIGKILLs itself at its k-th write event
(before or after: creating the prompt set, the run, the SAE; writing a shard;
writing feature parts; a catalog commit; finishing the run), k drawn at random
for each of a dozen children in turn, each resuming what the last one left.
"""

from __future__ import annotations

import os
import signal
import time

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
    (writer._HookBuffer, "write"),
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


def killed_at(job: IngestJob, k: int) -> int:
    """Run ``job`` in a forked child killed at event ``k``; return its wait status signal."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            mp = pytest.MonkeyPatch()
            instrument(mp, k)
            run_job(job, quiet=True)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child killed at event {k} hung")


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
    killed = IngestJob.from_dict({**d, "store": str(tmp_path / "killed")})
    signals = [killed_at(killed, k) for k in points]  # each resumes what the last one left
    assert signals.count(signal.SIGKILL) >= 10, (n_events, points, signals)
    summary = run_job(killed, quiet=True)  # the last resume completes the job
    assert [r.status for r in summary.runs] in (["resumed"], ["already complete"], ["ingested"])
    got = contents(actstore.open(killed.store, read_only=True))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key
