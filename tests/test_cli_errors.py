"""User mistakes on the command line are one line (``Error: ...``), never a traceback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

import actstore
import actstore.queries as q
from actstore.cli import main
from tests.queries.conftest import HOOK16, build_store


def one_line(args: list[str], code: int) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-errors") / "store"
    build_store(root, seed=5)
    return root


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_prompt_file_that_is_not_utf8_names_file_line_and_byte(tmp_path, suffix, llama_dir):
    bad = tmp_path / f"prompts.{suffix}"
    if suffix == "jsonl":
        bad.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
        offset = len(b'{"prompt": "fine"}\n{"prompt": "caf')
    else:
        bad.write_bytes(b"prompt,y\nfine,1\ncaf\xe9,2\n")
        offset = len(b"prompt,y\nfine,1\ncaf")
    job = tmp_path / "job.toml"
    job.write_text(
        f'store = "{tmp_path / "s"}"\n[model]\npath = "{llama_dir}"\n'
        f'[[prompts]]\nname = "p"\npath = "{bad}"\n[capture]\nhooks = ["blocks.0.hook_resid_post"]\n'
    )
    line = one_line(["ingest", str(job), "-q"], 1)
    assert f"{bad}:3:" in line if suffix == "csv" else f"{bad}:2:" in line
    assert f"byte {offset} (0xe9) is not UTF-8" in line
    assert not (tmp_path / "s").exists()


def test_param_without_equals_and_a_non_integer_batch_size(store, tmp_path):
    line = one_line(["query", str(store), "feature_density", "-p", "run"], 2)
    assert "--param 'run' is not of the form KEY=VALUE; write e.g. --param run=VALUE" in line
    line = one_line(["sql", str(store), "SELECT $x", "-p", "x"], 2)
    assert "--param 'x' is not of the form KEY=VALUE" in line
    job = tmp_path / "job.toml"
    job.write_text("store = 'x'\n")
    line = one_line(["ingest", str(job), "--batch-size", "eight"], 2)
    # click's own wording, on one line, saying what to write
    assert "Invalid value for '--batch-size': 'eight' is not a valid integer" in line
    assert "write a whole number, e.g. --batch-size 16" in line
    assert "No such command 'nope'" in one_line(["nope"], 2)


def test_a_read_only_store_reads_and_refuses_writes_in_one_line(store, tmp_path):
    import shutil

    root = tmp_path / "ro"
    shutil.copytree(store, root)
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        st = actstore.open(root, read_only=True)
        assert st.sql("SELECT count(*) FROM runs").fetchall() == [(3,)]
        assert st.acts("base/p", HOOK16).numpy().shape[0] > 0
        assert len(q.run_named(st, "feature_density", run="base/p", sae="sae").df()) == 64
        res = CliRunner().invoke(main, ["info", str(root)])
        assert res.exit_code == 0 and "DAMAGED" not in res.output
        if os.geteuid() != 0:  # root may write anyway: the refusal is checked as a user
            with pytest.raises(actstore.errors.ReadOnlyError, match="is not writable by this user"):
                actstore.open(root).writer("base/p")
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
