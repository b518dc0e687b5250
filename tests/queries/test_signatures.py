"""Named queries and their SQL macros agree: parameters, defaults, errors, and numpy ids.

The reference for a macro's signature is DuckDB's own catalog of the installed
macro (``duckdb_functions()``), not the strings actstore generates.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import actstore.queries as q
from actstore.cli import main
from actstore.errors import InputError, RunNotFoundError
from actstore.queries.signatures import FORMS, PARAMS, SIGNATURES
from tests.queries.conftest import HOOK16, Truth

RUN = "base/p"


def _installed(truth: Truth) -> dict[str, tuple[list[str], str]]:
    """Macro name -> (parameter names in order, definition) as DuckDB holds them."""
    rows = truth.store.sql(
        "SELECT function_name, parameters, macro_definition FROM duckdb_functions() "
        "WHERE function_type = 'table_macro'"
    ).fetchall()
    return {r[0]: (list(r[1]), r[2]) for r in rows}


def test_every_named_query_and_its_macros_take_the_same_parameters(truth: Truth):
    installed = _installed(truth)
    named = {n.name: n for n in q.list_named()}
    assert set(named) == set(PARAMS) == set(FORMS)
    macro_names = [f.name for forms in FORMS.values() for f in forms]
    assert sorted(macro_names) == sorted(SIGNATURES) == sorted(
        ["trigger_diff", "trigger_diff_paired", "top_activations", "feature_reward_corr",
         "checkpoint_diff", "feature_density"]
    )  # fmt: skip
    for name, query in named.items():
        covered: set[str] = set()
        assert list(query.macros) == [SIGNATURES[f.name] for f in FORMS[name]]
        for form in FORMS[name]:
            got, _ = installed[form.name]
            # DuckDB's parameters, mapped back to the query's names
            back = {form.sql_name(p.name): p.name for p in query.params}
            assert all(g in back for g in got), (form.name, got)
            as_query = [back[g] for g in got]
            covered |= set(as_query)
            want = {p.name: p for p in query.params}
            required = [n for n in as_query if want[n].required or n in form.require]
            optional = [n for n in as_query if n not in required]
            assert as_query == required + optional  # positional ones first
            # the signature text states each default as the query does
            sig = SIGNATURES[form.name]
            for n in optional:
                d = want[n].default
                lit = "NULL" if d is None else (f"'{d}'" if isinstance(d, str) else str(d))
                assert f"{form.sql_name(n)} := {lit}" in sig
            assert sig.startswith(form.name + "(")
        # every parameter of the named query is reachable from SQL
        assert covered == {p.name for p in query.params}


def test_macro_defaults_behave_as_the_named_query_defaults(truth: Truth):
    # width's default (16) and k's (10): SQL and Python agree without passing them
    via_sql = truth.store.sql("SELECT * FROM top_activations('sae', 17)").df()
    via_py = q.run_named(truth.store, "top_activations", sae="sae", feature=17).df()
    assert len(via_sql) == len(via_py) == 10
    assert via_sql["context"].tolist() == via_py["context"].tolist()


@pytest.mark.parametrize(
    ("call", "shows"),
    [
        # the paired form is its own macro: pair := on trigger_diff names it
        (
            "trigger_diff('base/p', 'sae', 'triggered', pair := 'pair_id')",
            SIGNATURES["trigger_diff_paired"],
        ),
        ("trigger_diff_paired('base/p', 'sae', 'triggered')", SIGNATURES["trigger_diff"]),
        ("feature_density('base/p')", SIGNATURES["feature_density"]),
        ("top_activations('sae', feature := 17)", SIGNATURES["top_activations"]),
        ("checkpoint_diff('base/p', 'ft/p', 'sae', 'x', 'y')", SIGNATURES["checkpoint_diff"]),
    ],
)
def test_a_wrong_macro_call_names_the_signature(truth: Truth, call, shows):
    with pytest.raises(InputError, match="was called with arguments it does not take") as e:
        truth.store.sql(f"SELECT * FROM {call}")
    assert shows in str(e.value) and "\n" not in str(e.value)


def test_other_sql_errors_are_unchanged(truth: Truth):
    with pytest.raises(InputError, match=r"SQL error: .*no_such_table"):
        truth.store.sql("SELECT * FROM no_such_table")


def test_query_list_shows_every_macro_signature():
    out = CliRunner().invoke(main, ["query", "--list"])
    assert out.exit_code == 0, out.output
    for sig in SIGNATURES.values():
        assert f"SQL: SELECT * FROM {sig}" in out.output


def test_readme_lists_every_macro_signature():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for sig in SIGNATURES.values():
        assert sig in readme, sig


def test_top_activations_returns_prompt_text_and_labels(truth: Truth):
    df = q.run_named(truth.store, "top_activations", sae="sae", feature=17, k=5).df()
    assert list(df.columns[:11]) == [
        "rank", "run", "prompt_idx", "position", "row", "token", "value",
        "left_tokens", "right_tokens", "context", "prompt_text",
    ]  # fmt: skip
    p = truth.prompts.to_pydict()
    for _, r in df.iterrows():
        i = int(r["prompt_idx"])
        assert r["prompt_text"] == p["text"][i]
        assert bool(r["triggered"]) == p["triggered"][i] is True  # feature 17: triggered only
        assert r["pair_id"] == p["pair_id"][i]
        assert r["reward"] == pytest.approx(p["reward"][i])
    # the default width shows a short prompt from its first stored token on
    tok = truth.tokens["base/p"]
    for _, r in df[df["run"] == "base/p"].iterrows():
        n_before = int(r["position"])
        assert len(r["left_tokens"]) == n_before  # every earlier token (prompts are < 16 long)
        assert n_before == int(
            ((tok["prompt_idx"] == r["prompt_idx"]) & (tok["position"] < n_before)).sum()
        )


def test_numpy_integer_run_ids_are_accepted(truth: Truth):
    st = truth.store
    runs = st.runs().df()
    rid = runs.run_id[runs.name == RUN].iloc[0]
    assert isinstance(rid, np.integer)
    where = "position_role = 'last'"
    assert st.run_id(rid) == int(rid)
    assert st.hooks(rid) == st.hooks(RUN)
    a, b = st.acts(rid, HOOK16, where=where), st.acts(RUN, HOOK16, where=where)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert a.run == RUN
    blocks = list(st.iter_acts(rid, HOOK16, block_rows=50))
    assert blocks[0].run == RUN
    np.testing.assert_array_equal(
        np.concatenate([x.numpy() for x in blocks]), st.acts(RUN, HOOK16).numpy()
    )
    for r in (rid, np.int32(rid), np.uint8(rid)):
        via_np = q.run_named(st, "feature_density", run=r, sae="sae").df()
        via_name = q.run_named(st, "feature_density", run=RUN, sae="sae").df()
        assert via_np.equals(via_name)
    top = q.run_named(st, "top_activations", sae="sae", feature=np.int64(17), run=rid, k=3).df()
    assert set(top["run"]) == {RUN}


def test_numpy_ids_in_the_analyses(truth: Truth):
    from actstore.analysis.rows import run_info
    from actstore.analysis.sae import sae_record

    st = truth.store
    rid = st.runs().df().run_id.iloc[0]
    assert (
        run_info(st, rid).run_id
        == int(rid)
        == run_info(st, str(st.runs().df().name.iloc[0])).run_id
    )
    sid = st.sql("SELECT sae_id FROM saes WHERE name = 'sae'").df().sae_id.iloc[0]
    assert sae_record(st, sid)["name"] == "sae"
    with pytest.raises(RunNotFoundError, match="run 99 not in store"):
        st.run_id(np.int64(99))
    with pytest.raises(RunNotFoundError, match="feature_density: run 99 not in store"):
        q.run_named(st, "feature_density", run=np.int64(99), sae="sae")


@pytest.mark.parametrize(
    "module",
    ["actstore.queries.signatures", "actstore.queries.macros", "actstore.store.ids"],
)
def test_docstring_examples(module):
    m = importlib.import_module(module)
    result = doctest.testmod(m, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0 and result.attempted > 0


def test_signature_strings_are_valid_duckdb():
    import duckdb

    con = duckdb.connect()
    for sig in SIGNATURES.values():
        con.execute(f"CREATE MACRO {sig} AS TABLE SELECT 1 AS one")
        assert re.fullmatch(r"\w+\(.*\)", sig)


def test_the_session_draws_no_duckdb_progress_bar(truth: Truth):
    # DuckDB prints a progress bar for statements over 2 s; actstore shows its own only
    got = truth.store.sql("SELECT current_setting('enable_progress_bar') AS on").fetchall()
    assert got == [(False,)]
