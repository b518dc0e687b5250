"""No statement is smuggled through a query parameter; query-only sessions touch the store alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import actstore
import actstore.queries as q
from actstore.analysis.rows import select
from actstore.cli import main
from actstore.errors import InputError
from tests.queries.conftest import HOOK16, Truth

RUN = "base/p"
INJECT = "true) TO '{out}' (FORMAT csv); SELECT (1"
INJECT_DESCRIBE = "true) AS x FROM labeled_tokens; COPY (SELECT 42) TO '{out}'; SELECT (1"


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("template", [INJECT, INJECT_DESCRIBE])
@pytest.mark.parametrize(
    ("name", "param", "base"),
    [
        ("trigger_diff", "group_a", {"run": RUN, "sae": "sae"}),
        ("trigger_diff", "group_b", {"run": RUN, "sae": "sae", "group_a": "triggered"}),
        ("trigger_diff", "positions", {"run": RUN, "sae": "sae", "group_a": "triggered"}),
        ("feature_reward_corr", "label", {"run": RUN, "sae": "sae"}),
        ("feature_density", "positions", {"run": RUN, "sae": "sae"}),
        ("top_activations", "positions", {"sae": "sae", "feature": 17}),
    ],
)
def test_a_predicate_cannot_run_a_statement(truth: Truth, tmp_path, template, name, param, base):
    out = tmp_path / "pwned.csv"
    before = files(Path(truth.store.root))
    with pytest.raises(InputError, match=rf"{name}: {param} .* is not one SQL expression") as e:
        q.run_named(truth.store, name, **base, **{param: template.format(out=out)})
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert files(Path(truth.store.root)) == before


def test_acts_and_select_where_are_one_expression(truth: Truth, tmp_path):
    out = tmp_path / "pwned.csv"
    with pytest.raises(InputError, match=r"where .* is not one SQL expression"):
        truth.store.acts(RUN, HOOK16, where=INJECT_DESCRIBE.format(out=out))
    with pytest.raises(InputError, match=r"where .* is not one SQL expression"):
        select(truth.store, run=RUN, where=INJECT.format(out=out))
    with pytest.raises(InputError, match=r"column 'y' .* is not one SQL expression"):
        select(truth.store, run=RUN, columns={"y": INJECT.format(out=out)})
    with pytest.raises(InputError, match="refused: it calls the table function read_text"):
        truth.store.acts(
            RUN, HOOK16, where="prompt_idx IN (SELECT 1 FROM read_text('/etc/passwd'))"
        )
    assert not out.exists()
    # a legitimate predicate with a subquery over the store's tables still works
    a = truth.store.acts(
        RUN, HOOK16, where="prompt_idx IN (SELECT prompt_idx FROM prompts WHERE triggered)"
    )
    assert a.numpy().shape[0] == int(truth.rows(RUN)["triggered"].astype(bool).sum())


def test_cli_query_refuses_the_injection_in_one_line(truth: Truth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = files(Path(truth.store.root))
    res = CliRunner().invoke(
        main,
        [
            "query",
            str(truth.store.root),
            "trigger_diff",
            "-p",
            f"run={RUN}",
            "-p",
            "sae=sae",
            "-p",
            "group_a=" + INJECT.format(out="pwned.csv"),
        ],
    )
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "group_a" in lines[0] and "not one SQL expression" in lines[0]
    assert not (tmp_path / "pwned.csv").exists()
    assert files(Path(truth.store.root)) == before


def test_a_restricted_session_reads_the_store_and_nothing_else(truth: Truth, tmp_path):
    st = actstore.open(truth.store.root, read_only=True)
    expected = q.run_named(truth.store, "feature_density", run=RUN, sae="sae", cache=False).df()
    st.session.restrict()
    got = q.run_named(st, "feature_density", run=RUN, sae="sae", cache=False).df()
    assert got.equals(expected)
    assert st.acts(RUN, HOOK16, where="triggered").numpy().shape[0] > 0
    outside = tmp_path / "out.csv"
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    for stmt in (
        f"COPY (SELECT 1) TO '{outside}'",
        f"SELECT * FROM read_text('{secret}')",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SET allowed_directories = ['/']",
    ):
        with pytest.raises(InputError, match=r"SQL error: .*(Permission|Cannot|locked)"):
            st.sql(stmt)
    assert not outside.exists() and not (tmp_path / "other.duckdb").exists()
    st.close()


def test_actstore_sql_keeps_full_sql(truth: Truth, tmp_path):
    out = tmp_path / "mine.csv"
    res = CliRunner().invoke(
        main, ["sql", str(truth.store.root), f"COPY (SELECT 1 AS one) TO '{out}'"]
    )
    assert res.exit_code == 0, res.output
    assert out.read_text().split() == ["one", "1"]
    # but the catalog is attached read-only
    res = CliRunner().invoke(main, ["sql", str(truth.store.root), "DELETE FROM cat.runs"])
    assert res.exit_code == 1 and "read-only" in res.output.lower()
    assert os.path.exists(truth.store.root)
