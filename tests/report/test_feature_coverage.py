"""Feature pages of SAEs encoded after the ingest (tests/helpers/coverage.py's store).

After a positions-restricted encode a run's page statistics count its encoded
rows only (checked against numpy statistics of sae_lens' own encode of exactly
those rows) and the page says so; prompt pages leave the other tokens unshaded
(no features, not zero). An interrupted encode is refused with one line naming the
command that finishes it, before the report folder is created, leaving the store
byte-identical.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.errors import NotFoundError
from actstore.report import ReportOptions, build_report
from actstore.report import features as F
from actstore.report.prompts import prompts_data
from tests.helpers.coverage import CUT_ROWS, LAST3, RUNS, reference, snapshot, stored_rows
from tests.report.test_site import _tables

OPTS = {"n_features": 2, "contexts": 5, "prompts_per_set": 1}


def _feature(st: actstore.Store, sae_dir, sae: str) -> tuple[int, dict[str, dict[str, float]]]:
    """A feature that fires on some encoded rows, and numpy's per-run statistics of it."""
    per = {run: reference(st, sae_dir, run, stored_rows(st, run, sae == "last3")) for run in RUNS}
    f = int(np.abs((per[RUNS[0]] > 0).mean(0) - 0.5).argmin())  # fires on about half
    stats = {
        run: {
            "tokens": X.shape[0],
            "fired": int((X[:, f] > 0).sum()),
            "freq": float((X[:, f] > 0).mean()),
            "mean": float(X[:, f].astype(np.float64).mean()),
            "max": float(X[:, f].max()),
        }
        for run, X in per.items()
    }
    return f, stats


@pytest.mark.parametrize("sae", ["last3", "full"])
def test_page_statistics_are_over_the_encoded_rows(coverage_store, tmp_path, sae):
    root, sae_dir = coverage_store["store"], coverage_store["sae"]
    st = actstore.open(root, read_only=True)
    f, want = _feature(st, sae_dir, sae)
    assert 0 < want[RUNS[0]]["fired"] < want[RUNS[0]]["tokens"]
    before = snapshot(root)
    build_report(
        st,
        tmp_path / "site",
        ReportOptions(features=f"SELECT '{sae}' AS sae, {f} AS feature", **OPTS),
    )
    assert snapshot(root) == before
    page = (tmp_path / "site" / f"feature-{sae}-{f}.html").read_text()
    freq = next(t for t in _tables(page) if t and "fired" in t[0])
    assert [r["run"] for r in freq] == list(RUNS)
    for r in freq:
        w = want[r["run"]]
        assert int(r["tokens"]) == w["tokens"] and int(r["fired"]) == w["fired"]
        for col in ("freq", "mean", "max"):
            assert float(r[col]) == pytest.approx(w[col], rel=1e-3)  # shown with 4 digits
    notes = [html.unescape(n) for n in re.findall(r'<p class="note coverage">(.*?)</p>', page)]
    if sae == "full":
        assert (
            notes == []
            and want[RUNS[0]]["tokens"]
            == st.array_info(RUNS[0], "blocks.1.hook_resid_post")["n_rows"]
        )
        return
    assert len(notes) == 2 and all(
        f"was encoded for the rows {LAST3!r} only" in n and f"count those {w['tokens']} tokens" in n
        for n, w in zip(notes, want.values(), strict=True)
    )
    # prompt pages: the feature of encoded tokens (zeros counted), None for the others
    ref = F.select_features(st, f"SELECT 'last3' AS sae, {f} AS feature", k=1)[0]
    got = prompts_data(st, 1, [0, 1], direction=None, feature=ref)
    rows = stored_rows(st, RUNS[0], last3=True)
    X = reference(st, sae_dir, RUNS[0], rows)
    value = dict(zip(rows.tolist(), X[:, f].tolist(), strict=True))
    seen = 0
    for p in got.values():
        toks = next(r for r in p["runs"] if r["name"] == RUNS[0])["tokens"]
        for t in toks:
            if t["row"] in value:
                seen += 1
                assert t["feat"] == pytest.approx(value[t["row"]], rel=1e-6, abs=1e-7)
            else:
                assert t["feat"] is None
    assert 0 < seen < sum(len(r["tokens"]) for p in got.values() for r in p["runs"]) / 2


@pytest.mark.parametrize(
    "features",
    [
        "SELECT 'cut' AS sae, 3 AS feature",
        "SELECT 'cut' AS sae, 3 AS feature, 'a/pairs' AS run",  # its pages cover b/pairs too
        None,  # the default selection runs trigger_diff on every (run, SAE)
    ],
)
def test_an_interrupted_encode_is_refused_before_anything_is_written(
    coverage_store, tmp_path, features
):
    root = coverage_store["store"]
    st = actstore.open(root, read_only=True)
    n = stored_rows(st, RUNS[1], last3=False).size
    before = snapshot(root)
    match = (
        rf"report: run 'b/pairs' has features of SAE 'cut' for {CUT_ROWS} of its {n} rows "
        rf"\(an encode is in progress or was interrupted\); finish it with "
        rf"`actstore encode \S+ --sae cut --run b/pairs`"
    )
    with pytest.raises(NotFoundError, match=match):
        build_report(st, tmp_path / "site", ReportOptions(features=features, **OPTS))
    assert not (tmp_path / "site").exists()
    args = ["report", str(root), "-o", str(tmp_path / "cli")]
    r = CliRunner().invoke(main, args + ([] if features is None else ["--features", features]))
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert re.match("Error: " + match, r.output)
    assert not (tmp_path / "cli").exists()
    assert snapshot(root) == before
