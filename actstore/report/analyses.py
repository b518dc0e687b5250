"""Pages of stored analyses: figures with their numbers beside them, for any kind.

A stored analysis is a JSON record (``analyses.result``). Kinds the report knows
get a chart made for them (``contrast``: AUROC by layer over the random band;
``pca``: the rows on two components coloured by a label; ``unembed``: token
tables). Every other kind, including kinds added after this module (patching
grids, steering curves, trajectories), is rendered from the shape of its
result by :func:`generic_sections`:

- top-level scalars become a key/value table;
- a list of records becomes a table, and a line chart of its numeric columns
  when one column is a natural x axis (``layer``, ``alpha``, ``step``, ...);
- a rectangular list of number lists becomes a heatmap (axis labels from sibling
  lists of the right lengths) with its numbers in a table;
- a list of numbers becomes a line chart and a table;
- nested objects are walked the same way, titled by their path.

A section is a dict ``{"title", "svg", "columns", "rows", "note"}``; the site
writes each ``svg`` to a file and puts the table beside it. :data:`RENDERERS`
maps a kind to its renderer; other modules may add entries.

Example
-------
>>> secs = generic_sections({"alpha": [0, 1], "rate": [0.1, 0.9]})
>>> [s["title"] for s in secs]
['rate']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.report import figures

if TYPE_CHECKING:
    from actstore.store.store import Store

Section = dict[str, Any]
MAX_ROWS = 300
"""Rows shown of one table (the JSON below the page has everything)."""
X_KEYS = (
    "layer",
    "alpha",
    "multiplier",
    "coefficient",
    "scale",
    "strength",
    "step",
    "epoch",
    "checkpoint",
    "position",
    "pos",
    "t",
    "x",
    "k",
)
"""Column names taken as the x axis of a line chart, in order of preference."""


def is_scalar(v: Any) -> bool:
    """Whether a JSON value is a scalar (None, str, int, float, bool).

    Example
    -------
    >>> is_scalar(3.5), is_scalar([1])
    (True, False)
    """
    return v is None or isinstance(v, str | int | float | bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def section(
    title: str,
    *,
    svg: str | None = None,
    columns: Sequence[str] = (),
    rows: Sequence[Sequence[Any]] = (),
    note: str | None = None,
) -> Section:
    """One block of a page: an optional figure, an optional table, an optional note.

    Example
    -------
    >>> section("t", columns=["a"], rows=[[1]])["rows"]
    [[1]]
    """
    shown = [list(r) for r in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        note = (note + " " if note else "") + f"(first {MAX_ROWS} of {len(rows)} rows)"
    return {"title": title, "svg": svg, "columns": list(columns), "rows": shown, "note": note}


def _flatten(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars of a record, with one level of nested scalar dicts as ``key.sub``."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if is_scalar(v):
            out[k] = v
        elif isinstance(v, Mapping) and all(is_scalar(x) for x in v.values()):
            for sk, sv in v.items():
                out[f"{k}.{sk}"] = sv
        elif isinstance(v, list) and len(v) <= 4 and all(is_scalar(x) for x in v):
            out[k] = ", ".join(str(x) for x in v)
    return out


def _records_section(title: str, records: list[Mapping[str, Any]]) -> Section:
    flat = [_flatten(r) for r in records]
    columns: list[str] = []
    for r in flat:
        columns += [c for c in r if c not in columns]
    rows = [[r.get(c) for c in columns] for r in flat]
    svg = None
    x_key = next((k for k in X_KEYS if k in columns and all(_number(r.get(k)) for r in flat)), None)
    if x_key is not None and len(flat) >= 2:
        numeric = [
            c
            for c in columns
            if c != x_key
            and all(r.get(c) is None or _number(r.get(c)) for r in flat)
            and any(_number(r.get(c)) for r in flat)
            and not c.startswith(("n_", "n."))
        ]
        group_key = next(
            (c for c in columns if c != x_key and all(isinstance(r.get(c), str) for r in flat)),
            None,
        )
        if numeric:
            xs = sorted({r[x_key] for r in flat})
            series: dict[str, list[float | None]] = {}
            groups = sorted({str(r.get(group_key)) for r in flat}) if group_key else [""]
            if len(groups) > 6:
                groups, group_key = [""], None
            for g in groups:
                for c in numeric[:6]:
                    by_x = {
                        r[x_key]: r.get(c)
                        for r in flat
                        if group_key is None or str(r.get(group_key)) == g
                    }
                    name = f"{g}: {c}" if group_key else c
                    series[name] = [by_x.get(x) for x in xs]
            svg = figures.lines(xs, dict(list(series.items())[:12]), title=title, xlabel=x_key)
    return section(title, svg=svg, columns=columns, rows=rows)


def _matrix(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) >= 1
        and all(isinstance(r, list) and r and all(x is None or _number(x) for x in r) for r in v)
        and len({len(r) for r in v}) == 1
        and (len(v) > 1 or len(v[0]) > 1)
    )


def _labels_for(parent: Mapping[str, Any], n: int, exclude: str, prefer: Sequence[str]) -> Any:
    candidates = [
        k
        for k, v in parent.items()
        if k != exclude and isinstance(v, list) and len(v) == n and all(is_scalar(x) for x in v)
    ]
    for p in prefer:
        for k in candidates:
            if p in k:
                return k, parent[k]
    return (candidates[0], parent[candidates[0]]) if candidates else (None, None)


def _matrix_section(title: str, M: list[list[Any]], parent: Mapping[str, Any], key: str) -> Section:
    ny, nx = len(M), len(M[0])
    ykey, ylabels = _labels_for(parent, ny, key, ("layer", "row", "source", "y"))
    xkey, xlabels = _labels_for(
        {k: v for k, v in parent.items() if k != ykey},
        nx,
        key,
        ("pos", "token", "col", "x", "head"),
    )
    svg = figures.heatmap(M, title=title, xlabels=xlabels, ylabels=ylabels)
    columns = [ykey or "row", *[str(x) for x in (xlabels or range(nx))]]
    rows = [[(ylabels[i] if ylabels else i), *M[i]] for i in range(ny)]
    note = f"rows: {ykey or 'index'}; columns: {xkey or 'index'}"
    return section(title, svg=svg, columns=columns, rows=rows, note=note)


def generic_sections(result: Mapping[str, Any], title: str = "") -> list[Section]:
    """Sections for any JSON result, from its shape (see the module docstring).

    Example
    -------
    >>> s = generic_sections({"grid": [[0.0, 1.0], [1.0, 0.5]], "layers": [0, 1]})
    >>> s[0]["columns"], s[0]["note"]
    (['layers', '0', '1'], 'rows: layers; columns: index')
    """
    out: list[Section] = []
    scalars = [[k, v] for k, v in result.items() if is_scalar(v)]
    if scalars:
        out.append(section(title or "values", columns=["key", "value"], rows=scalars))
    used_as_labels: set[str] = set()
    for k, v in result.items():
        if _matrix(v):
            sec = _matrix_section(f"{title}{k}", v, result, k)
            used_as_labels.update(x for x in (sec["columns"][0],) if x in result)
            out.append(sec)
    for k, v in result.items():
        path = f"{title}{k}"
        if is_scalar(v) or _matrix(v):
            continue
        if isinstance(v, Mapping):
            if v and all(is_scalar(x) for x in v.values()):
                out.append(
                    section(path, columns=["key", "value"], rows=[[a, b] for a, b in v.items()])
                )
            else:
                out.extend(generic_sections(v, f"{path}."))
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            out.append(_records_section(path, list(v)))
        elif isinstance(v, list) and v and all(x is None or _number(x) for x in v):
            if k in used_as_labels:
                continue
            xkey, xs = _labels_for(result, len(v), k, X_KEYS)
            if xkey is not None and all(_number(x) for x in xs) and k not in X_KEYS:
                svg = figures.lines(xs, {k: v}, title=path, xlabel=xkey) if len(v) >= 2 else None
                out.append(
                    section(path, svg=svg, columns=[xkey, k], rows=list(zip(xs, v, strict=True)))
                )
            elif xkey is None or k not in X_KEYS:
                idx = list(range(len(v)))
                svg = (
                    figures.lines(idx, {k: v}, title=path, xlabel="index") if len(v) >= 3 else None
                )
                out.append(
                    section(
                        path, svg=svg, columns=["index", k], rows=list(zip(idx, v, strict=True))
                    )
                )
        elif isinstance(v, list) and v and all(is_scalar(x) for x in v):
            if any(_number(x) for x in v) and k in X_KEYS:
                continue  # an axis of another entry
            out.append(section(path, note=", ".join(str(x) for x in v[:MAX_ROWS])))
        elif isinstance(v, list) and v and all(isinstance(x, list) for x in v):
            rows = [list(x) for x in v]
            width = max(len(r) for r in rows)
            out.append(section(path, columns=[str(i) for i in range(width)], rows=rows))
    return out


# -- kinds the report knows ----------------------------------------------------------


def contrast_sections(store: Store, rec: Mapping[str, Any]) -> list[Section]:
    """AUROC by layer over the random band, and the per-(layer, method) numbers.

    Example
    -------
    >>> contrast_sections(st, analysis_record(st, 2))[0]["title"]  # doctest: +SKIP
    'AUROC by layer'
    """
    res = rec["result"]
    layers = res.get("layers") or []
    svg = figures.auroc_by_layer(
        layers,
        title=f"{rec['name']} ({res.get('run')})",
        held_out=bool(res.get("held_out", True)),
    )
    columns = [
        "hook",
        "layer",
        "method",
        "auroc",
        "train_auroc",
        "random_mean",
        "random_p95",
        "random_max",
        "random_pvalue",
        "variance_ratio",
        "direction",
    ]
    rows = []
    for e in layers:
        r = e.get("random") or {}
        for m, a in (e.get("auroc") or {}).items():
            rows.append(
                [
                    e.get("hook"),
                    e.get("layer"),
                    m,
                    a,
                    (e.get("train_auroc") or {}).get(m),
                    r.get("mean"),
                    r.get("percentile"),
                    r.get("max"),
                    (e.get("random_pvalue") or {}).get(m),
                    e.get("variance_ratio"),
                    (e.get("direction_names") or {}).get(m),
                ]
            )
    groups = res.get("groups") or {}
    note = (
        f"groups: {', '.join(f'{k}={v}' for k, v in groups.items() if v is not None)}; "
        f"rows: {res.get('where') or 'all'}; split: {res.get('split')}"
    )
    return [section("AUROC by layer", svg=svg, columns=columns, rows=rows, note=note)]


def pca_sections(store: Store, rec: Mapping[str, Any]) -> list[Section]:
    """Rows on the first two stored components, coloured by the first boolean label.

    The projections are recomputed from the store: the analysed rows (its ``where``)
    read again, centred as the fit was, projected on the stored component directions.

    Example
    -------
    >>> pca_sections(st, analysis_record(st, 4))[0]["title"]  # doctest: +SKIP
    """
    from actstore.analysis.results import load_direction
    from actstore.errors import ActstoreError
    from actstore.report.data import boolean_labels

    res = rec["result"]
    out: list[Section] = []
    for fit in res.get("fits") or []:
        names = fit.get("direction_names") or []
        hooks = fit.get("hooks") or []
        ratio = fit.get("explained_variance_ratio") or []
        table = section(
            f"explained variance ({', '.join(hooks)})",
            columns=["component", "explained_variance", "ratio", "direction"],
            rows=[
                [i, ev, r, names[i] if i < len(names) else None]
                for i, (ev, r) in enumerate(
                    zip(fit.get("explained_variance") or [], ratio, strict=False)
                )
            ],
        )
        svg, note = None, None
        if len(hooks) == 1 and len(names) >= 2:
            try:
                acts = store.acts(res["run"], hooks[0], where=res.get("where"))
                X = acts.numpy(np.float64)
                if res.get("center", True):
                    X = X - X.mean(axis=0)
                P = np.stack([load_direction(store, n).vector for n in names[:2]], axis=1)
                XY = X @ P
                labels = [c for c in boolean_labels(store) if c in acts.meta.column_names]
                lab = acts.meta.column(labels[0]).to_pylist() if labels else None
                svg = figures.scatter(
                    XY[:, 0].tolist(),
                    XY[:, 1].tolist(),
                    lab,
                    title=f"{res['run']}: {hooks[0]} ({X.shape[0]} rows)",
                    xlabel=f"PC0 ({100 * ratio[0]:.1f}%)",
                    ylabel=f"PC1 ({100 * ratio[1]:.1f}%)",
                    label_name=labels[0] if labels else None,
                )
            except ActstoreError as e:
                note = f"no scatter: {e}"
        else:
            note = "no scatter: the fit spans several hooks or stored no component directions"
        table.update(svg=svg, note=note, title=f"PCA of {', '.join(hooks)}")
        out.append(table)
    return out


def unembed_sections(store: Store, rec: Mapping[str, Any]) -> list[Section]:
    """Top and bottom tokens of each direction through the unembedding.

    Example
    -------
    >>> unembed_sections(st, analysis_record(st, 5))[0]["columns"]  # doctest: +SKIP
    ['rank', 'top token', 'logit', 'bottom token', 'logit']
    """
    out = []
    for d in rec["result"].get("directions") or []:
        top, bottom = d.get("top") or [], d.get("bottom") or []
        rows = []
        for i in range(max(len(top), len(bottom))):
            t = top[i] if i < len(top) else [None, None, None]
            b = bottom[i] if i < len(bottom) else [None, None, None]
            rows.append([i, t[1], t[2], b[1], b[2]])
        out.append(
            section(
                f"logit lens of {d.get('direction')}",
                columns=["rank", "top token", "logit", "bottom token", "logit"],
                rows=rows,
            )
        )
    return out


RENDERERS: dict[str, Callable[[Store, Mapping[str, Any]], list[Section]]] = {
    "contrast": contrast_sections,
    "pca": pca_sections,
    "unembed": unembed_sections,
}
"""Analysis kind -> renderer; kinds not here are drawn by :func:`generic_sections`."""


def analysis_sections(store: Store, rec: Mapping[str, Any]) -> list[Section]:
    """The sections of one stored analysis: its kind's renderer, else the generic one.

    Example
    -------
    >>> [s["title"] for s in analysis_sections(st, analysis_record(st, 1))]  # doctest: +SKIP
    ['AUROC by layer']
    """
    render = RENDERERS.get(str(rec["kind"]))
    if render is not None:
        return render(store, rec)
    return generic_sections(rec["result"])
