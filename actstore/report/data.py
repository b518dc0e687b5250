"""What the report shows, read from the store: plain values, one function per page kind.

Every function here only reads (the report opens the store read-only) and returns
JSON-like values (dicts, lists, numbers, strings), so a page's content can be
hashed to decide whether it changed since the last build (incremental builds).

Example
-------
>>> feats = select_features(st, None, k=5)  # doctest: +SKIP
>>> feature_data(st, feats[0], contexts=20, width=6)["contexts"][0]["value"]  # doctest: +SKIP
0.81
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.analysis.results import jsonable
from actstore.errors import ActstoreError, InputError

if TYPE_CHECKING:
    from actstore.store.store import Store


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
        """The page's file stem: ``SAE-FEATURE`` with unsafe characters replaced."""
        return f"{safe_name(self.sae)}-{self.feature}"


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``-_.``; others as ``_``).

    Example
    -------
    >>> safe_name("backdoored/pairs+ablate dir")
    'backdoored_pairs+ablate_dir'
    """
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def _records(store: Store, query: str, params: Any = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = jsonable(store.sql(query, params).arrow().to_pylist())
    return out


def label_columns(store: Store, prompt_set_id: int | None = None) -> list[str]:
    """Label columns of one prompt set (or of all), in their stored order.

    Example
    -------
    >>> label_columns(st)  # doctest: +SKIP
    ['triggered', 'pair_id', 'question', 'answer', 'split', 'reward']
    """
    if prompt_set_id is None:
        rows = store.sql("SELECT label_columns FROM prompt_sets ORDER BY prompt_set_id")
    else:
        rows = store.sql(
            "SELECT label_columns FROM prompt_sets WHERE prompt_set_id = ?", [prompt_set_id]
        )
    out: list[str] = []
    for (cols,) in rows.fetchall():
        for c in json.loads(cols or "[]"):
            if c not in out:
                out.append(str(c))
    return out


def boolean_labels(store: Store) -> list[str]:
    """Prompt label columns of boolean type (``triggered`` first, if present).

    Example
    -------
    >>> boolean_labels(st)  # doctest: +SKIP
    ['triggered']
    """
    labels = set(label_columns(store))
    types = store.sql(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE table_name = 'prompts' AND database_name = 'cat'"
    ).fetchall()
    found = [str(n) for n, t in types if str(t) == "BOOLEAN" and n in labels]
    return sorted(found, key=lambda c: (c != "triggered", c))


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def index_data(store: Store) -> dict[str, Any]:
    """The index: runs, prompt sets and labels, SAEs, behaviour (``eval``), analyses, directions.

    Example
    -------
    >>> sorted(index_data(st))  # doctest: +SKIP
    ['analyses', 'behaviour', 'behaviour_error', 'directions', 'prompt_sets', 'runs', ...]
    """
    runs = _records(
        store,
        """SELECT r.run_id, r.name, c.label AS checkpoint, p.name AS prompt_set, e.name AS edit,
                  pr.name AS parent, r.status, r.positions, r.store_dtype,
                  (SELECT max(n_rows) FROM arrays a WHERE a.run_id = r.run_id) AS n_rows,
                  (SELECT count(*) FROM arrays a WHERE a.run_id = r.run_id) AS n_hooks,
                  (SELECT count(DISTINCT sae_id) FROM feature_files f WHERE f.run_id = r.run_id)
                    AS n_saes
           FROM runs r LEFT JOIN checkpoints c USING (checkpoint_id)
           LEFT JOIN prompt_sets p USING (prompt_set_id) LEFT JOIN edits e USING (edit_id)
           LEFT JOIN runs pr ON pr.run_id = r.parent_run_id ORDER BY r.run_id""",
    )
    sets = _records(
        store,
        "SELECT prompt_set_id, name, n_prompts, text_column, label_columns, content_hash "
        "FROM prompt_sets ORDER BY prompt_set_id",
    )
    for s in sets:
        s["label_columns"] = json.loads(s["label_columns"] or "[]")
    saes = _records(
        store, "SELECT sae_id, name, hook, layer, d_in, d_sae, architecture FROM saes ORDER BY 1"
    )
    behaviour: list[dict[str, Any]] = []
    behaviour_error = None
    try:
        from actstore.edits.evaluate import evaluate

        trig = boolean_labels(store)
        behaviour = jsonable(
            evaluate(store, trigger_column=trig[0] if trig else "triggered").arrow().to_pylist()
        )
        if all(r["scorer"] is None for r in behaviour):
            behaviour, behaviour_error = [], "no behaviour scores in this store"
    except ActstoreError as e:
        behaviour_error = str(e)
    analyses = _records(
        store, "SELECT analysis_id, name, kind, created_at FROM analyses ORDER BY analysis_id"
    )
    directions = _records(
        store,
        "SELECT d.direction_id, d.name, d.hook, d.d, d.method, r.name AS run, d.analysis_id "
        "FROM directions d LEFT JOIN runs r USING (run_id) ORDER BY d.direction_id",
    )
    return {
        "runs": runs,
        "prompt_sets": sets,
        "saes": saes,
        "behaviour": behaviour,
        "behaviour_error": behaviour_error,
        "analyses": analyses,
        "directions": directions,
    }


def analysis_record(store: Store, analysis_id: int) -> dict[str, Any]:
    """One stored analysis as plain values (params, result and provenance parsed).

    Example
    -------
    >>> analysis_record(st, 1)["kind"]  # doctest: +SKIP
    'contrast'
    """
    rows = _records(store, "SELECT * FROM analyses WHERE analysis_id = ?", [analysis_id])
    rec = rows[0]
    for key in ("params", "result", "provenance"):
        rec[key] = json.loads(rec[key] or "{}")
    return rec


# -- features --------------------------------------------------------------------------


def default_feature_query(store: Store) -> tuple[str, list[Any]] | None:
    """The default selection: the top trigger-differential features, in the run that shows most.

    ``trigger_diff`` over every stored token, group A the first boolean label
    (``triggered`` if there is one), is run on every complete, unedited run with
    SAE features; the run (and SAE) whose top feature has the largest t is kept,
    and its features with a positive difference are selected in rank order.
    None when the store has no SAE features or no boolean label.

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
    queries and unknown SAEs, runs or features are errors, raised before anything
    is written.

    Example
    -------
    >>> select_features(st, "SELECT 'l2_resid' AS sae, 206 AS feature", k=10)[0].feature  # doctest: +SKIP
    206
    """
    saes = {
        str(r["name"]): (int(r["sae_id"]), int(r["d_sae"]))
        for r in _records(store, "SELECT sae_id, name, d_sae FROM saes")
    }
    runs = {str(r[0]) for r in store.sql("SELECT name FROM runs").fetchall()}
    params: list[Any] | None = None
    why = "the query you gave"
    if query is None:
        default = default_feature_query(store)
        if default is None:
            return []
        query, params = default
        why = (
            f"top trigger-differential features ({params[4]} vs not, every stored token, "
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
    return out


def feature_data(store: Store, ref: FeatureRef, *, contexts: int, width: int) -> dict[str, Any]:
    """A feature page's numbers: top contexts, values, frequency by run and by label.

    Example
    -------
    >>> feature_data(st, ref, contexts=10, width=5)["by_run"][0]["freq"]  # doctest: +SKIP
    """
    sae = _records(store, "SELECT * FROM saes WHERE sae_id = ?", [ref.sae_id])[0]
    labels = boolean_labels(store)
    label_sql = "".join(
        f", count(*) FILTER (WHERE lt.{_quote(c)}) AS n_{i}, "
        f"count(f.value) FILTER (WHERE lt.{_quote(c)}) AS fired_{i}, "
        f"count(*) FILTER (WHERE NOT lt.{_quote(c)}) AS nn_{i}, "
        f"count(f.value) FILTER (WHERE NOT lt.{_quote(c)}) AS nfired_{i}"
        for i, c in enumerate(labels)
    )
    # every stored token of every run with this SAE's features; zeros counted
    by_run = _records(
        store,
        f"""WITH fr AS (SELECT DISTINCT run_id FROM feature_files WHERE sae_id = $sid),
                f AS (SELECT run_id, "row", value FROM features
                      WHERE sae_id = $sid AND feature = $f)
            SELECT lt.run_id, lt.run, count(*) AS n_tokens, count(f.value) AS n_fired,
                   coalesce(sum(f.value), 0) / count(*) AS mean, max(f.value) AS max
                   {label_sql}
            FROM labeled_tokens lt JOIN fr USING (run_id)
            LEFT JOIN f ON f.run_id = lt.run_id AND f."row" = lt."row"
            WHERE lt."row" IS NOT NULL AND lt."row" < (
                SELECT coalesce(sum(ff.n_rows), 0) FROM feature_files ff
                WHERE ff.run_id = lt.run_id AND ff.sae_id = $sid)
            GROUP BY lt.run_id, lt.run ORDER BY lt.run_id""",
        {"sid": ref.sae_id, "f": ref.feature},
    )
    for r in by_run:
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
    top = _records(
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
    windows = _records(
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
        "contexts": top,
        "hist": hist,
    }


def prompts_labels(
    store: Store, keys: set[tuple[int, int]] | list[tuple[int, int]]
) -> dict[tuple[int, int], dict[str, Any]]:
    """(prompt set id, prompt index) -> the prompt's labels (every label column of its set).

    Example
    -------
    >>> prompts_labels(st, [(2, 1)])[(2, 1)]["triggered"]  # doctest: +SKIP
    True
    """
    by_set: dict[int, list[int]] = {}
    for sid, idx in keys:
        by_set.setdefault(int(sid), []).append(int(idx))
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for sid, idxs in by_set.items():
        cols = label_columns(store, sid)
        sel = "".join(f", {_quote(c)}" for c in cols)
        for r in _records(
            store,
            f"SELECT prompt_idx{sel} FROM prompts WHERE prompt_set_id = ? "
            "AND list_contains(?, prompt_idx)",
            [sid, sorted(set(idxs))],
        ):
            idx = r.pop("prompt_idx")
            out[(sid, int(idx))] = r
    return out


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


# -- prompts ---------------------------------------------------------------------------


def prompts_data(
    store: Store,
    prompt_set_id: int,
    idxs: list[int],
    *,
    direction: str | None,
    feature: FeatureRef | None,
) -> dict[int, dict[str, Any]]:
    """Prompt pages of one prompt set: text, labels, and per run tokens, generations, scores.

    Tokens carry ``proj`` (the projection of the token's activation on
    ``direction``, at the direction's hook, where the run stores that hook and
    token) and ``feat`` (``feature``'s activation where the run has that SAE's
    features; zeros counted). A few statements per prompt set, not per prompt.

    Example
    -------
    >>> prompts_data(st, 2, [0], direction=None, feature=None)[0]["runs"][0]["name"]  # doctest: +SKIP
    'base/pairs'
    """
    name = store.sql("SELECT name FROM prompt_sets WHERE prompt_set_id = ?", [prompt_set_id])
    set_name = str(name.fetchall()[0][0])
    idxs = sorted(set(idxs))
    texts = dict(
        store.sql(
            "SELECT prompt_idx, text FROM prompts WHERE prompt_set_id = ? "
            "AND list_contains(?, prompt_idx)",
            [prompt_set_id, idxs],
        ).fetchall()
    )
    missing = [i for i in idxs if i not in texts]
    if missing:
        raise InputError(f"prompts {missing} not in prompt set {set_name!r}")
    labels = prompts_labels(store, [(prompt_set_id, i) for i in idxs])
    hook = None
    if direction is not None:
        got = store.sql("SELECT hook FROM directions WHERE name = ?", [direction]).fetchall()
        hook = got[0][0] if got else None
    runs = _records(
        store,
        "SELECT run_id, name FROM runs WHERE prompt_set_id = ? ORDER BY run_id",
        [prompt_set_id],
    )
    rids = [r["run_id"] for r in runs]
    with_hook = [
        int(r[0])
        for r in store.sql(
            "SELECT run_id FROM arrays WHERE hook = ? AND list_contains(?, run_id)", [hook, rids]
        ).fetchall()
    ]
    params: dict[str, Any] = {"rids": rids, "idxs": idxs}
    feat, feat_join = "NULL::FLOAT", ""
    if feature is not None:
        feat = (
            'CASE WHEN t."row" IS NOT NULL AND list_contains($feat_runs, t.run_id) '
            "THEN coalesce(f.value, 0) END"
        )
        feat_join = (
            'LEFT JOIN (SELECT run_id, "row", value FROM features WHERE sae_id = $sid '
            "AND feature = $f AND list_contains($rids, run_id)) f "
            'ON f.run_id = t.run_id AND f."row" = t."row"'
        )
        feat_runs = [
            int(r[0])
            for r in store.sql(
                "SELECT DISTINCT run_id FROM feature_files WHERE sae_id = ?", [feature.sae_id]
            ).fetchall()
        ]
        params.update(sid=feature.sae_id, f=feature.feature, feat_runs=feat_runs)
    tokens = _records(
        store,
        f"""SELECT t.run_id, t.prompt_idx, t.position, t.token_text AS token, t.position_role,
                   t.is_completion, t."row", NULL::DOUBLE AS proj, {feat} AS feat
            FROM tokens t JOIN runs r ON r.run_id = t.run_id {feat_join}
            WHERE list_contains($rids, t.run_id) AND list_contains($idxs, t.prompt_idx)
            ORDER BY t.run_id, t.prompt_idx, t.position""",
        params,
    )
    if with_hook and direction is not None and hook is not None:
        _project(store, tokens, runs, set(with_hook), hook, direction)
    gens = _records(
        store,
        "SELECT run_id, prompt_idx, sample_idx, text, n_tokens FROM generations "
        "WHERE list_contains(?, run_id) AND list_contains(?, prompt_idx) "
        "ORDER BY run_id, prompt_idx, sample_idx",
        [rids, idxs],
    )
    scores = _records(
        store,
        "SELECT run_id, prompt_idx, sample_idx, scorer, value, flag FROM scores "
        "WHERE list_contains(?, run_id) AND list_contains(?, prompt_idx) "
        "ORDER BY run_id, prompt_idx, scorer, sample_idx",
        [rids, idxs],
    )
    per: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for kind, rows in (("tokens", tokens), ("generations", gens), ("scores", scores)):
        for row in rows:
            key = (row.pop("run_id"), row.pop("prompt_idx"))
            per.setdefault(key, {}).setdefault(kind, []).append(row)
    out = {}
    for i in idxs:
        out[i] = {
            "prompt_set": set_name,
            "prompt_set_id": prompt_set_id,
            "prompt_idx": i,
            "text": texts[i],
            "labels": labels.get((prompt_set_id, i), {}),
            "direction": direction if with_hook else None,
            "direction_hook": hook,
            "feature": None
            if feature is None
            else {"sae": feature.sae, "feature": feature.feature},
            "runs": [
                {
                    "run_id": r["run_id"],
                    "name": r["name"],
                    **{
                        k: per.get((r["run_id"], i), {}).get(k, [])
                        for k in ("tokens", "generations", "scores")
                    },
                }
                for r in runs
            ],
        }
    return out


def _project(
    store: Store,
    tokens: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    with_hook: set[int],
    hook: str,
    direction: str,
) -> None:
    """Set each token's ``proj``: its activation at ``hook`` dotted with the unit direction.

    Row by row in float64 (not a BLAS product, whose rounding depends on how many rows
    it is given), so a token's value does not depend on which other prompts are shown.
    """
    from actstore.analysis.results import load_direction

    unit = load_direction(store, direction).unit
    names = {r["run_id"]: r["name"] for r in runs}
    for rid in sorted(with_hook):
        mine = [t for t in tokens if t["run_id"] == rid and t["row"] is not None]
        if not mine:
            continue
        X_ND = store.acts(names[rid], hook, rows=[t["row"] for t in mine]).numpy(np.float64)
        if X_ND.shape[1] != unit.size:
            raise InputError(
                f"direction {direction!r} has {unit.size} dimensions but hook {hook!r} of run "
                f"{names[rid]!r} has {X_ND.shape[1]}; choose a direction of that hook"
            )
        proj_N = (X_ND * unit).sum(axis=1)
        for t, v in zip(mine, proj_N.tolist(), strict=True):
            t["proj"] = v


def default_direction(store: Store) -> str | None:
    """The direction prompt pages shade by default.

    The direction the latest stored edit used (the one a researcher chose to act on),
    else the mean-difference direction with the highest stored AUROC, else the
    first stored direction; None when there are none.

    Example
    -------
    >>> default_direction(st)  # doctest: +SKIP
    'demo_backdoored/mean_diff/blocks.2.hook_resid_post'
    """
    rows = _records(store, "SELECT name, method, params FROM directions ORDER BY direction_id")
    if not rows:
        return None
    names = {str(r["name"]) for r in rows}
    for (spec,) in store.sql("SELECT spec FROM edits ORDER BY edit_id DESC").fetchall():
        for op in json.loads(spec or "{}").get("ops") or []:
            if isinstance(op, dict) and op.get("direction") in names:
                return str(op["direction"])
    best: tuple[float, str] | None = None
    for r in rows:
        auroc = json.loads(r["params"] or "{}").get("auroc") if r["method"] == "mean_diff" else None
        if isinstance(auroc, int | float) and (best is None or auroc > best[0]):
            best = (float(auroc), str(r["name"]))
    return best[1] if best else str(rows[0]["name"])
