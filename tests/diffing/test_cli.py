"""The diffing commands: one library call each, tables out, one-line errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from actstore.cli import main


def test_token_diff_by_label(store):
    res = CliRunner().invoke(
        main,
        [
            "token-diff",
            str(store.root),
            "base/pairs",
            "backdoored/pairs",
            "--by",
            "triggered",
            "--where",
            "pair_id < 10",
            "--name",
            "cli_td",
            "--replace",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = {r["triggered"]: r for r in json.loads(res.output)}
    assert rows[True]["mean_kl"] > rows[False]["mean_kl"] and rows[True]["prompts"] == 10


def test_adl_with_lens(store):
    res = CliRunner().invoke(
        main,
        [
            "adl",
            str(store.root),
            "base/pairs",
            "backdoored/pairs",
            "--hook",
            "blocks.3.hook_resid_post",
            "--lens",
            "3",
            "--name",
            "cli_adl",
            "--replace",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)
    assert row["direction"] == "cli_adl/blocks.3.hook_resid_post" and row["norm"] > 0
    assert row["top_tokens"].split()[0] == "I"


def test_trajectory_with_plot(store, tmp_path):
    png = tmp_path / "t.png"
    res = CliRunner().invoke(
        main,
        [
            "trajectory",
            str(store.root),
            "interp@0/pairs",
            "interp@1/pairs",
            "--hook",
            "blocks.2.hook_resid_post",
            "--plot",
            str(png),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert [r["x"] for r in json.loads(res.stdout)] == [0.0, 1.0]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_errors_are_one_line(store):
    res = CliRunner().invoke(main, ["token-diff", str(store.root), "base/pairs", "base/pairs"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("Error")] == [
        "Error: run_a and run_b are the same run 'base/pairs'; name two runs to diff"
    ]
