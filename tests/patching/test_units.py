"""The pure parts of patching: metrics, alignments, the heatmap, docstrings, the CLI."""

from __future__ import annotations

import doctest
import importlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actstore.cli import main
from actstore.errors import InputError, SpecError
from actstore.patching import MetricSpec, align, logit_diff, normalise


def test_logit_diff_and_normalise_match_numpy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 11)).astype(np.float32)
    good, bad = rng.integers(0, 11, 5), rng.integers(0, 11, 5)
    got = logit_diff(torch.from_numpy(logits), torch.from_numpy(good), torch.from_numpy(bad))
    want = logits[np.arange(5), good] - logits[np.arange(5), bad]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    p, t, s = rng.standard_normal((3, 5))
    s[2] = t[2]
    n = normalise(torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(s)).numpy()
    keep = [0, 1, 3, 4]
    np.testing.assert_allclose(n[keep], (p[keep] - t[keep]) / (s[keep] - t[keep]))
    assert np.isnan(n[2])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("logit_diff:I", "KIND:GOOD:BAD"),
        ("logprob:I:{answer}", "not one of logit_diff"),
        ("logit_diff:I:{bad column}", "neither a token text"),
        ("logit_diff::x", "neither a token text"),
    ],
)
def test_bad_metric_specs(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        MetricSpec.parse(text)


def test_metric_needs_a_value_in_its_column() -> None:
    from actstore.demo.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(["I", "red"])
    with pytest.raises(InputError, match="has no value in column 'answer'"):
        MetricSpec.parse("logit_diff:I:{answer}").token_ids(tok, [{"answer": None}])


@pytest.mark.parametrize("how", ["end", "start", "tokens"])
def test_alignment_covers_every_position_once(how: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        tgt = list(rng.integers(3, 9, int(rng.integers(1, 8))))
        src = list(tgt)
        for _ in range(int(rng.integers(0, 3))):
            src.insert(int(rng.integers(0, len(src) + 1)), 99)
        cells = align([2, *tgt], [2, *src], how, special={2}).cells
        assert sorted(t for t, _ in cells if t is not None) == list(range(len(tgt) + 1))
        assert sorted(s for _, s in cells if s is not None) == list(range(len(src) + 1))
        matched = [(t, s) for t, s in cells if t is not None and s is not None]
        assert [t for t, _ in matched] == sorted(t for t, _ in matched)  # order kept
        assert [s for _, s in matched] == sorted(s for _, s in matched)
        if how == "tokens":  # inserted tokens are exactly the unmatched ones
            src_only = [s for t, s in cells if t is None]
            assert all(([2, *src])[s] == 99 for s in src_only)
            assert len(src_only) == len(src) - len(tgt)


@pytest.mark.parametrize(
    "name", ["attribution", "grid", "metric", "pairs", "plan", "plot", "result", "tables"]
)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"actstore.patching.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


def test_cli_module_docstring_examples() -> None:
    import actstore.cli_patch

    result = doctest.testmod(actstore.cli_patch, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 2 and result.failed == 0


def test_cli_patch_prints_the_grid_and_errors_in_one_line(store_copy) -> None:
    root = str(store_copy.root)
    args = [
        "patch",
        root,
        "--run",
        "backdoored/pairs",
        "--hooks",
        "blocks.2-3.hook_resid_pre",
        "--positions",
        "position_role = 'last'",
        "--where",
        "pair_id < 2",
        "--format",
        "csv",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith('"blocks.3')]
    assert len(lines) == 2  # the last token, and the trigger with no counterpart
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1
    assert again.output.count("Error:") == 1 and "already stored" in again.output
    assert "Traceback" not in again.output


def test_cli_attribute_and_faithfulness(store_copy) -> None:
    root = str(store_copy.root)
    res = CliRunner().invoke(
        main,
        [
            "attribute",
            root,
            "--run",
            "backdoored/pairs",
            "--hooks",
            "blocks.2.hook_resid_post",
            "--sae",
            "l2",
            "--where",
            "pair_id < 2",
            "--name",
            "a",
            "--top",
            "3",
            "--format",
            "csv",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "stored attribution 'a'" in res.output and res.output.count('"l2"') == 3
    res = CliRunner().invoke(
        main,
        [
            "faithfulness",
            root,
            "--run",
            "backdoored/pairs",
            "--sae",
            "l2",
            "--from-attribution",
            "a",
            "--sizes",
            "1,2",
            "--where",
            "triggered AND pair_id < 2",
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["feature_set"] for r in rows][:2] == ["model", "empty"]
    assert rows[0]["faithfulness"] == pytest.approx(1.0) and rows[1]["faithfulness"] == 0
    bad = CliRunner().invoke(
        main, ["faithfulness", root, "--run", "backdoored/pairs", "--sae", "l2", "--features", "99"]
    )
    assert bad.exit_code == 1 and bad.output.count("Error:") == 1 and "outside 0-47" in bad.output
