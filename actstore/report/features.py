"""SAE feature pages: which features get one, and what each shows.

A query selects the features (default: the top trigger-differential ones of the
run where ``trigger_diff`` separates the first boolean label most); for each,
:func:`feature_data` reads its top contexts (every token of the window with its
activation), activation values, and firing frequency by run and by label;
:func:`decoder_rows` and :func:`feature_matches` read the SAEs' decoders.

Features encoded after the ingest are checked first (:func:`coverage`): an
interrupted encode is refused, naming the ``actstore encode`` command that
finishes it, before the report writes anything; after a positions-restricted
encode (``actstore encode --positions``) a run's statistics count the encoded
rows only, and the page says so (a row that was not encoded has no features,
which is not zero features).

Example
-------
>>> feats = select_features(st, None, k=5)  # doctest: +SKIP
>>> feature_data(st, feats[0], contexts=20, width=6)["contexts"][0]["value"]  # doctest: +SKIP
0.36
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.errors import ActstoreError, InputError
from actstore.report.data import boolean_labels, prompts_labels, quote, records, safe_name
from actstore.store import selections

if TYPE_CHECKING:
    from actstore.store.store import Store


def coverage(store: Store, sae_id: int) -> dict[int, tuple[str, selections.Selection]]:
    """The positions-restricted encodes of an SAE, by run, once every run's encode is complete.

    Every run with features of the SAE is checked
    (:func:`actstore.store.selections.require_complete`); a recorded selection
    is checked to still select the rows it encoded.

    Returns
    -------
    dict
        ``run_id -> (checked SQL of the predicate, selection)`` of the runs whose
        features cover a subset of their rows (the other runs cover every row).

    Raises
    ------
    NotFoundError
        An encode of the SAE is in progress or was interrupted in some run
        (naming the command that finishes it).

    Example
    -------
    >>> coverage(st, 1)  # doctest: +SKIP
    {2: ("(\\nposition_role = 'last'\\n)", Selection(positions="position_role = 'last'", ...))}
    """
    rids = store.sql(
        "SELECT DISTINCT run_id FROM feature_files WHERE sae_id = ? ORDER BY run_id", [sae_id]
    ).fetchall()
    out: dict[int, tuple[str, selections.Selection]] = {}
    for (rid,) in rids:
        sel = selections.require_complete(store, int(rid), sae_id, what="report")
        if sel is not None:
            with store.session.connection() as con:
                out[int(rid)] = (selections.verify(con, int(rid), sel, what="report"), sel)
    return out


def encoded_rows_sql(subsets: dict[int, tuple[str, selections.Selection]]) -> str:
    """Relation ``(run_id, "row")`` of the rows the positions-restricted encodes cover.

    ``subsets`` as :func:`coverage` returns it (the predicates are checked SQL).

    Example
    -------
    >>> print(encoded_rows_sql({}))
    SELECT NULL::INTEGER AS run_id, NULL::BIGINT AS "row" WHERE false
    """
    parts = [
        f'SELECT lt.run_id, lt."row" FROM labeled_tokens lt WHERE lt.run_id = {int(rid)} '
        f'AND lt."row" IS NOT NULL AND ({expr})'
        for rid, (expr, _) in sorted(subsets.items())
    ]
    return " UNION ALL ".join(parts) or (
        'SELECT NULL::INTEGER AS run_id, NULL::BIGINT AS "row" WHERE false'
    )


def only_encoded(subsets: dict[int, tuple[str, selections.Selection]], alias: str) -> str:
    """SQL condition: the token ``alias`` is in a run encoded for every row, or its row in ``enc``.

    ``enc`` is :func:`encoded_rows_sql`, LEFT JOINed as ``enc`` on run and row.

    Example
    -------
    >>> only_encoded({}, "lt")
    'true'
    """
    if not subsets:
        return "true"
    ids = ", ".join(str(int(r)) for r in sorted(subsets))
    return f'({alias}.run_id NOT IN ({ids}) OR enc."row" IS NOT NULL)'


@dataclass(frozen=True, slots=True)
class FeatureRef:
    """One SAE feature that gets a page."""

    sae: str
    """The SAE's name (``saes.name``)."""
    sae_id: int
    """Its id."""
    feature: int
    """The feature index."""
    why: str
    """How it was selected (shown on the page)."""
    run: str | None = None
    """The run whose top contexts the page lists (None: every run with the SAE)."""

    @property
    def slug(self) -> str:
        """The page's file stem: ``SAE-FEATURE`` with unsafe characters replaced.

        Example
        -------
        >>> FeatureRef("l2 resid", 1, 7, "").slug
        'l2_resid-7'
        """
        return f"{safe_name(self.sae)}-{self.feature}"


def default_feature_query(store: Store) -> tuple[str, list[Any]] | None:
    """The default selection: the top trigger-differential features, in the run that shows most.

    ``trigger_diff`` over every stored token, group A the first boolean label
    (``triggered`` if there is one), is run on every complete, unedited run with
    SAE features; the run (and SAE) whose top feature has the largest t is kept,
    and its features with a positive difference are selected in rank order
    (after a positions-restricted encode, over the encoded rows of the run).
    None when the store has no SAE features or no boolean label. A candidate
    whose encode is in progress or was interrupted is refused
    (:func:`~actstore.store.selections.require_complete`), not skipped.

    Example
    -------
    >>> default_feature_query(st)  # doctest: +SKIP
    ("SELECT ... FROM trigger_diff(?, ?, ?) ...", ['l2_resid', 'backdoored/pairs', ...])
    """
    labels = boolean_labels(store)
    if not labels:
        return None
    candidates = store.sql(
        """SELECT DISTINCT r.run_id, r.name, s.sae_id, s.name FROM feature_files f
           JOIN runs r USING (run_id) JOIN saes s USING (sae_id)
           WHERE r.status = 'complete' AND r.edit_id IS NULL ORDER BY r.run_id, s.sae_id"""
    ).fetchall()
    for rid, _, sid, _ in candidates:
        selections.require_complete(store, int(rid), int(sid), what="report")
    best: tuple[float, str, str] | None = None
    for _, run, _, sae in candidates:
        try:
            got = store.sql(
                "SELECT max(t) FROM trigger_diff(?, ?, ?) WHERE diff > 0", [run, sae, labels[0]]
            ).fetchall()
        except ActstoreError:  # e.g. a run whose prompts lack the label
            continue
        t = got[0][0] if got else None
        if t is not None and np.isfinite(t) and (best is None or t > best[0]):
            best = (float(t), str(run), str(sae))
    if best is None:
        return None
    _, run, sae = best
    query = (
        "SELECT ? AS sae, ? AS run, feature, diff, cohens_d, freq_a, freq_b, t, q "
        "FROM trigger_diff(?, ?, ?) WHERE diff > 0 ORDER BY rank"
    )
    return query, [sae, run, run, sae, labels[0]]


def select_features(store: Store, query: str | None, *, k: int) -> list[FeatureRef]:
    """Run the feature selection query (default: :func:`default_feature_query`) and keep ``k``.

    The query returns a ``feature`` column; an ``sae`` column (the SAE's name) when
    the store has several SAEs; optionally a ``run`` column, the run whose top
    contexts the page shows (default: every run). Rows are kept in order. Bad
    queries, unknown SAEs, runs or features, and SAEs whose encode is in progress
    or was interrupted in some run (:func:`coverage`) are errors, raised before
    anything is written.

    Example
    -------
    >>> select_features(st, "SELECT 'l2_resid' AS sae, 206 AS feature", k=10)[0].feature  # doctest: +SKIP
    206
    """
    saes = {
        str(r["name"]): (int(r["sae_id"]), int(r["d_sae"]))
        for r in records(store, "SELECT sae_id, name, d_sae FROM saes")
    }
    runs = {str(r[0]) for r in store.sql("SELECT name FROM runs").fetchall()}
    params: list[Any] | None = None
    why = "the query you gave"
    if query is None:
        default = default_feature_query(store)
        if default is None:
            return []
        query, params = default
        (rid,) = store.sql("SELECT run_id FROM runs WHERE name = ?", [params[1]]).fetchall()[0]
        sel = selections.read(store, int(rid), saes[str(params[0])][0])
        over = (
            "every stored token"
            if sel is None
            else f"every encoded token: SAE {params[0]} was encoded for the rows "
            f"{sel.positions!r} only"
        )
        why = (
            f"top trigger-differential features ({params[4]} vs not, {over}, "
            f"trigger_diff ranked by t), in {params[1]}: the run where the top feature's t is largest"
        )
    try:
        table = store.sql(query, params).arrow()
    except ActstoreError as e:
        raise InputError(f"the feature query failed: {e}") from e
    if "feature" not in table.column_names:
        raise InputError(
            f"the feature query must return a 'feature' column (and 'sae' with several SAEs); "
            f"it returned {table.column_names}"
        )
    out: list[FeatureRef] = []
    seen = set()
    for row in table.to_pylist():
        name = row.get("sae")
        if name is None:
            if len(saes) != 1:
                raise InputError(
                    f"the store has {len(saes)} SAEs {sorted(saes)}; the feature query must "
                    "return an 'sae' column naming each feature's SAE"
                )
            name = next(iter(saes))
        name = str(name)
        if name not in saes:
            raise InputError(f"SAE {name!r} not in the store; SAEs: {sorted(saes)}")
        run = row.get("run")
        if run is not None and str(run) not in runs:
            raise InputError(
                f"run {run!r} (from the feature query) not in the store; runs: {sorted(runs)}"
            )
        sae_id, d_sae = saes[name]
        if row["feature"] is None or not 0 <= int(row["feature"]) < d_sae:
            raise InputError(f"feature {row['feature']} is outside SAE {name!r} (0-{d_sae - 1})")
        f = int(row["feature"])
        if (name, f) in seen:
            continue
        seen.add((name, f))
        out.append(FeatureRef(name, sae_id, f, why, None if run is None else str(run)))
        if len(out) >= k:
            break
    for sid in dict.fromkeys(r.sae_id for r in out):
        coverage(store, sid)  # an interrupted encode: refused before anything is written
    return out


def feature_data(store: Store, ref: FeatureRef, *, contexts: int, width: int) -> dict[str, Any]:
    """A feature page's numbers: top contexts, values, frequency by run and by label.

    Frequencies and means count every stored token of each run with the SAE's
    features, zeros counted; after a positions-restricted encode of a run, only
    its encoded rows (``by_run[i]["encoded"]`` is the predicate, ``coverage``
    says so on the page). Top contexts and values are of encoded rows anyway.

    Example
    -------
    >>> feature_data(st, ref, contexts=10, width=5)["by_run"][0]["freq"]  # doctest: +SKIP
    """
    sae = records(store, "SELECT * FROM saes WHERE sae_id = ?", [ref.sae_id])[0]
    labels = boolean_labels(store)
    label_sql = "".join(
        f", count(*) FILTER (WHERE lt.{quote(c)}) AS n_{i}, "
        f"count(f.value) FILTER (WHERE lt.{quote(c)}) AS fired_{i}, "
        f"count(*) FILTER (WHERE NOT lt.{quote(c)}) AS nn_{i}, "
        f"count(f.value) FILTER (WHERE NOT lt.{quote(c)}) AS nfired_{i}"
        for i, c in enumerate(labels)
    )
    subsets = coverage(store, ref.sae_id)
    # every encoded token of every run with this SAE's features (every stored token but
    # where a positions-restricted encode covers some rows only); zeros counted
    by_run = records(
        store,
        f"""WITH fr AS (SELECT DISTINCT run_id FROM feature_files WHERE sae_id = $sid),
                f AS (SELECT run_id, "row", value FROM features
                      WHERE sae_id = $sid AND feature = $f),
                enc AS ({encoded_rows_sql(subsets)})
            SELECT lt.run_id, lt.run, count(*) AS n_tokens, count(f.value) AS n_fired,
                   coalesce(sum(f.value), 0) / count(*) AS mean, max(f.value) AS max
                   {label_sql}
            FROM labeled_tokens lt JOIN fr USING (run_id)
            LEFT JOIN f ON f.run_id = lt.run_id AND f."row" = lt."row"
            LEFT JOIN enc ON enc.run_id = lt.run_id AND enc."row" = lt."row"
            WHERE lt."row" IS NOT NULL AND {only_encoded(subsets, "lt")} AND lt."row" < (
                SELECT coalesce(sum(ff.n_rows), 0) FROM feature_files ff
                WHERE ff.run_id = lt.run_id AND ff.sae_id = $sid)
            GROUP BY lt.run_id, lt.run ORDER BY lt.run_id""",
        {"sid": ref.sae_id, "f": ref.feature},
    )
    notes = []
    for r in by_run:
        got = subsets.get(int(r["run_id"]))
        r["encoded"] = None if got is None else got[1].positions
        if got is not None:
            notes.append(
                f"run {r['run']}: SAE {ref.sae} was encoded for the rows {got[1].positions!r} "
                f"only (actstore encode --positions); its statistics count those "
                f"{r['n_tokens']} tokens, not the run's other stored tokens (a row that was "
                "not encoded has no features, which is not zero features)"
            )
        r["freq"] = r["n_fired"] / r["n_tokens"] if r["n_tokens"] else None
        r["by_label"] = {}
        for i, c in enumerate(labels):
            n, fired = r.pop(f"n_{i}"), r.pop(f"fired_{i}")
            nn, nfired = r.pop(f"nn_{i}"), r.pop(f"nfired_{i}")
            r["by_label"][c] = {
                "true": fired / n if n else None,
                "false": nfired / nn if nn else None,
                "n_true": n,
                "n_false": nn,
            }
    in_run = "" if ref.run is None else "AND run_id = (SELECT run_id FROM runs WHERE name = $run)"
    ctx_params: dict[str, Any] = {"sid": ref.sae_id, "f": ref.feature, "k": contexts}
    if ref.run is not None:
        ctx_params["run"] = ref.run
    top = records(
        store,
        f"""WITH top AS (
                SELECT run_id, "row", value FROM features
                WHERE sae_id = $sid AND feature = $f {in_run}
                ORDER BY value DESC, run_id, "row" LIMIT $k)
            SELECT top.run_id, r.name AS run, top."row", top.value, t.prompt_idx, t.position,
                   r.prompt_set_id, ps.name AS prompt_set
            FROM top JOIN tokens t ON t.run_id = top.run_id AND t."row" = top."row"
            JOIN runs r ON r.run_id = top.run_id JOIN prompt_sets ps USING (prompt_set_id)
            ORDER BY top.value DESC, top.run_id, top."row" """,
        ctx_params,
    )
    windows = records(
        store,
        f"""WITH top AS (
                SELECT f.run_id, t.prompt_idx, t.position AS top_pos
                FROM (SELECT run_id, "row" FROM features WHERE sae_id = $sid AND feature = $f
                      {in_run} ORDER BY value DESC, run_id, "row" LIMIT $k) f
                JOIN tokens t ON t.run_id = f.run_id AND t."row" = f."row"),
            fv AS (SELECT run_id, "row", value FROM features WHERE sae_id = $sid AND feature = $f)
            SELECT top.run_id, top.prompt_idx, top.top_pos, t.position, t.token_text AS token,
                   t."row", fv.value, t.position = top.top_pos AS is_top
            FROM top JOIN tokens t ON t.run_id = top.run_id AND t.prompt_idx = top.prompt_idx
                 AND t.position BETWEEN top.top_pos - $w AND top.top_pos + $w
            LEFT JOIN fv ON fv.run_id = t.run_id AND fv."row" = t."row"
            ORDER BY t.position""",
        {**ctx_params, "w": width},
    )
    by_ctx: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for w in windows:
        key = (w.pop("run_id"), w.pop("prompt_idx"), w.pop("top_pos"))
        by_ctx.setdefault(key, []).append(w)
    wanted = {(c["prompt_set_id"], c["prompt_idx"]) for c in top}
    labels_of = prompts_labels(store, wanted)
    for ctx in top:
        ctx["tokens"] = by_ctx.get((ctx["run_id"], ctx["prompt_idx"], ctx["position"]), [])
        ctx["labels"] = labels_of.get((ctx["prompt_set_id"], ctx["prompt_idx"]), {})
    values = store.sql(
        f"""SELECT f.value, p.* FROM features f JOIN tokens t USING (run_id, "row")
           JOIN runs r USING (run_id)
           JOIN prompts p ON p.prompt_set_id = r.prompt_set_id AND p.prompt_idx = t.prompt_idx
           WHERE f.sae_id = $sid AND f.feature = $f {in_run.replace("run_id", "f.run_id", 1)}
           ORDER BY f.value, f.run_id, f."row" """,
        {k: v for k, v in ctx_params.items() if k != "k"},
    ).arrow()
    hist: dict[str, list[float]] = {"all": np.asarray(values.column("value")).tolist()}
    if labels and labels[0] in values.column_names:
        lab = values.column(labels[0]).to_pylist()
        v = hist["all"]
        hist = {
            f"{labels[0]}": [x for x, b in zip(v, lab, strict=True) if b],
            f"not {labels[0]}": [x for x, b in zip(v, lab, strict=True) if b is False],
        }
    return {
        "sae": {k: sae[k] for k in ("name", "hook", "layer", "d_in", "d_sae", "architecture")},
        "sae_source": sae.get("source"),
        "feature": ref.feature,
        "why": ref.why,
        "run": ref.run,
        "labels": labels,
        "by_run": by_run,
        "coverage": notes,
        "contexts": top,
        "hist": hist,
    }


def decoder_rows(store: Store, sae_id: int) -> tuple[np.ndarray | None, str | None]:
    """The SAE's (F, D) decoder from its source directory, checked against the stored hash.

    Returns ``(W_dec_FD, None)``, or ``(None, why not)`` when the weights are not
    there or differ from those the features were computed with.

    Example
    -------
    >>> W_dec_FD, why = decoder_rows(st, 1)  # doctest: +SKIP
    >>> W_dec_FD.shape  # doctest: +SKIP
    (256, 64)
    """
    from pathlib import Path

    source, stored = store.sql(
        "SELECT source, weights_hash FROM saes WHERE sae_id = ?", [sae_id]
    ).fetchall()[0]
    weights = Path(str(source)) / "sae_weights.safetensors"
    if not weights.is_file():
        return None, f"no sae_weights.safetensors in the SAE's source {source}"
    from safetensors.torch import load_file

    from actstore.ingest.saes import weights_hash

    state = load_file(str(weights))
    if stored and weights_hash(state) != stored:
        return None, (
            f"the weights in {source} differ from those the features were computed with "
            "(weights hash mismatch)"
        )
    if "W_dec" not in state:
        return None, f"{weights} has no W_dec"
    return state["W_dec"].float().numpy().astype(np.float64), None


def feature_matches(
    decoders: dict[int, np.ndarray], names: dict[int, str], sae_id: int, feature: int, k: int = 3
) -> list[dict[str, Any]]:
    """The ``k`` decoder rows most cosine-similar to this feature's, in every other SAE of its width.

    Example
    -------
    >>> W = np.eye(3); feature_matches({1: W, 2: W[::-1]}, {1: "a", 2: "b"}, 1, 0, k=1)
    [{'sae': 'b', 'sae_id': 2, 'feature': 2, 'cosine': 1.0}]
    """
    own = decoders[sae_id][feature]
    own = own / (np.linalg.norm(own) or 1.0)
    out: list[dict[str, Any]] = []
    for other, W_FD in decoders.items():
        if other == sae_id or W_FD.shape[1] != own.size:
            continue
        cos = (W_FD @ own) / np.maximum(np.linalg.norm(W_FD, axis=1), 1e-12)
        for j in np.argsort(-cos, kind="stable")[:k]:
            out.append(
                {"sae": names[other], "sae_id": other, "feature": int(j), "cosine": float(cos[j])}
            )
    return out
