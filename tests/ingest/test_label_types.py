"""A label column mixing numbers and text gets one rule in JSONL, CSV and Parquet, and is reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import actstore
from actstore.ingest.job import IngestJob
from actstore.ingest.runner import run_job

PROMPTS = ["alpha beta", "gamma", "beta beta gamma", "alpha"]
GRADE = [3, "high", 2.5, None]  # numbers and words
SCORE = [1, 2, 3, 4]  # numbers only


def write(path: Path, kind: str) -> Path:
    if kind == "jsonl":
        path.write_text(
            "".join(
                json.dumps({"prompt": p, "grade": g, "score": s}) + "\n"
                for p, g, s in zip(PROMPTS, GRADE, SCORE, strict=True)
            )
        )
    elif kind == "csv":
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "grade", "score"])
            for p, g, s in zip(PROMPTS, GRADE, SCORE, strict=True):
                w.writerow([p, "" if g is None else g, s])
    else:  # a Parquet column has one type: text, as the writer chose
        grade = [None if g is None else str(g) for g in GRADE]
        pq.write_table(pa.table({"prompt": PROMPTS, "grade": grade, "score": SCORE}), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_one_rule_for_every_format(tmp_path, llama_dir, kind):
    prompts = write(tmp_path / f"p.{kind}", kind)
    job = IngestJob.from_dict(
        {
            "store": str(tmp_path / "store"),
            "model": {"path": str(llama_dir), "name": "tiny"},
            "prompts": [{"name": "p", "path": str(prompts)}],
            "capture": {"hooks": ["blocks.0.hook_resid_post"], "positions": ["last"]},
        }
    )
    summary = run_job(job, quiet=True)
    st = actstore.open(job.store, read_only=True)
    types = dict(st.sql("SELECT column_name, column_type FROM (DESCRIBE prompts)").fetchall())
    assert types["grade"] == "VARCHAR" and types["score"] == "BIGINT"
    got = [r[0] for r in st.sql("SELECT grade FROM prompts ORDER BY prompt_idx").fetchall()]
    assert got[:2] == ["3", "high"] and got[3] is None
    assert got[2] in ("2.5",)
    notes = [n for n in summary.notes if "'grade'" in n]
    if kind == "parquet":
        assert summary.notes == []  # nothing was decided: the file typed it
    else:
        line = 2 if kind == "jsonl" else 3
        (note,) = notes
        assert f"line {line - 1}: 3" in note or f"line {line - 1}: '3'" in note
        assert f"line {line}: 'high'" in note and "stored as VARCHAR" in note
        assert "note: " + note in str(summary)
