"""A refused ingest or edit writes nothing: every file of the store stays byte-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import actstore
from actstore.edits.apply import run_edited
from actstore.edits.spec import EditOp, EditSpec
from actstore.errors import ActstoreError, InputError
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job
from actstore.store.store import write_lock
from tests.ingest.test_runner import job_dict


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the store, by path: what a refusal may not change."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("refusals")
    d = job_dict(root, llama_dir)
    run_job(IngestJob.from_dict(d), quiet=True)
    return d


@pytest.fixture
def job(made: dict, tmp_path: Path) -> dict:
    """The module's ingested job, with a private copy of its store."""
    d = json.loads(json.dumps(made))
    shutil.copytree(made["store"], tmp_path / "store")
    d["store"] = str(tmp_path / "store")
    return d


def refused(d: dict, match: str, run=None) -> None:
    root = Path(d["store"])
    before = snapshot(root)
    with pytest.raises(ActstoreError, match=match) as e:
        (run or (lambda: run_job(IngestJob.from_dict(d), quiet=True)))()
    assert "\n" not in str(e.value)
    assert snapshot(root) == before


def test_a_second_writer_is_refused_before_it_writes(job):
    lock = write_lock(actstore.open(job["store"]).location)
    try:
        job["prompts"].append({"name": "more", "path": job["prompts"][0]["path"]})
        refused(job, "another process is writing to store")
    finally:
        lock.release()
    run_job(IngestJob.from_dict(job), quiet=True)  # once the lock is free, the job runs


def test_a_prompt_set_name_with_other_contents(job, tmp_path):
    changed = tmp_path / "changed.jsonl"
    lines = Path(job["prompts"][0]["path"]).read_text().splitlines()
    changed.write_text("\n".join(lines[:-1]) + "\n")
    job["prompts"][0]["path"] = str(changed)
    refused(job, "prompt set 'pairs' is already in the store with other contents")


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("position", 3, r"label columns \['position'\] clash with built-in columns"),
        ("reward", "high", "label 'reward' is VARCHAR here but DOUBLE in prompt sets already"),
    ],
)
def test_a_label_column_that_clashes(job, tmp_path, column, value, match):
    rows = [json.loads(x) for x in Path(job["prompts"][0]["path"]).read_text().splitlines()]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({**r, column: value}) + "\n" for r in rows))
    job["prompts"] = [{"name": "relabelled", "path": str(path)}]
    job["checkpoints"] = [{"label": "second", "path": job["model"]["path"]}]
    refused(job, match)


def test_a_run_made_by_another_job(job):
    job["capture"]["store_dtype"] = "float16"
    refused(job, "run 'main/pairs' already exists and was made by a different job")


def test_an_edit_whose_job_names_an_unknown_hook(job):
    job["capture"]["hooks"] = ["blocks.9.hook_resid_post"]
    spec = EditSpec(
        name="scale",
        ops=(EditOp(kind="steer", hook="blocks.0.hook_resid_post", direction="none", alpha=1.0),),
    )
    refused(job, "blocks.9", run=lambda: run_edited(IngestJob.from_dict(job), spec, quiet=True))
    assert actstore.open(job["store"]).sql("SELECT count(*) FROM edits").fetchall() == [(0,)]


def test_the_lock_is_held_for_the_whole_job(job, monkeypatch):
    """Between the job's runs no other writer can take the store."""
    import actstore.ingest.runner as runner

    job["prompts"].append({"name": "more", "path": job["prompts"][0]["path"]})
    seen = []
    real = runner._ingest_run

    def spy(st, *a, **k):
        with pytest.raises(InputError, match="another process is writing"):
            write_lock(st.location)
        seen.append(1)
        return real(st, *a, **k)

    monkeypatch.setattr(runner, "_ingest_run", spy)
    run_job(IngestJob.from_dict(job), quiet=True)
    assert len(seen) == 2
    write_lock(actstore.open(job["store"]).location).release()  # released at the end


def test_a_bad_heap_bound_in_the_environment(job, monkeypatch):
    job["prompts"].append({"name": "more", "path": job["prompts"][0]["path"]})
    monkeypatch.setenv("ACTSTORE_HEAP_SLACK_MIB", "1.5G")
    refused(job, "ACTSTORE_HEAP_SLACK_MIB='1.5G' is not a whole number of MiB")
