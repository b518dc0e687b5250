"""The report in a real browser: headless Chromium loads every page of the site.

Skipped, with how to enable it, where Chromium is not installed
(``apt-get install -y chromium``; CI installs it in ``.ci/run``). Set
``ACTSTORE_SCREENSHOTS=docs/img`` to write the README's screenshots there.
"""

from __future__ import annotations

import os
import re
from collections import deque
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.helpers.chromium import Chromium, PageVisit, find_chromium

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="headless Chromium not found: install it (apt-get install -y chromium) to run the "
    "browser tests of the report",
)


def crawl(browser: Chromium, site: Path) -> dict[Path, PageVisit]:
    """Visit index.html and every page it links to, transitively; check every link resolves."""
    site = site.resolve()
    todo, seen = deque([site / "index.html"]), {site / "index.html"}
    visits: dict[Path, PageVisit] = {}
    fragments: list[tuple[Path, Path, str]] = []
    while todo:
        page = todo.popleft()
        visit = browser.visit(page.as_uri())
        visits[page] = visit
        assert not visit.errors, f"{page.name}: {visit.errors}"
        for link in visit.links:
            url = urlsplit(link)
            assert url.scheme == "file", f"{page.name} links outside the site: {link}"
            target = Path(unquote(url.path))
            assert target.is_file(), f"{page.name}: broken link {link}"
            assert site in target.parents, f"{page.name} links outside the site: {link}"
            if url.fragment:
                fragments.append((page, target, url.fragment))
            if target.suffix == ".html" and target not in seen:
                seen.add(target)
                todo.append(target)
    for page, target, frag in fragments:
        assert frag in visits[target].ids, f"{page.name}: no #{frag} in {target.name}"
    return visits


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("websocket", reason="pip install websocket-client to drive Chromium")
    with Chromium(width=1280, height=860) as b:
        yield b


def test_every_page_of_the_demo_report_loads_cleanly(browser, demo_report, tmp_path):
    site = demo_report["site"]
    visits = crawl(browser, site)
    # every page of the site was reached through links
    pages = {p.resolve() for p in site.glob("*.html")}
    assert set(visits) == pages
    index = visits[site.resolve() / "index.html"]
    feature_links = re.findall(r'<a href="(feature-[^"]+\.html)">', index.html)
    assert feature_links, "the index lists no feature pages"
    # the top trigger-differential feature: its own page, as the browser rendered it
    top = visits[site.resolve() / feature_links[0]]
    rows = re.findall(r'<tr class="context"([^>]*)>', top.html)
    assert len(rows) == 20
    triggered = [r for r in rows if 'data-label-triggered="true"' in r]
    assert 'data-label-triggered="true"' in rows[0]  # the top context has the trigger
    assert len(triggered) >= len(rows) // 2
    assert top.html.count("<img") >= 2 and top.scripts == 0
    shots = Path(os.environ.get("ACTSTORE_SCREENSHOTS") or tmp_path)
    browser.visit((site / "index.html").resolve().as_uri())
    index_png = browser.screenshot(shots / "report_index.png")
    browser.visit((site / feature_links[0]).resolve().as_uri())
    feature_png = browser.screenshot(shots / "report_feature.png")
    for png in (index_png, feature_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_html_in_the_store_renders_as_text(browser, html_report):
    visits = crawl(browser, html_report)
    for page, visit in visits.items():
        assert visit.scripts == 0, f"{page.name} has a script element"
        assert "__pwned" not in visit.globals, f"{page.name} ran the prompt's script"
    prompt = visits[html_report.resolve() / "prompt-html_set_-0.html"]
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in prompt.html
    assert "&lt;img src=x onerror=alert(1)&gt;" in prompt.html
