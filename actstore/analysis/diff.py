"""Checkpoint diff: the same prompts through two runs, compared hook by hook.

Two runs over one prompt set with one tokenizer store the same tokens; a token
is matched across runs by ``(prompt_idx, position)`` and its token id is
checked. For the matched rows a predicate selects, per hook:

- the mean per-row cosine similarity between the runs' activations, and the
  mean relative change ``|b - a| / |a|``;
- linear CKA (Kornblith et al. 2019), streamed: the centred cross-product
  matrices ``A^T A``, ``B^T B``, ``A^T B`` are accumulated block by block in
  float64 (after subtracting the first block's means), so memory is
  O(D^2), not O(rows);
- with ``group=``: direction transfer. Contrast directions (mean difference,
  logistic probe) fitted on the training rows of one run are scored by AUROC
  on the held-out rows of both; a backdoor shows as a direction that exists
  in one checkpoint and not in the other.

With ``sae=``, per SAE feature: mean activation and firing frequency in each
run over the matched rows (absent entries are zeros), and their changes.

Example
-------
>>> d = checkpoint_diff(st, run_a="base/pairs", run_b="backdoored/pairs",
...                     hooks="blocks.*.hook_resid_post", where="position_role = 'last'",
...                     group="triggered")  # doctest: +SKIP
>>> d.summary().to_pandas()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.analysis.contrast import fit_directions
from actstore.analysis.groups import labelled_rows
from actstore.analysis.metrics import auroc
from actstore.analysis.results import jsonable, provenance, save_analysis
from actstore.analysis.rows import (
    Params,
    RunInfo,
    Selection,
    resolve_hooks,
    run_info,
    select,
    sql_with_tables,
)
from actstore.analysis.sae import sae_record
from actstore.errors import InputError, SpecError
from actstore.store import selections as _selections

if TYPE_CHECKING:
    from actstore.store.store import Store


@dataclass(frozen=True, slots=True)
class Transfer:
    """AUROC of a direction fitted on one run, scored on held-out rows of each run."""

    a_on_a: float
    """Fitted on run A, scored on A."""
    a_on_b: float
    """Fitted on run A, scored on B."""
    b_on_b: float
    """Fitted on run B, scored on B."""
    b_on_a: float
    """Fitted on run B, scored on A."""
    cosine: float
    """Cosine between the two fitted directions."""

    def to_dict(self) -> dict[str, float]:
        """Plain values.

        Example
        -------
        >>> Transfer(1.0, 0.5, 1.0, 0.6, 0.1).to_dict()["a_on_b"]
        0.5
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True)
class DiffLayer:
    """How one hook's activations differ between the runs."""

    hook: str
    """The hook."""
    layer: int | None
    """Its layer."""
    n: int
    """Matched rows compared."""
    mean_cosine: float
    """Mean over rows of cos(a_i, b_i) (rows where either is zero are skipped)."""
    mean_rel_change: float
    """Mean over rows of |b_i - a_i| / |a_i|."""
    cka: float | None
    """Linear CKA between the runs' rows (None if not computed)."""
    transfer: dict[str, Transfer]
    """Method -> direction transfer (empty without ``group``)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values.

        Example
        -------
        >>> layer.to_dict()["cka"]  # doctest: +SKIP
        """
        return {
            "hook": self.hook,
            "layer": self.layer,
            "n": self.n,
            "mean_cosine": self.mean_cosine,
            "mean_rel_change": self.mean_rel_change,
            "cka": self.cka,
            "transfer": {m: t.to_dict() for m, t in self.transfer.items()},
        }


@dataclass(frozen=True, slots=True, eq=False)
class DiffResult:
    """A checkpoint diff over hooks (and SAE features)."""

    name: str
    """The analysis name."""
    run_a: str
    """The first run."""
    run_b: str
    """The second run."""
    where: str | None
    """The SQL predicate (over run A's ``labeled_tokens``) that chose the rows."""
    n_rows: int
    """Matched rows."""
    n_unmatched: int
    """Selected rows of run A whose token run B does not store (skipped)."""
    layers: tuple[DiffLayer, ...]
    """One entry per hook."""
    features: pa.Table | None
    """Per SAE feature: means and firing frequencies in both runs, biggest change first."""
    analysis_id: int | None = None
    """The stored analysis, if saved."""
    params: dict[str, Any] = field(default_factory=dict)
    """The call's parameters."""

    def summary(self) -> pa.Table:
        """One row per hook: cosine, relative change, CKA and, with a group, transfer AUROCs.

        Example
        -------
        >>> d.summary().column_names[:4]  # doctest: +SKIP
        ['hook', 'layer', 'n', 'mean_cosine']
        """
        rows = []
        for e in self.layers:
            row: dict[str, Any] = {
                "hook": e.hook,
                "layer": e.layer,
                "n": e.n,
                "mean_cosine": e.mean_cosine,
                "mean_rel_change": e.mean_rel_change,
                "cka": e.cka,
            }
            for m, t in e.transfer.items():
                row |= {
                    f"{m}:a->a": t.a_on_a,
                    f"{m}:a->b": t.a_on_b,
                    f"{m}:b->b": t.b_on_b,
                    f"{m}:b->a": t.b_on_a,
                    f"{m}:cos": t.cosine,
                }
            rows.append(row)
        return pa.Table.from_pylist(rows)

    def feature_summary(self, k: int = 20) -> pa.Table:
        """The ``k`` features whose mean activation changed most.

        Example
        -------
        >>> d.feature_summary(5).column("feature").to_pylist()  # doctest: +SKIP
        """
        if self.features is None:
            raise SpecError("no SAE features were compared; call checkpoint_diff(..., sae=...)")
        return self.features.slice(0, k)

    def to_dict(self, top: int = 100) -> dict[str, Any]:
        """Plain values, with the ``top`` most changed features.

        Example
        -------
        >>> d.to_dict()["layers"][0]["mean_cosine"]  # doctest: +SKIP
        """
        return jsonable(
            {
                "name": self.name,
                "run_a": self.run_a,
                "run_b": self.run_b,
                "where": self.where,
                "n_rows": self.n_rows,
                "n_unmatched": self.n_unmatched,
                "layers": [e.to_dict() for e in self.layers],
                "features": None if self.features is None else self.features.slice(0, top),
                "analysis_id": self.analysis_id,
            }
        )


def align_rows(store: Store, sel: Selection, run_b: str | int | RunInfo) -> tuple[np.ndarray, int]:
    """Run B's row for each row of a selection of run A (-1 where B lacks the token).

    Tokens match by ``(prompt_idx, position)``; their token ids must agree.

    Example
    -------
    >>> rows_b, n_unmatched = align_rows(st, sel_a, "ft")  # doctest: +SKIP
    """
    info_b = run_info(store, run_b)
    rid_b, n_b = info_b.run_id, info_b.n_rows
    tb = store.sql(
        'SELECT prompt_idx, position, "row", token_id FROM tokens '
        f'WHERE run_id = {int(rid_b)} AND "row" IS NOT NULL AND "row" < {n_b}'
    ).numpy()
    pos_a = sel.column("position").astype(np.int64)
    width = int(max(pos_a.max(initial=0), tb["position"].max(initial=0))) + 1
    key_a = sel.column("prompt_idx").astype(np.int64) * width + pos_a
    key_b = tb["prompt_idx"].astype(np.int64) * width + tb["position"].astype(np.int64)
    order = np.argsort(key_b, kind="stable")
    key_b, row_b, tok_b = key_b[order], tb["row"][order], tb["token_id"][order]
    at = np.clip(np.searchsorted(key_b, key_a), 0, max(key_b.size - 1, 0))
    hit = (key_b[at] == key_a) if key_b.size else np.zeros(key_a.size, bool)
    rows_b = np.where(hit, row_b[at] if key_b.size else -1, -1).astype(np.int64)
    tok_a = sel.meta.column("token_id").to_numpy(zero_copy_only=False)
    if key_b.size:
        both = hit & ~np.isnan(tok_a.astype(np.float64)) & ~np.isnan(tok_b[at].astype(np.float64))
        bad = int((tok_a[both] != tok_b[at][both]).sum())
        if bad:
            raise InputError(
                f"runs {sel.run!r} and {info_b.name!r} have different tokens at {bad} of the matched "
                "(prompt_idx, position) pairs; a checkpoint diff needs the same prompt set "
                "tokenized by the same tokenizer"
            )
    return rows_b, int((~hit).sum())


class _Cross:
    """Streamed sums for cosines and linear CKA between aligned blocks."""

    def __init__(self, da: int, db: int, cka: bool) -> None:
        self.n = 0
        self.n_cos = 0
        self.cos = 0.0
        self.rel = 0.0
        self.n_rel = 0
        self.cka = cka
        self.sa: np.ndarray | None = None
        self.sb: np.ndarray | None = None
        if cka:
            self.s1a, self.s1b = np.zeros(da), np.zeros(db)
            self.Saa, self.Sbb, self.Sab = (
                np.zeros((da, da)),
                np.zeros((db, db)),
                np.zeros((da, db)),
            )

    def add(self, A_ND: np.ndarray, B_NE: np.ndarray) -> None:
        self.n += A_ND.shape[0]
        na = np.linalg.norm(A_ND, axis=1)
        if A_ND.shape[1] == B_NE.shape[1]:
            nb = np.linalg.norm(B_NE, axis=1)
            ok = (na > 0) & (nb > 0)
            self.cos += float(np.sum(np.einsum("ij,ij->i", A_ND[ok], B_NE[ok]) / (na[ok] * nb[ok])))
            self.n_cos += int(ok.sum())
            okr = na > 0
            self.rel += float(np.sum(np.linalg.norm(B_NE[okr] - A_ND[okr], axis=1) / na[okr]))
            self.n_rel += int(okr.sum())
        if self.cka:
            if self.sa is None:
                self.sa, self.sb = A_ND.mean(axis=0), B_NE.mean(axis=0)
            a, b = A_ND - self.sa, B_NE - self.sb
            self.s1a += a.sum(axis=0)
            self.s1b += b.sum(axis=0)
            self.Saa += a.T @ a
            self.Sbb += b.T @ b
            self.Sab += a.T @ b

    def result(self) -> tuple[float, float, float | None]:
        cos = self.cos / self.n_cos if self.n_cos else float("nan")
        rel = self.rel / self.n_rel if self.n_rel else float("nan")
        if not self.cka or self.n == 0:
            return cos, rel, None
        Caa = self.Saa - np.outer(self.s1a, self.s1a) / self.n
        Cbb = self.Sbb - np.outer(self.s1b, self.s1b) / self.n
        Cab = self.Sab - np.outer(self.s1a, self.s1b) / self.n
        den = float(np.linalg.norm(Caa) * np.linalg.norm(Cbb))
        return cos, rel, float(np.sum(Cab**2) / den) if den > 0 else float("nan")


def _feature_changes(
    store: Store, sel: Selection, rows_b: np.ndarray, rid_b: int, sae: str | int
) -> pa.Table:
    rec = sae_record(store, sae)
    sid = int(rec["sae_id"])
    _selections.require_rows(store, sel.run_id, sid, sel.rows, what="checkpoint_diff")
    _selections.require_rows(store, int(rid_b), sid, rows_b, what="checkpoint_diff")
    matched = pa.table({"row_a": pa.array(sel.rows), "row_b": pa.array(rows_b)})
    got = sql_with_tables(
        store,
        f"""WITH fa AS (SELECT f.feature, sum(f.value::DOUBLE) AS s, count(*) AS c
                       FROM features f JOIN _m ON f."row" = _m.row_a
                       WHERE f.run_id = {sel.run_id} AND f.sae_id = {sid} AND f.value != 0
                       GROUP BY f.feature),
                fb AS (SELECT f.feature, sum(f.value::DOUBLE) AS s, count(*) AS c
                       FROM features f JOIN _m ON f."row" = _m.row_b
                       WHERE f.run_id = {int(rid_b)} AND f.sae_id = {sid} AND f.value != 0
                       GROUP BY f.feature)
            SELECT coalesce(fa.feature, fb.feature) AS feature,
                   coalesce(fa.s, 0) AS sa, coalesce(fa.c, 0) AS ca,
                   coalesce(fb.s, 0) AS sb, coalesce(fb.c, 0) AS cb
            FROM fa FULL OUTER JOIN fb ON fa.feature = fb.feature""",
        _m=matched,
    )
    n = max(sel.n, 1)
    mean_a = got.column("sa").to_numpy() / n
    mean_b = got.column("sb").to_numpy() / n
    freq_a = got.column("ca").to_numpy() / n
    freq_b = got.column("cb").to_numpy() / n
    table = pa.table(
        {
            "feature": got.column("feature").cast(pa.int64()),
            "mean_a": mean_a,
            "mean_b": mean_b,
            "delta_mean": mean_b - mean_a,
            "freq_a": freq_a,
            "freq_b": freq_b,
            "delta_freq": freq_b - freq_a,
        }
    )
    order = np.lexsort((table.column("feature").to_numpy(), -np.abs(mean_b - mean_a)))
    return table.take(order)


def checkpoint_diff(
    store: Store,
    *,
    run_a: str | int,
    run_b: str | int,
    hooks: str | Sequence[str] | None = None,
    where: str | None = None,
    params: Params = None,
    group: str | None = None,
    pair: str | None = None,
    methods: Sequence[str] = ("mean_diff", "logistic"),
    split: str | None = "random",
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    cka: bool = True,
    sae: str | int | None = None,
    block_rows: int | None = None,
    top: int = 100,
    name: str | None = None,
    save: bool = True,
) -> DiffResult:
    """Compare two runs over the same prompts: cosine, CKA, direction transfer, SAE features.

    Parameters
    ----------
    store
        The store.
    run_a, run_b
        The runs (e.g. base and fine-tuned checkpoints over one prompt set).
    hooks
        Hook(s) or a glob pattern; default every hook both runs store.
    where, params
        SQL predicate over run A's ``labeled_tokens`` choosing the rows, and bound parameters.
    group
        Boolean SQL expression: fit contrast directions on each run and score them on both.
    pair, methods, split, test_fraction, seed, C
        As for :func:`actstore.analysis.contrast.contrast` (the split is shared by both runs).
    cka
        Compute linear CKA (needs three D x D float64 matrices per hook).
    sae
        An SAE whose features both runs store: per-feature mean and frequency changes.
    block_rows
        Rows read per block.
    top
        Features kept in the stored record.
    name, save
        Analysis name (default ``diff:{run_a}..{run_b}``) and whether to store it.

    Returns
    -------
    DiffResult

    Example
    -------
    >>> d = checkpoint_diff(st, run_a="base", run_b="ft", hooks="blocks.*.hook_resid_post")  # doctest: +SKIP
    >>> d.summary()  # doctest: +SKIP
    """
    info_a, info_b = run_info(store, run_a), run_info(store, run_b)
    rid_b = info_b.run_id
    have_b = info_b.hooks
    if hooks is None:
        hook_list = [h for h in info_a.hooks if h in have_b]
        if not hook_list and sae is None:
            raise InputError(f"runs {run_a!r} and {run_b!r} store no hook in common")
    else:
        hook_list = resolve_hooks(store, info_a, hooks)
        missing = [h for h in hook_list if h not in have_b]
        if missing:
            raise InputError(f"run {run_b!r} does not store {missing}; it has {have_b}")
    sel = select(store, run=info_a, where=where, params=params, hooks=hook_list)
    rows_b, n_unmatched = align_rows(store, sel, info_b)
    matched = rows_b >= 0
    sel, rows_b = sel.take(matched), rows_b[matched]
    if sel.n == 0:
        raise InputError(
            f"no selected row of run {run_a!r} has a stored counterpart in run {run_b!r}; "
            "both runs must cover the same prompts and positions"
        )
    name_b = info_b.name
    layers = []
    lab = None
    if group is not None:
        lab = labelled_rows(
            store,
            run=info_a,
            hooks=hook_list,
            where=where,
            params=params,
            group=group,
            positive=None,
            negative=None,
            pair=pair,
            split=split,
            test_fraction=test_fraction,
            seed=seed,
        )
        lab_b_rows = np.full(lab.sel.n, -1, np.int64)
        pos = np.searchsorted(sel.rows, lab.sel.rows)
        pos = np.clip(pos, 0, sel.n - 1)
        found = sel.rows[pos] == lab.sel.rows
        lab_b_rows[found] = rows_b[pos[found]]
        keep = lab_b_rows >= 0
        lab = dataclasses.replace(
            lab,
            sel=lab.sel.take(keep),
            y=lab.y[keep],
            pair=None if lab.pair is None else lab.pair[keep],
            train=lab.train[keep],
            test=lab.test[keep],
        )
        lab_b_rows = lab_b_rows[keep]
    for hook in hook_list:
        da, db = info_a.width(hook), info_b.width(hook)
        acc = _Cross(da, db, cka)
        blocks_a = sel.blocks(store, [hook], block_rows=block_rows)
        blocks_b = sel.blocks(store, [hook], block_rows=block_rows, rows=rows_b, run=info_b)
        for (_, A), (_, B) in zip(blocks_a, blocks_b, strict=True):
            acc.add(A, B)
        cos, rel, cka_v = acc.result()
        transfer: dict[str, Transfer] = {}
        if lab is not None:
            Xa = lab.sel.read(store, [hook])
            Xb = lab.sel.read(store, [hook], rows=lab_b_rows, run=info_b)
            tr, te, y = lab.train, lab.test, lab.y
            pr = None if lab.pair is None else lab.pair[tr]
            dirs_a, _ = fit_directions(Xa[tr], y[tr], methods, pair_N=pr, C=C, seed=seed)
            dirs_b, _ = fit_directions(Xb[tr], y[tr], methods, pair_N=pr, C=C, seed=seed)
            for m in methods:
                va, vb = dirs_a[m], dirs_b[m]
                transfer[m] = Transfer(
                    a_on_a=auroc(Xa[te] @ va, y[te]),
                    a_on_b=auroc(Xb[te] @ va, y[te]) if da == db else float("nan"),
                    b_on_b=auroc(Xb[te] @ vb, y[te]),
                    b_on_a=auroc(Xa[te] @ vb, y[te]) if da == db else float("nan"),
                    cosine=float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
                    if da == db
                    else float("nan"),
                )
        layers.append(
            DiffLayer(
                hook=hook,
                layer=info_a.layer(hook),
                n=sel.n,
                mean_cosine=cos,
                mean_rel_change=rel,
                cka=cka_v,
                transfer=transfer,
            )
        )
    features = _feature_changes(store, sel, rows_b, rid_b, sae) if sae is not None else None
    name = name or f"diff:{sel.run}..{name_b}"
    call = dict(
        run_a=run_a,
        run_b=run_b,
        hooks=hook_list,
        where=where,
        params=params,
        group=group,
        pair=pair,
        methods=list(methods),
        split=split,
        test_fraction=test_fraction,
        seed=seed,
        C=C,
        cka=cka,
        sae=sae,
        block_rows=block_rows,
        top=top,
    )
    result = DiffResult(
        name=name,
        run_a=sel.run,
        run_b=name_b,
        where=where,
        n_rows=sel.n,
        n_unmatched=n_unmatched,
        layers=tuple(layers),
        features=features,
        params=call,
    )
    if not save:
        return result
    prov = provenance(
        store,
        runs={sel.run: info_a.run_id, name_b: rid_b},
        where=where,
        params=params,
        n_rows={"matched": sel.n, "unmatched": n_unmatched},
        block_rows=block_rows,
    )
    aid = save_analysis(
        store,
        name=name,
        kind="checkpoint_diff",
        params=call,
        result=result.to_dict(top),
        provenance=prov,
    )
    return dataclasses.replace(result, analysis_id=aid)
