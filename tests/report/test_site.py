"""The report site: feature pages against raw Parquet, escaping, generic analyses, incremental builds."""

from __future__ import annotations

import hashlib
import html
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.errors import InputError
from actstore.report import ReportOptions, build_report
from actstore.report.analyses import generic_sections
from actstore.store import objects
from tests.report.conftest import GRID, GRID_LAYERS, GRID_POSITIONS, STEERING


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cells(page: str, table_id: str | None = None) -> list[list[str]]:
    text = page
    if table_id is not None:
        text = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", text, flags=re.S)
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", r, flags=re.S)
        ]
        for r in rows
    ]


def _tables(page: str) -> list[list[dict[str, str]]]:
    """Every table of a page as rows of {header: cell text}."""
    out = []
    for t in re.findall(r"<table[^>]*>(.*?)</table>", page, flags=re.S):
        heads = [html.unescape(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<th>(.*?)</th>", t)]
        out.append([dict(zip(heads, r, strict=True)) for r in _cells(t) if r])
    return out


def test_top_feature_page_matches_the_raw_feature_files(demo_report):
    site, store = demo_report["site"], actstore.open(demo_report["store"], read_only=True)
    index = (site / "index.html").read_text()
    first = re.search(r'<a href="(feature-l2_resid-(\d+)\.html)">', index)
    assert first is not None
    page, feature = (site / first.group(1)).read_text(), int(first.group(2))
    run = re.search(r"Top activating contexts in ([^<]+)</h2>", page).group(1)
    # the selection: the top of trigger_diff in that run, by t
    top = store.sql(
        "SELECT feature FROM trigger_diff(?, 'l2_resid', 'triggered') WHERE diff > 0 ORDER BY rank",
        [run],
    ).fetchall()
    assert top[0][0] == feature
    # independently of SQL: the run's feature values straight from its Parquet parts
    (rid,) = store.sql("SELECT run_id FROM runs WHERE name = ?", [run]).fetchall()[0]
    parts = [
        pq.read_table(demo_report["store"] / p)
        for (p,) in store.sql("SELECT path FROM feature_files WHERE run_id = ?", [rid]).fetchall()
    ]
    vals = np.concatenate(
        [t.filter(pc.equal(t["feature"], feature))["value"].to_numpy() for t in parts]
    )
    contexts = [r for r in _cells(page, "contexts-table") if r]
    shown = [float(r[1]) for r in contexts]
    assert len(shown) == 20
    np.testing.assert_allclose(shown, np.sort(vals)[::-1][:20], rtol=1e-3)
    # the top contexts are triggered prompts, and say so
    assert all("triggered=True" in r[4] for r in contexts[:5])
    freq = {r[0]: r for r in _cells(page.split('id="frequency"', 1)[1]) if r}
    assert int(freq[run][2]) == vals.size  # tokens where it fires
    assert (site / f"fig-l2_resid-{feature}-hist.svg").read_text().lstrip().startswith("<?xml")


def test_report_leaves_the_store_byte_identical(html_store, tmp_path):
    before = _tree_digest(html_store)
    build_report(html_store, tmp_path / "site")
    assert _tree_digest(html_store) == before


def test_html_in_prompts_labels_and_names_is_escaped(html_report):
    pages = {p.name: p.read_text() for p in html_report.glob("*.html")}
    for name, text in pages.items():
        assert "<script" not in text.lower(), name
        assert "onerror=alert" not in text.replace("&lt;img src=x onerror=alert(1)&gt;", ""), name
    prompt = pages["prompt-html_set_-0.html"]
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in prompt
    assert "&lt;b&gt;bold?&lt;/b&gt;" in prompt
    assert "&lt;b&gt;patching&lt;/b&gt;" in pages["index.html"]
    assert "&lt;i&gt;dir&lt;/i&gt;" in pages["index.html"]
    # the direction shades prompt pages: each token's title carries its projection
    assert prompt.count('title="proj = ') >= 5


def test_analyses_of_unknown_kinds_get_figures_and_tables(html_store, html_report):
    st = actstore.open(html_store, read_only=True)
    ids = dict(st.sql("SELECT kind, analysis_id FROM analyses").fetchall())
    patch = (html_report / f"analysis-{ids['patching']}.html").read_text()
    fig = re.search(r'<img src="(fig-analysis-\d+-\d+\.svg)"', patch).group(1)
    assert "<image" in (html_report / fig).read_text()  # the heatmap's raster
    grid = [r for r in _cells(patch) if r and r[0] in {"0", "1", "2"}][:3]
    assert [r[0] for r in grid] == [str(x) for x in GRID_LAYERS]
    np.testing.assert_allclose([[float(x) for x in r[1:]] for r in grid], GRID, atol=1e-4)
    assert all(f"<th>{html.escape(p)}</th>" in patch for p in GRID_POSITIONS)
    steer = (html_report / f"analysis-{ids['steering']}.html").read_text()
    assert re.search(r'<img src="fig-analysis-\d+-\d+\.svg" alt="curve"', steer)
    curve = next(t for t in _tables(steer) if t and "alpha" in t[0])
    assert [float(r["alpha"]) for r in curve] == [s["alpha"] for s in STEERING]
    assert [float(r["rate_triggered"]) for r in curve] == [s["rate_triggered"] for s in STEERING]
    traj = (html_report / f"analysis-{ids['trajectory']}.html").read_text()
    assert re.search(r'<img src="fig-analysis-\d+-\d+\.svg" alt="auroc"', traj)


def test_generic_sections_read_the_shape_of_a_result():
    secs = generic_sections(
        {"layers": [0, 1], "positions": ["a", "b", "c"], "grid": [[1, 2, 3], [4, 5, 6]], "n": 7}
    )
    by = {s["title"]: s for s in secs}
    assert by["values"]["rows"] == [["n", 7]]
    assert by["grid"]["columns"] == ["layers", "a", "b", "c"]
    assert by["grid"]["rows"] == [[0, 1, 2, 3], [1, 4, 5, 6]]
    assert by["grid"]["svg"] is not None
    curve = generic_sections({"sweep": [{"alpha": 0, "y": 1.0}, {"alpha": 1, "y": 2.0}]})[0]
    assert curve["columns"] == ["alpha", "y"] and curve["svg"] is not None
    # text from the store is drawn literally: "$...$" is not matplotlib math
    money = generic_sections({"cost $x_1$ in $": [1.0, 2.0, 3.0]})[0]
    assert "cost $x_1$ in $" in money["svg"]


def test_rebuild_writes_only_what_changed(html_store, html_report, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(html_report, site)
    store = tmp_path / "store"
    shutil.copytree(html_store, store)
    before = {p.name: p.stat().st_mtime_ns for p in site.iterdir()}
    again = build_report(html_store, site, ReportOptions(prompts_per_set=2))
    assert again.written == [] and again.removed == []
    assert {p.name: p.stat().st_mtime_ns for p in site.iterdir()} == before
    st = actstore.open(store)
    aid = objects.add_analysis(st, name="new", kind="sweep", params={}, result={"x": [1, 2, 3]})
    st.close()
    # another store (the copy, one analysis more): the index names it and lists the analysis
    third = build_report(store, site, ReportOptions(prompts_per_set=1))
    assert sorted(p for p in third.written if p.endswith(".html")) == sorted(
        [f"analysis-{aid}.html", "index.html"]
    )
    assert third.removed == ["prompt-html_set_-1.html"]
    assert not (site / "prompt-html_set_-1.html").exists()
    assert f"analysis-{aid}.html" in (site / "index.html").read_text()


def test_bad_requests_are_refused_before_anything_is_written(html_store, tmp_path):
    out = tmp_path / "site"
    with pytest.raises(InputError, match="feature query failed"):
        build_report(html_store, out, ReportOptions(features="SELECT nonsense FROM nowhere"))
    with pytest.raises(InputError, match="direction 'nope' not in the store"):
        build_report(html_store, out, ReportOptions(direction="nope"))
    with pytest.raises(InputError, match="must be a non-negative integer"):
        ReportOptions(n_features=-1)
    assert not out.exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an actstore report"):
        build_report(html_store, taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_cli_report(html_store, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["report", str(html_store), "-o", str(tmp_path / "site")])
    assert ok.exit_code == 0, ok.output
    assert re.match(r"report .*site: \d+ pages \(\d+ written, 0 unchanged, 0 removed\)", ok.output)
    bad = runner.invoke(
        main, ["report", str(html_store), "-o", str(tmp_path / "x"), "--direction", "nope"]
    )
    assert bad.exit_code == 1
    assert bad.output.startswith("Error: direction 'nope' not in the store")
    assert len(bad.output.strip().splitlines()) == 1


def test_serve_follows_the_live_store_read_only(html_store, tmp_path):
    import threading
    import urllib.error
    import urllib.request

    from actstore.report.serve import make_server

    store = tmp_path / "store"
    shutil.copytree(html_store, store)
    server = make_server(store, port=0, options=ReportOptions(prompts_per_set=1))
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{host}:{port}"
    try:
        page = urllib.request.urlopen(f"{base}/").read().decode()
        assert "actstore report" in page and "sweep2" not in page
        st = actstore.open(store)
        aid = objects.add_analysis(st, name="sweep2", kind="sweep", params={}, result={"x": [1]})
        st.close()
        page = urllib.request.urlopen(f"{base}/index.html").read().decode()
        assert f'href="analysis-{aid}.html">sweep2' in page
        assert urllib.request.urlopen(f"{base}/analysis-{aid}.html").status == 200
        for bad in (
            urllib.request.Request(f"{base}/index.html", data=b"x", method="POST"),
            urllib.request.Request(f"{base}/../../etc/passwd"),
        ):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bad)
            assert e.value.code in (404, 501)
    finally:
        server.shutdown()
        server.server_close()
