"""The CLI: output formats, one-line errors, and every command documented with an example."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.store import objects


@pytest.fixture
def store_path(tmp_path):
    st = actstore.open(tmp_path / "s", create=True)
    ps = objects.add_prompt_set(
        st, name="p", table=pa.table({"text": ["a", "b"], "triggered": [True, False]})
    )
    rid = objects.create_run(
        st, name="r", prompt_set_id=ps, hooks={"blocks.0.hook_resid_post": (0, 4)}
    )
    with st.writer(rid) as w:
        w.append(
            arrays={"blocks.0.hook_resid_post": np.ones((2, 4), np.float32)},
            tokens={"prompt_idx": [0, 1], "position": [0, 0], "row": [0, 1]},
            first_prompt=0,
            n_prompts=2,
        )
    return tmp_path / "s"


def test_info(store_path):
    res = CliRunner().invoke(main, ["info", str(store_path)])
    assert res.exit_code == 0, res.output
    assert "r  [running]" in res.output and "blocks.0.hook_resid_post" in res.output
    res = CliRunner().invoke(main, ["info", str(store_path), "--json"])
    assert json.loads(res.output)["runs"][0]["n_rows"] == 2


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_sql_formats(store_path, fmt):
    q = "SELECT text, triggered FROM prompts WHERE triggered = $t"
    res = CliRunner().invoke(main, ["sql", str(store_path), q, "-p", "t=true", "--format", fmt])
    assert res.exit_code == 0, res.output
    if fmt == "json":
        assert json.loads(res.output) == [{"text": "a", "triggered": True}]
    elif fmt == "csv":
        assert res.output.splitlines() == ['"text","triggered"', '"a",true']
    else:
        assert res.output.splitlines()[2].split() == ["a", "True"]


def test_sql_to_parquet_file(store_path, tmp_path):
    out = tmp_path / "x.parquet"
    res = CliRunner().invoke(main, ["sql", str(store_path), "SELECT * FROM tokens", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert pq.read_table(out).num_rows == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "/nonexistent/x"], "is not an actstore store"),
        (
            ["sql", "{store}", "SELECT * FROM nope"],
            "SQL error: Catalog Error: Table with name nope",
        ),
        (["sql", "{store}", "SELECT 1", "--format", "parquet"], "--format parquet needs -o FILE"),
    ],
)
def test_user_errors_are_one_line(store_path, args, message):
    args = [a.format(store=store_path) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.startswith("Error")]) == 1


def test_every_command_has_help_with_an_example():
    def walk(group, prefix=()):
        for name, cmd in group.commands.items():
            yield (*prefix, name), cmd
            if hasattr(cmd, "commands"):
                yield from walk(cmd, (*prefix, name))

    for path, cmd in walk(main):
        assert cmd.help and "Example" in cmd.help, (
            f"`actstore {' '.join(path)}` needs an Example in its help"
        )
