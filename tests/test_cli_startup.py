"""Light commands are light: ``actstore sql`` and ``actstore info`` import none of the model
stack (torch, transformers) nor the array, statistics and filesystem libraries they do not
use (scipy, zarr, fsspec, ml_dtypes), and still work; ``import actstore`` keeps its names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import actstore
from actstore.store import objects

HEAVY = ("torch", "transformers", "scipy", "zarr", "fsspec", "ml_dtypes", "sklearn", "numcodecs")

RUN_CLI = """
import json, sys
from actstore.cli import main
try:
    main(args=sys.argv[1:], prog_name="actstore")
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    """A store with a bfloat16 run holding rows, so ``info`` has arrays to describe."""
    path = tmp_path_factory.mktemp("startup") / "s"
    st = actstore.open(path, create=True)
    ps = objects.add_prompt_set(st, name="p", table=pa.table({"text": ["a", "b"]}))
    rid = objects.create_run(
        st,
        name="r",
        prompt_set_id=ps,
        hooks={"blocks.0.hook_resid_post": (0, 4)},
        store_dtype="bfloat16",
    )
    with st.writer(rid) as w:
        w.append(
            arrays={"blocks.0.hook_resid_post": np.ones((2, 4), np.float32)},
            tokens={"prompt_idx": [0, 1], "position": [0, 0], "row": [0, 1]},
            first_prompt=0,
            n_prompts=2,
        )
    return path


def _cli(*args: str) -> tuple[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(Path(actstore.__file__).parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", RUN_CLI.format(heavy=set(HEAVY)), *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    text, _, modules = out.rstrip("\n").rpartition("\n")
    return text, json.loads(modules)


def test_sql_imports_no_model_stack(store_path):
    text, modules = _cli("sql", str(store_path), "SELECT 1 AS one", "--format", "json")
    assert json.loads(text) == [{"one": 1}]
    assert modules == []


def test_info_imports_no_model_stack(store_path):
    text, modules = _cli("info", str(store_path), "--json")
    info = json.loads(text)
    assert info["runs"][0]["name"] == "r"
    assert modules == []


def test_library_names_and_reads_still_work(store_path):
    code = (
        f"import actstore, json; st = actstore.open({str(store_path)!r}); "
        "a = st.acts('r', 'blocks.0.hook_resid_post').numpy(); "
        "print(json.dumps([str(a.dtype), a.astype(float).tolist(), "
        "sorted(n for n in actstore.__all__ if getattr(actstore, n, None) is not None)]))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(actstore.__file__).parent.parent)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    dtype, rows, names = json.loads(out.stdout)
    assert dtype == "bfloat16" and rows == [[1.0] * 4] * 2
    assert names == sorted(actstore.__all__)
