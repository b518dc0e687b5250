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

import numpy as np

import actstore
from actstore.errors import InputError
from actstore.report import analyses as A
from actstore.report import data as D
from actstore.report import features as F
from actstore.report import figures
from actstore.report import prompts as P
from actstore.report.logit_lens import lens_rows, lens_source
from actstore.report.render import (
    LAYOUT_VERSION,
    TEMPLATES,
    analysis_page,
    digest,
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


class _Site:
    """One build: pages are added with a content hash and written only when it changed."""

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
        for name, svg in svgs.items():
            write(self.out / name, svg)
        html = self.env.get_template(template).render(**self.common, **context)
        write(self.out / page, html)
        self.pages[page] = {"key": key, "files": sorted(svgs)}
        self.summary.written.append(page)

    def finish(self) -> None:
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
    direction = opts.direction
    if direction is not None:
        if not st.sql("SELECT 1 FROM directions WHERE name = ?", [direction]).fetchall():
            names = [r[0] for r in st.sql("SELECT name FROM directions ORDER BY 1").fetchall()]
            raise InputError(f"direction {direction!r} not in the store; directions: {names}")
    else:
        direction = P.default_direction(st)
    index = D.index_data(st)
    out.mkdir(parents=True, exist_ok=True)
    site = _Site(st, out, old)

    analysis_hrefs = {
        int(a["analysis_id"]): analysis_page(int(a["analysis_id"])) for a in index["analyses"]
    }
    for a in index["analyses"]:
        _analysis(site, int(a["analysis_id"]))

    # feature pages collect their contexts first: their prompts get pages too
    fdata = {
        ref: F.feature_data(st, ref, contexts=opts.contexts, width=opts.width) for ref in feats
    }
    prompts: dict[tuple[int, int], str] = {}
    set_names = {int(s["prompt_set_id"]): str(s["name"]) for s in index["prompt_sets"]}
    for s in index["prompt_sets"]:
        sid = int(s["prompt_set_id"])
        for i in range(min(opts.prompts_per_set, int(s["n_prompts"] or 0))):
            prompts[(sid, i)] = prompt_page(set_names[sid], i)
    for fd in fdata.values():
        for c in fd["contexts"]:
            key = (int(c["prompt_set_id"]), int(c["prompt_idx"]))
            prompts.setdefault(key, prompt_page(set_names[key[0]], key[1]))
            c["href"] = prompts[key]
    _features(site, feats, fdata)
    by_set: dict[int, list[int]] = {}
    for sid, idx in prompts:
        by_set.setdefault(sid, []).append(idx)
    for sid, idxs in sorted(by_set.items()):
        got = P.prompts_data(
            st, sid, idxs, direction=direction, feature=feats[0] if feats else None
        )
        for idx, pd in got.items():
            _prompt(site, pd, prompts[(sid, idx)], feats[0] if feats else None)
    _index(site, index, feats, fdata, prompts, analysis_hrefs)
    site.finish()
    site.summary.seconds = time.monotonic() - t0
    return site.summary


def _analysis(site: _Site, aid: int) -> None:
    rec = D.analysis_record(site.store, aid)
    page = analysis_page(aid)
    key = digest(rec)
    if site.unchanged(page, key):
        return
    secs = A.analysis_sections(site.store, rec)
    svgs = {}
    for i, s in enumerate(secs):
        svg = s.pop("svg", None)
        s["figure"] = None
        if svg:
            s["figure"] = f"fig-analysis-{aid}-{i}.svg"
            svgs[s["figure"]] = svg
    params = [
        [k, json.dumps(v) if not A.is_scalar(v) else v] for k, v in sorted(rec["params"].items())
    ]
    context = {
        "title": f"{rec['name']} ({rec['kind']})",
        "nav": [("analyses", "index.html#analyses")],
        "rec": rec,
        "secs": secs,
        "params": params,
        "result_json": json.dumps(rec["result"], indent=1)[:200_000],
        "provenance_json": json.dumps(rec["provenance"], indent=1),
    }
    site.page(page, key, "analysis.html", context, svgs)


def _features(site: _Site, feats: list[F.FeatureRef], fdata: dict[F.FeatureRef, Any]) -> None:
    decoders: dict[int, np.ndarray] = {}
    sae_names = {
        int(i): str(n) for i, n in site.store.sql("SELECT sae_id, name FROM saes").fetchall()
    }
    why_not: dict[int, str | None] = {}
    for sid in sae_names:
        W, why_not[sid] = F.decoder_rows(site.store, sid)
        if W is not None:
            decoders[sid] = W
    pages = {(r.sae_id, r.feature): feature_page(r) for r in feats}
    models: dict[str, Any] = {}
    for i, ref in enumerate(feats):
        d = fdata[ref]
        lens_path, lens_note, lens_key = lens_source(
            site.store, ref, decoders.get(ref.sae_id), why_not[ref.sae_id]
        )
        matches: list[dict[str, Any]] = []
        matches_note = "no other SAE of this width in the store"
        if ref.sae_id in decoders:
            matches = F.feature_matches(decoders, sae_names, ref.sae_id, ref.feature)
            for m in matches:
                m["href"] = pages.get((m["sae_id"], m["feature"]))
        else:
            matches_note = f"no decoder: {why_not[ref.sae_id]}"
        page = feature_page(ref)
        nav = {
            "prev": feature_page(feats[i - 1]) if i > 0 else None,
            "next": feature_page(feats[i + 1]) if i + 1 < len(feats) else None,
        }
        key = digest([d, lens_key, lens_note, matches, nav])
        if site.unchanged(page, key):
            continue
        lens = None
        if lens_path is not None:
            lens, lens_note = lens_rows(models, lens_path, decoders[ref.sae_id][ref.feature])
        labels = d["labels"]
        runs = [r["run"] for r in d["by_run"]]
        series: dict[str, list[float | None]] = {"all tokens": [r["freq"] for r in d["by_run"]]}
        if labels:
            series[labels[0]] = [r["by_label"][labels[0]]["true"] for r in d["by_run"]]
            series[f"not {labels[0]}"] = [r["by_label"][labels[0]]["false"] for r in d["by_run"]]
        hist_name, freq_name = f"fig-{ref.slug}-hist.svg", f"fig-{ref.slug}-freq.svg"
        title = f"{ref.sae} feature {ref.feature}"
        svgs = {
            hist_name: figures.histogram(d["hist"], title=f"{title}, {ref.run or 'every run'}"),
            freq_name: figures.grouped_bars(runs, series, title=title, ylabel="firing frequency"),
        }
        freq_columns = ["run", "tokens", "fired", "freq", "mean", "max"]
        for c in labels:
            freq_columns += [f"freq | {c}", f"freq | not {c}"]
        freq_rows = [
            [r["run"], r["n_tokens"], r["n_fired"], r["freq"], r["mean"], r["max"]]
            + [x for c in labels for x in (r["by_label"][c]["true"], r["by_label"][c]["false"])]
            for r in d["by_run"]
        ]
        top = max((c["value"] for c in d["contexts"]), default=0.0)
        context = {
            "title": title,
            "nav": [("features", "index.html#features")],
            "d": d,
            "scale": top,
            "hist_svg": hist_name,
            "freq_svg": freq_name,
            "freq_columns": freq_columns,
            "freq_rows": freq_rows,
            "lens": lens,
            "lens_note": lens_note,
            "matches": matches,
            "matches_note": matches_note,
            **nav,
        }
        site.page(page, key, "feature.html", context, svgs)


def _prompt(site: _Site, d: dict[str, Any], page: str, feat: F.FeatureRef | None) -> None:
    sid, idx = d["prompt_set_id"], d["prompt_idx"]
    feature_href = feature_page(feat) if feat is not None else None
    key = digest([d, feature_href])
    if site.unchanged(page, key):
        return
    projs = [abs(t["proj"]) for r in d["runs"] for t in r["tokens"] if t["proj"] is not None]
    featv = [abs(t["feat"]) for r in d["runs"] for t in r["tokens"] if t["feat"] is not None]
    for r in d["runs"]:
        r["score_rows"] = [
            [s["sample_idx"], s["scorer"], s["value"], s["flag"]] for s in r["scores"]
        ]
    context = {
        "title": f"{d['prompt_set']} #{idx}",
        "nav": [("prompt sets", f"index.html#prompt-set-{sid}")],
        "d": d,
        "label_rows": [[k, v] for k, v in d["labels"].items()],
        "proj_scale": max(projs, default=0.0),
        "feat_scale": max(featv, default=0.0),
        "feature_href": feature_href,
    }
    site.page(page, key, "prompt.html", context, {})


def _index(
    site: _Site,
    d: dict[str, Any],
    feats: list[F.FeatureRef],
    fdata: dict[F.FeatureRef, Any],
    prompts: dict[tuple[int, int], str],
    analysis_hrefs: dict[int, str],
) -> None:
    for a in d["analyses"]:
        a["href"] = analysis_hrefs[int(a["analysis_id"])]
    texts = {
        (int(s), int(i)): str(t)
        for s, i, t in site.store.sql(
            "SELECT prompt_set_id, prompt_idx, text FROM prompts"
        ).fetchall()
    }
    prompt_links: dict[int, list[dict[str, Any]]] = {}
    for (sid, idx), page in sorted(prompts.items()):
        text = texts.get((sid, idx), "")
        prompt_links.setdefault(sid, []).append(
            {
                "prompt_idx": idx,
                "href": page,
                "text": text,
                "short": text[:48] + ("..." if len(text) > 48 else ""),
            }
        )
    labels = D.boolean_labels(site.store)
    feature_columns = ["feature", "runs", "max", "freq (all runs)"]
    if labels:
        feature_columns += [f"freq | {labels[0]}", f"freq | not {labels[0]}"]
    rows = []
    for ref in feats:
        br = fdata[ref]["by_run"]
        n = sum(r["n_tokens"] for r in br)
        extra = [
            len(br),
            max((r["max"] for r in br if r["max"] is not None), default=None),
            sum(r["n_fired"] for r in br) / n if n else None,
        ]
        if labels:
            nt = sum(r["by_label"][labels[0]]["n_true"] for r in br)
            nf = sum(r["by_label"][labels[0]]["n_false"] for r in br)
            ft = sum(
                (r["by_label"][labels[0]]["true"] or 0) * r["by_label"][labels[0]]["n_true"]
                for r in br
            )
            ff = sum(
                (r["by_label"][labels[0]]["false"] or 0) * r["by_label"][labels[0]]["n_false"]
                for r in br
            )
            extra += [ft / nt if nt else None, ff / nf if nf else None]
        rows.append(
            {"sae": ref.sae, "feature": ref.feature, "href": feature_page(ref), "extra": extra}
        )
    behaviour_columns = list(d["behaviour"][0]) if d["behaviour"] else []
    context = {
        "title": "actstore report",
        "nav": [],
        "d": d,
        "features": rows,
        "feature_columns": feature_columns,
        "features_why": feats[0].why
        if feats
        else "the store has no SAE features with a boolean label, or the query selected none",
        "prompt_links": prompt_links,
        "n_prompt_pages": len(prompts),
        "behaviour_columns": behaviour_columns,
        "behaviour_rows": [[r[c] for c in behaviour_columns] for r in d["behaviour"]],
        "sae_rows": [
            [s[c] for c in ("sae_id", "name", "hook", "layer", "d_in", "d_sae", "architecture")]
            for s in d["saes"]
        ],
        "analysis_hrefs": analysis_hrefs,
    }
    key = digest([context, str(site.store.root)])
    if not site.unchanged("index.html", key):
        where = {"commit_seq": site.commit_seq, "store": str(site.store.root)}
        site.page("index.html", key, "index.html", {**context, **where}, {})
