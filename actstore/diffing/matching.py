"""Feature matching across SAEs: decoder cosine similarity and a one-to-one assignment.

Two SAEs (trained on two checkpoints, or on two layers) each have a decoder
``W_dec_FD``: one direction per feature. Their unit rows' cosines ``cos_AB``
say which features write the same direction. :func:`match_features` stores, for
every feature of SAE A:

- ``feature_b``, ``cosine``: its partner in the one-to-one matching that maximises
  the total cosine (the Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``;
  NULL when A has more features than B and this one is left over);
- ``nearest_b``, ``nearest_cosine``: B's feature closest to it (not one-to-one);
- ``mutual``: whether it is also the nearest A-feature of its nearest B-feature.

The rows go to the ``feature_matches`` table, keyed by the analysis that made them
(``analyses``, kind ``feature_match``), so "which trigger features of the backdoored
SAE have a match in the safety-fine-tuned one" is a join with ``trigger_diff``'s
output. The cosine matrix is dense, ``F_A x F_B`` float32, and the assignment is
cubic in the number of features: fine for dictionaries of a few thousand features.

Example
-------
>>> m = match_features(st, "l2_backdoored", "l2_safety_ft")  # doctest: +SKIP
>>> m.table().df().head()  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.errors import InputError, NotFoundError

if TYPE_CHECKING:
    from actstore.store.result import Result
    from actstore.store.store import Store

KIND = "feature_match"

TABLE_DDL = """CREATE TABLE IF NOT EXISTS feature_matches (
    analysis_id INTEGER, sae_id_a INTEGER, sae_id_b INTEGER, feature_a INTEGER,
    feature_b INTEGER, cosine DOUBLE, nearest_b INTEGER, nearest_cosine DOUBLE,
    mutual BOOLEAN)"""
"""The catalog table of feature matches (created by the first :func:`match_features`)."""


@dataclass(frozen=True)
class FeatureMatch:
    """A stored matching between the features of two SAEs."""

    store: Any
    name: str
    analysis_id: int
    sae_a: str
    sae_b: str
    mean_cosine: float
    """Mean cosine of the matched pairs."""
    frac_above_0_9: float
    """Share of A's features whose matched partner has cosine above 0.9."""

    def table(self) -> Result:
        """Every feature of A with its match, nearest feature and cosines, by feature.

        Example
        -------
        >>> m.table().df()  # doctest: +SKIP
        """
        return self.store.sql(
            """SELECT feature_a, feature_b, cosine, nearest_b, nearest_cosine, mutual
               FROM feature_matches WHERE analysis_id = ? ORDER BY feature_a""",
            [self.analysis_id],
        )


def unit_rows(W_FD: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero).

    Example
    -------
    >>> unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6, 0.8], [0.0, 0.0]]
    """
    norms = np.linalg.norm(W_FD, axis=1, keepdims=True)
    return np.divide(W_FD, norms, out=np.zeros_like(W_FD), where=norms > 0)


def match_decoders(W_dec_a: np.ndarray, W_dec_b: np.ndarray) -> dict[str, np.ndarray]:
    """Matching of two decoders' rows: per row of A, partner, cosine, nearest and mutual flag.

    Example
    -------
    >>> W = np.eye(3)
    >>> match_decoders(W, W[[2, 0, 1]])["feature_b"].tolist()
    [1, 2, 0]
    """
    from scipy.optimize import linear_sum_assignment

    a, b = unit_rows(np.asarray(W_dec_a, np.float64)), unit_rows(np.asarray(W_dec_b, np.float64))
    cos_AB = a @ b.T
    rows, cols = linear_sum_assignment(cos_AB, maximize=True)
    partner = np.full(a.shape[0], -1, np.int64)
    partner[rows] = cols
    cosine = np.full(a.shape[0], np.nan)
    cosine[rows] = cos_AB[rows, cols]
    nearest = cos_AB.argmax(1)
    back = cos_AB.argmax(0)
    return {
        "feature_b": partner,
        "cosine": cosine,
        "nearest_b": nearest,
        "nearest_cosine": cos_AB[np.arange(a.shape[0]), nearest],
        "mutual": back[nearest] == np.arange(a.shape[0]),
    }


def _decoder(store: Store, name: str) -> tuple[int, np.ndarray]:
    from actstore.ingest.saes import SAESpec, load_sae

    rows = store.sql(
        "SELECT sae_id, source, hook, weights_hash FROM saes WHERE name = ?", [name]
    ).fetchall()
    if not rows:
        names = [r[0] for r in store.sql("SELECT name FROM saes ORDER BY sae_id").fetchall()]
        raise NotFoundError(f"no SAE named {name!r} in the store; SAEs: {names or 'none'}")
    sae_id, source, hook, recorded = rows[0]
    if not source or not Path(source).is_dir():
        raise InputError(
            f"SAE {name!r} was loaded from {source!r}, which is not a directory here; "
            "matching needs its weights on disk"
        )
    loaded = load_sae(SAESpec(path=source, name=name, hook=hook or None), "cpu")
    if recorded and loaded.weights_hash != recorded:
        raise InputError(
            f"SAE {name!r} at {source} has other weights (hash {loaded.weights_hash}) than "
            f"recorded ({recorded}); restore them to match its features"
        )
    return int(sae_id), loaded.sae.W_dec.detach().float().cpu().numpy()


def _existing(store: Store, name: str) -> list[int]:
    rows = store.sql("SELECT analysis_id FROM analyses WHERE name = ? AND kind = ?", [name, KIND])
    return [int(r[0]) for r in rows.fetchall()]


def match_features(
    store: Store,
    sae_a: str,
    sae_b: str,
    *,
    name: str | None = None,
    replace: bool = False,
) -> FeatureMatch:
    """Match the features of two stored SAEs by decoder cosine; store and return the matching.

    Parameters
    ----------
    store
        The store.
    sae_a, sae_b
        Names of SAEs in the store's ``saes`` table, with their directories on disk
        (weights checked against the recorded hash); same input width.
    name
        The analysis name (default ``match:{sae_a}->{sae_b}``).
    replace
        Replace a stored matching of the same name (else that is an error).

    Returns
    -------
    FeatureMatch

    Example
    -------
    >>> m = match_features(st, "l2_backdoored", "l2_safety_ft")  # doctest: +SKIP
    >>> m.mean_cosine  # doctest: +SKIP
    0.93
    """
    from actstore.analysis.results import jsonable, versions
    from actstore.store.writer import bump_commit_seq

    name = name or f"match:{sae_a}->{sae_b}"
    olds = _existing(store, name)
    if olds and not replace:
        raise InputError(
            f"a feature matching named {name!r} is already stored; pass another name= or replace=True"
        )
    id_a, W_a = _decoder(store, sae_a)
    id_b, W_b = _decoder(store, sae_b)
    if W_a.shape[1] != W_b.shape[1]:
        raise InputError(
            f"SAE {sae_a!r} decodes to width {W_a.shape[1]} but {sae_b!r} to {W_b.shape[1]}; "
            "features can only be matched within one width"
        )
    m = match_decoders(W_a, W_b)
    matched = m["cosine"][~np.isnan(m["cosine"])]
    summary = {
        "d_sae_a": W_a.shape[0],
        "d_sae_b": W_b.shape[0],
        "mean_cosine": float(matched.mean()),
        "frac_above_0_9": float((m["cosine"] > 0.9).mean()),
        "frac_mutual": float(m["mutual"].mean()),
    }
    table = pa.table(
        {
            "feature_a": pa.array(np.arange(W_a.shape[0]), pa.int32()),
            "feature_b": pa.array([None if b < 0 else int(b) for b in m["feature_b"]], pa.int32()),
            "cosine": pa.array(m["cosine"], pa.float64(), from_pandas=True),
            "nearest_b": pa.array(m["nearest_b"], pa.int32()),
            "nearest_cosine": pa.array(m["nearest_cosine"], pa.float64()),
            "mutual": pa.array(m["mutual"], pa.bool_()),
        }
    )
    params = {"sae_a": sae_a, "sae_b": sae_b, "sae_id_a": id_a, "sae_id_b": id_b}
    prov = {"versions": versions(), "store": str(store.root)}
    with store.catalog.write() as con:
        con.execute(TABLE_DDL)
        for old in olds:
            con.execute("DELETE FROM feature_matches WHERE analysis_id = ?", [old])
            con.execute("DELETE FROM analyses WHERE analysis_id = ?", [old])
        aid = int(
            con.execute("SELECT coalesce(max(analysis_id), 0) + 1 FROM analyses").fetchall()[0][0]
        )
        con.execute(
            "INSERT INTO analyses VALUES (?, ?, ?, ?, ?, ?, now())",
            [aid, name, KIND, *(json.dumps(jsonable(x)) for x in (params, summary, prov))],
        )
        con.register("_matches", table)
        con.execute(
            """INSERT INTO feature_matches SELECT ?, ?, ?, feature_a, feature_b, cosine,
                   nearest_b, nearest_cosine, mutual FROM _matches""",
            [aid, id_a, id_b],
        )
        con.unregister("_matches")
        bump_commit_seq(con)
    return FeatureMatch(
        store, name, aid, sae_a, sae_b, summary["mean_cosine"], summary["frac_above_0_9"]
    )
