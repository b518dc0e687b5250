"""SQL fragments a user passes are exactly one expression, checked by DuckDB's parser."""

from __future__ import annotations

import duckdb
import pytest

from actstore.errors import InputError
from actstore.store.predicate import expression, predicate_or_true

ACCEPTED = [
    "triggered",
    "position_role = 'last'",
    "triggered AND position_role = 'last' AND reward > 0.5",
    "prompt_idx IN (SELECT prompt_idx FROM prompts WHERE reward > 0)",
    "text LIKE '%;%'",  # a semicolon inside a string is data
    "position = ? OR position > 3",
    "position = $p",
    "true -- a trailing comment ends at the newline we add",
    "coalesce(flag, false)",
]

REFUSED = [
    ("true) TO 'pwned.csv' (FORMAT csv); SELECT (1", "not one SQL expression"),
    ("1; COPY (SELECT 1) TO 'pwned.csv'", "not one SQL expression"),
    ("true) AS x FROM labeled_tokens; COPY (SELECT 1) TO 'p.csv'; SELECT (1", "not one SQL"),
    ("true) FROM prompts WHERE (true", "continues past the expression"),
    ("true) UNION SELECT (1", "continues past the expression"),
    ("true), (false", "continues past the expression"),
    ("1 AS y", "not one SQL expression"),
    ("*", "not one SQL expression"),
    ("1 /* ", "unterminated"),
    ("'abc", "unterminated"),
    ("ATTACH 'x.db' AS other", "not one SQL expression"),  # (ATTACH 'x') alone: a cast
    ("INSTALL httpfs", "not one SQL expression"),
    ("length(read_text('/etc/passwd')) > 0", "read_text"),
    ("prompt_idx IN (SELECT 1 FROM read_text('/etc/passwd'))", "table function read_text"),
    ("prompt_idx IN (SELECT 1 FROM read_blob('/etc/passwd'))", "table function read_blob"),
    ("prompt_idx IN (SELECT 1 FROM read_csv('/etc/passwd'))", "table function read_csv"),
    ("prompt_idx IN (SELECT 1 FROM query('COPY (SELECT 1) TO ''x.csv'''))", "query"),
    ("prompt_idx IN (SELECT 1 FROM '/etc/passwd')", "reads '/etc/passwd' as a table"),
    ("getenv('HOME') = ''", "getenv"),
    ("", "non-empty"),
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_one_expression_is_accepted_and_placed_verbatim(text):
    out = expression(text, what="where")
    assert out == f"(\n{text}\n)"
    # and it is one expression where it is placed: DuckDB parses the whole statement
    sql = f"SELECT count(*) FROM t WHERE {out} ORDER BY 1"
    assert len(duckdb.extract_statements(sql)) == 1


@pytest.mark.parametrize(("text", "why"), REFUSED)
def test_anything_else_is_refused_in_one_line(text, why):
    with pytest.raises(InputError, match="where") as e:
        expression(text, what="where")
    assert why in str(e.value) and "\n" not in str(e.value)


def test_none_is_every_row():
    assert predicate_or_true(None, what="where") == "true"
    assert predicate_or_true("  ", what="where") == "true"


def test_an_accepted_fragment_is_not_parsed_again_and_a_refused_one_always_is(monkeypatch):
    from actstore.store import predicate

    text = "token_id < 153 AND position > 1"
    first = predicate.expression(text, what="where")
    calls = []
    real = predicate.parse_sql
    monkeypatch.setattr(predicate, "parse_sql", lambda sql: calls.append(sql) or real(sql))
    assert predicate.expression(text, what="where") == first
    assert calls == []  # remembered: the check depends on the text alone
    for _ in range(2):
        with pytest.raises(InputError, match="not one SQL expression"):
            predicate.expression("1; DROP TABLE runs", what="where")
    assert len(calls) == 2  # a refusal is never remembered as accepted
