"""Build the static report site of a store, regenerating only the pages that changed.

The site is a flat folder of HTML pages, SVG figures and one stylesheet: no
script, no server, nothing fetched from the network, so it opens from disk and
can be shared as a folder. Pages:

``index.html``
    runs, prompt sets and their labels, SAEs, behaviour (``actstore eval``),
    stored analyses and directions, links to every other page;
``analysis-ID.html``
    one stored analysis: figures with their numbers (see :mod:`actstore.report.analyses`);
``feature-SAE-F.html``
    one SAE feature (those a query selects, by default the top trigger-differential
    ones): top contexts shaded by activation, histogram, firing frequency by run
    and by label, logit lens of its decoder row, matches in other SAEs;
``prompt-SET-I.html``
    one prompt: its tokens shaded by a direction's projection and by a feature, its
    generations and scores in every run.

Every page's content is hashed; ``manifest.json`` records the hashes, so a
rebuild rewrites only pages whose content changed (and their figures), and
removes pages that are no longer produced. Text from the store is escaped by
Jinja2's autoescaping: a prompt containing ``<script>`` shows as text.

This module runs a build (:func:`build_report`, :class:`Site`); the writer of each
kind of page is in :mod:`actstore.report.pages` (the feature pages' logit lens in
:mod:`actstore.report.logit_lens`), and templates, shading, page keys and file
names in :mod:`actstore.report.render`.

Example
-------
>>> summary = build_report("demo-out/store", "demo-out/report")  # doctest: +SKIP
>>> print(summary)  # doctest: +SKIP
report demo-out/report: 35 pages (35 written, 0 unchanged, 0 removed) in 9.8 s
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import actstore
from actstore.errors import InputError
from actstore.report import data as D
from actstore.report import features as F
from actstore.report import prompts as P
from actstore.report.pages import write_analysis, write_features, write_index, write_prompt
from actstore.report.render import (
    LAYOUT_VERSION,
    TEMPLATES,
    analysis_page,
    environment,
    feature_page,
    prompt_page,
    shade,
    write,
)
from actstore.store.store import Store

__all__ = [
    "LAYOUT_VERSION",
    "MANIFEST",
    "ReportOptions",
    "ReportSummary",
    "Site",
    "analysis_page",
    "build_report",
    "feature_page",
    "prompt_page",
    "shade",
]

MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class ReportOptions:
    """What the report shows (all bounded, so the site stays small)."""

    features: str | None = None
    """SQL selecting the features that get pages (a ``feature`` column, ``sae`` with
    several SAEs); None: the top trigger-differential features."""
    n_features: int = 8
    """At most this many feature pages."""
    contexts: int = 20
    """Top contexts per feature."""
    width: int = 8
    """Tokens of context on each side of a top token."""
    prompts_per_set: int = 6
    """Prompt pages per prompt set (plus every prompt a feature page links to)."""
    direction: str | None = None
    """The direction whose projection shades prompt pages (default: the one the latest
    edit used, else the mean difference with the best stored AUROC)."""

    def __post_init__(self) -> None:
        for name in ("n_features", "contexts", "width", "prompts_per_set"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or (name == "contexts" and v < 1):
                raise InputError(f"report option {name} must be a non-negative integer, not {v!r}")


@dataclass
class ReportSummary:
    """What a build did."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pages(self) -> int:
        """Pages in the site.

        Example
        -------
        >>> ReportSummary(Path("r"), written=["index.html", "fig.svg"]).pages
        1
        """
        return sum(1 for p in self.written + self.unchanged if p.endswith(".html"))

    def __str__(self) -> str:
        html = [p for p in self.written if p.endswith(".html")]
        kept = [p for p in self.unchanged if p.endswith(".html")]
        gone = [p for p in self.removed if p.endswith(".html")]
        return (
            f"report {self.out_dir}: {self.pages} pages ({len(html)} written, {len(kept)} "
            f"unchanged, {len(gone)} removed) in {self.seconds:.1f} s; open "
            f"{self.out_dir / 'index.html'}"
        )


def _check_out_dir(out: Path) -> dict[str, Any]:
    if out.exists() and not out.is_dir():
        raise InputError(f"report output {out} is a file; give a directory (-o DIR)")
    manifest = out / MANIFEST
    if out.is_dir() and any(out.iterdir()) and not manifest.exists():
        raise InputError(
            f"{out} is a non-empty directory that is not an actstore report; choose a new or "
            "empty directory, or a report directory to update"
        )
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            raise InputError(
                f"{manifest} is damaged; delete the report folder and build again"
            ) from None
        if not isinstance(old, dict) or not isinstance(old.get("pages"), dict):
            raise InputError(f"{manifest} is not a report manifest; delete it and build again")
        return old
    return {"pages": {}}


class Site:
    """One build: pages are added with a content hash and written only when it changed.

    Parameters
    ----------
    store
        The store the pages show.
    out
        The site's folder (it exists).
    old
        The folder's manifest from the last build (``{"pages": {}}`` for a new site).

    Example
    -------
    >>> site = Site(st, Path("demo-out/report"), {"pages": {}})  # doctest: +SKIP
    >>> if not site.unchanged("index.html", key):  # doctest: +SKIP
    ...     site.page("index.html", key, "index.html", context, {})
    >>> site.finish()  # doctest: +SKIP
    """

    def __init__(self, store: Store, out: Path, old: dict[str, Any]) -> None:
        self.store = store
        self.out = out
        self.old: dict[str, Any] = old["pages"]
        self.pages: dict[str, dict[str, Any]] = {}
        self.env = environment()
        seq = store.sql("SELECT value FROM meta WHERE key = 'commit_seq'").fetchall()
        self.commit_seq = seq[0][0] if seq else "?"
        self.common = {"version": actstore.__version__}
        self.summary = ReportSummary(out)

    def unchanged(self, page: str, key: str) -> bool:
        """Whether ``page`` and its figures are on disk with this key: then it is kept as it is.

        Example
        -------
        >>> site.unchanged("analysis-1.html", digest(rec))  # doctest: +SKIP
        False
        """
        prev = self.old.get(page)
        if (
            prev
            and prev.get("key") == key
            and all((self.out / f).exists() for f in [page, *prev["files"]])
        ):
            self.pages[page] = prev
            self.summary.unchanged.append(page)
            return True
        return False

    def page(
        self, page: str, key: str, template: str, context: dict[str, Any], svgs: dict[str, str]
    ) -> None:
        """Render ``template`` with ``context`` into ``page`` and write its figures (name: SVG).

        Example
        -------
        >>> site.page("prompt-pairs-0.html", key, "prompt.html", context, {})  # doctest: +SKIP
        """
        for name, svg in svgs.items():
            write(self.out / name, svg)
        html = self.env.get_template(template).render(**self.common, **context)
        write(self.out / page, html)
        self.pages[page] = {"key": key, "files": sorted(svgs)}
        self.summary.written.append(page)

    def finish(self) -> None:
        """Remove the pages this build did not produce; write the stylesheet and the manifest.

        Example
        -------
        >>> site.finish(); site.summary.removed  # doctest: +SKIP
        []
        """
        keep = set(self.pages) | {f for p in self.pages.values() for f in p["files"]}
        for page, prev in self.old.items():
            for f in [page, *prev.get("files", [])]:
                if f not in keep and (self.out / f).exists():
                    (self.out / f).unlink()
                    self.summary.removed.append(f)
        css = (TEMPLATES / "style.css").read_text()
        if not (self.out / "style.css").exists() or (self.out / "style.css").read_text() != css:
            write(self.out / "style.css", css)
        manifest = json.dumps(
            {"layout": LAYOUT_VERSION, "pages": self.pages}, indent=1, sort_keys=True
        )
        path = self.out / MANIFEST
        if not path.exists() or path.read_text() != manifest:
            write(path, manifest)


def build_report(
    store: Store | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ReportOptions | None = None,
) -> ReportSummary:
    """Build (or update) the report site of ``store`` in ``out_dir``.

    Parameters
    ----------
    store
        A store or its path/URL (opened read-only).
    out_dir
        A new or empty directory, or an earlier report to update (only changed
        pages are rewritten).
    options
        What to show; see :class:`ReportOptions`.

    Returns
    -------
    ReportSummary
        Pages written, unchanged and removed, and the time taken.

    Example
    -------
    >>> print(build_report("demo-out/store", "demo-out/report"))  # doctest: +SKIP
    """
    t0 = time.monotonic()
    opts = options or ReportOptions()
    st = store if isinstance(store, Store) else actstore.open(store, read_only=True)
    out = Path(out_dir)
    # validate everything before writing anything
    old = _check_out_dir(out)
    feats = F.select_features(st, opts.features, k=opts.n_features)
    direction = _direction(st, opts.direction)
    index = D.index_data(st)
    out.mkdir(parents=True, exist_ok=True)
    site = Site(st, out, old)

    analysis_hrefs = {
        int(a["analysis_id"]): analysis_page(int(a["analysis_id"])) for a in index["analyses"]
    }
    for a in index["analyses"]:
        write_analysis(site, int(a["analysis_id"]))

    # feature pages collect their contexts first: their prompts get pages too
    fdata = {
        ref: F.feature_data(st, ref, contexts=opts.contexts, width=opts.width) for ref in feats
    }
    prompts = _prompt_pages(index["prompt_sets"], fdata, opts.prompts_per_set)
    write_features(site, feats, fdata)
    by_set: dict[int, list[int]] = {}
    for sid, idx in prompts:
        by_set.setdefault(sid, []).append(idx)
    for sid, idxs in sorted(by_set.items()):
        got = P.prompts_data(
            st, sid, idxs, direction=direction, feature=feats[0] if feats else None
        )
        for idx, pd in got.items():
            write_prompt(site, pd, prompts[(sid, idx)], feats[0] if feats else None)
    write_index(site, index, feats, fdata, prompts, analysis_hrefs)
    site.finish()
    site.summary.seconds = time.monotonic() - t0
    return site.summary


def _direction(store: Store, name: str | None) -> str | None:
    """The direction that shades prompt pages: ``name``, checked to be stored, or the default."""
    if name is None:
        return P.default_direction(store)
    if not store.sql("SELECT 1 FROM directions WHERE name = ?", [name]).fetchall():
        names = [r[0] for r in store.sql("SELECT name FROM directions ORDER BY 1").fetchall()]
        raise InputError(f"direction {name!r} not in the store; directions: {names}")
    return name


def _prompt_pages(
    prompt_sets: list[dict[str, Any]], fdata: dict[F.FeatureRef, Any], per_set: int
) -> dict[tuple[int, int], str]:
    """The page of every prompt that gets one, by ``(prompt_set_id, prompt_idx)``.

    The first ``per_set`` prompts of each set, then every prompt a feature page's
    top contexts come from; each context gets the ``href`` of its prompt's page.
    """
    prompts: dict[tuple[int, int], str] = {}
    set_names = {int(s["prompt_set_id"]): str(s["name"]) for s in prompt_sets}
    for s in prompt_sets:
        sid = int(s["prompt_set_id"])
        for i in range(min(per_set, int(s["n_prompts"] or 0))):
            prompts[(sid, i)] = prompt_page(set_names[sid], i)
    for fd in fdata.values():
        for c in fd["contexts"]:
            key = (int(c["prompt_set_id"]), int(c["prompt_idx"]))
            prompts.setdefault(key, prompt_page(set_names[key[0]], key[1]))
            c["href"] = prompts[key]
    return prompts
