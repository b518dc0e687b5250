"""The pages of the site, one writer per kind: analysis, SAE feature, prompt and index pages.

Each writer takes the data of its pages (read by :mod:`~actstore.report.data`,
:mod:`~actstore.report.analyses`, :mod:`~actstore.report.features` and
:mod:`~actstore.report.prompts`), keys each page by a hash of what it shows
(:func:`~actstore.report.render.digest`), and renders it through its template
with its figures only where that key changed since the last build; the
:class:`~actstore.report.site.Site` of the build decides, writes the files and
keeps the manifest. :func:`~actstore.report.site.build_report` calls them in
order: analyses, features (whose top contexts decide which prompts get pages),
prompts, and last the index, which links to every other page.

Example
-------
>>> from actstore.report.site import Site
>>> site = Site(st, Path("demo-out/report"), {"pages": {}})  # doctest: +SKIP
>>> write_analysis(site, 1); site.finish()  # doctest: +SKIP
>>> site.summary.written  # doctest: +SKIP
['analysis-1.html']
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.report import analyses as A
from actstore.report import data as D
from actstore.report import features as F
from actstore.report import figures
from actstore.report.logit_lens import lens_rows, lens_source
from actstore.report.render import analysis_page, digest, feature_page

if TYPE_CHECKING:
    from actstore.report.site import Site


def write_analysis(site: Site, aid: int) -> None:
    """Write the page of one stored analysis: its sections' figures and tables, params, result.

    Parameters
    ----------
    site
        The build.
    aid
        The ``analysis_id``; the page is :func:`~actstore.report.render.analysis_page`.

    Example
    -------
    >>> write_analysis(site, 3)  # doctest: +SKIP
    >>> (site.out / "analysis-3.html").exists()  # doctest: +SKIP
    True
    """
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


def write_features(site: Site, feats: list[F.FeatureRef], fdata: dict[F.FeatureRef, Any]) -> None:
    """Write the pages of the selected SAE features, each linking to the previous and next one.

    A page shows its top contexts, an activation histogram, firing frequency by
    run and label, the logit lens of its decoder row
    (:mod:`~actstore.report.logit_lens`) and its best matches in the other SAEs.

    Parameters
    ----------
    site
        The build.
    feats
        The features, in page order (:func:`~actstore.report.features.select_features`).
    fdata
        Each feature's :func:`~actstore.report.features.feature_data`, its contexts
        carrying the ``href`` of their prompt's page.

    Example
    -------
    >>> feats = F.select_features(st, None, k=2)  # doctest: +SKIP
    >>> fdata = {r: F.feature_data(st, r, contexts=20, width=8) for r in feats}  # doctest: +SKIP
    >>> write_features(site, feats, fdata)  # doctest: +SKIP
    """
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
        freq_columns, freq_rows = _freq_table(d)
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


def _freq_table(d: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """A feature page's firing table: a row per run, by every boolean label too."""
    labels = d["labels"]
    freq_columns = ["run", "tokens", "fired", "freq", "mean", "max"]
    for c in labels:
        freq_columns += [f"freq | {c}", f"freq | not {c}"]
    freq_rows = [
        [r["run"], r["n_tokens"], r["n_fired"], r["freq"], r["mean"], r["max"]]
        + [x for c in labels for x in (r["by_label"][c]["true"], r["by_label"][c]["false"])]
        for r in d["by_run"]
    ]
    return freq_columns, freq_rows


def write_prompt(site: Site, d: dict[str, Any], page: str, feat: F.FeatureRef | None) -> None:
    """Write one prompt's page: its tokens shaded in every run, its generations and scores.

    Parameters
    ----------
    site
        The build.
    d
        The prompt's data (one value of :func:`~actstore.report.prompts.prompts_data`).
    page
        Its file name (:func:`~actstore.report.render.prompt_page`).
    feat
        The feature that shades the tokens (linked to its page), or None.

    Example
    -------
    >>> from actstore.report.prompts import prompts_data
    >>> d = prompts_data(st, 1, [0], direction=None, feature=None)[0]  # doctest: +SKIP
    >>> write_prompt(site, d, "prompt-pairs-0.html", None)  # doctest: +SKIP
    """
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


def write_index(
    site: Site,
    d: dict[str, Any],
    feats: list[F.FeatureRef],
    fdata: dict[F.FeatureRef, Any],
    prompts: dict[tuple[int, int], str],
    analysis_hrefs: dict[int, str],
) -> None:
    """Write ``index.html``: the store's runs, prompt sets, SAEs, behaviour, analyses, directions.

    Parameters
    ----------
    site
        The build.
    d
        The store's :func:`~actstore.report.data.index_data`.
    feats, fdata
        The features with pages and their data, summarised in a table.
    prompts
        The page of every prompt that has one, by ``(prompt_set_id, prompt_idx)``.
    analysis_hrefs
        The page of every stored analysis, by ``analysis_id``.

    Example
    -------
    >>> write_index(site, D.index_data(st), [], {}, {}, {})  # doctest: +SKIP
    >>> (site.out / "index.html").exists()  # doctest: +SKIP
    True
    """
    for a in d["analyses"]:
        a["href"] = analysis_hrefs[int(a["analysis_id"])]
    prompt_links = _prompt_links(site, prompts)
    feature_columns, rows = _feature_table(D.boolean_labels(site.store), feats, fdata)
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


def _prompt_links(
    site: Site, prompts: dict[tuple[int, int], str]
) -> dict[int, list[dict[str, Any]]]:
    """The index's links to the prompt pages, by prompt set, each with its prompt's text."""
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
    return prompt_links


def _feature_table(
    labels: list[str], feats: list[F.FeatureRef], fdata: dict[F.FeatureRef, Any]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The index's feature table: columns, and a row per feature pooled over its runs.

    With a boolean label, the firing frequency on tokens of prompts with and
    without the first one.
    """
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
    return feature_columns, rows
