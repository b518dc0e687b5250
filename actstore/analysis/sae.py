"""SAE decomposition of a direction: which SAE features point the same way.

A direction in a hook's activation space (a mean difference, a probe, a
principal component) is compared with every row of an SAE's decoder
``W_dec`` (F x D) by cosine similarity; the features with the largest and the
most negative cosines are the SAE's vocabulary for that direction. The SAE is
found by name in the catalog (``saes``) and loaded from its ``source``
directory with ``sae_lens.SAE.load_from_disk``; an SAE object (anything with a
``W_dec``) or a decoder matrix can be passed instead.

Example
-------
>>> dec = sae_decompose(st, direction="trigger/mean_diff/blocks.2.hook_resid_post",
...                     sae="sae_l2", k=10)  # doctest: +SKIP
>>> dec.summary().to_pandas()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from actstore.analysis.results import (
    Direction,
    jsonable,
    provenance,
    resolve_vectors,
    save_analysis,
)
from actstore.errors import InputError, NotFoundError
from actstore.store.ids import as_id

if TYPE_CHECKING:
    from actstore.store.store import Store


def sae_record(store: Store, sae: str | int) -> dict[str, Any]:
    """The catalog row of an SAE given by name or id (the error lists the stored SAEs).

    Example
    -------
    >>> sae_record(st, "sae_l2")["d_sae"]  # doctest: +SKIP
    256
    """
    rows = store.sql("SELECT * FROM saes ORDER BY sae_id").arrow().to_pylist()
    for r in rows:
        if sae == r["name"] or (as_id(sae) is not None and as_id(sae) == r["sae_id"]):
            if isinstance(r.get("config"), str):
                r["config"] = json.loads(r["config"] or "{}")
            return dict(r)
    raise NotFoundError(
        f"SAE {sae!r} not in the store; SAEs: {[r['name'] for r in rows] or 'none yet'} "
        f"(see `actstore info {store.root}`)"
    )


def load_decoder(sae: Any) -> tuple[np.ndarray, str]:
    """(W_dec_FD as float64, hook name or "") of an SAE object, a decoder array or a directory.

    A directory is loaded with ``sae_lens.SAE.load_from_disk`` (its ``cfg.json``
    and weights, as ``SAE.save_model`` writes them).

    Example
    -------
    >>> W_dec_FD, hook = load_decoder(np.eye(4))
    >>> W_dec_FD.shape, hook
    ((4, 4), '')
    """
    if isinstance(sae, np.ndarray):
        return np.asarray(sae, np.float64), ""
    if isinstance(sae, str | Path):
        path = Path(sae)
        if not path.is_dir():
            raise InputError(
                f"SAE source {str(sae)!r} is not a local directory; load the SAE yourself "
                "(e.g. sae_lens.SAE.from_pretrained) and pass the object as sae="
            )
        from sae_lens import SAE

        sae = SAE.load_from_disk(str(path), device="cpu")
    W = getattr(sae, "W_dec", None)
    if W is None:
        raise InputError(
            f"{type(sae).__name__} has no W_dec; pass an SAE name from the store, an sae_lens "
            "SAE, a directory saved by SAE.save_model, or an (F, D) decoder array"
        )
    W_dec_FD = np.asarray(W.detach().float().cpu().numpy() if hasattr(W, "detach") else W)
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None) or ""
    return W_dec_FD.astype(np.float64), str(hook)


@dataclass(frozen=True, slots=True, eq=False)
class SAEDecomposition:
    """Cosines of a direction with every decoder row of an SAE, and the extremes."""

    name: str
    """The analysis name."""
    direction: str
    """The direction's name (or ``v0`` for an array)."""
    sae: str
    """The SAE's name (or its type)."""
    hook: str
    """The hook the direction and the SAE share (``""`` if unknown)."""
    cosines: np.ndarray
    """(F,) cosine of the direction with each decoder row."""
    dots: np.ndarray
    """(F,) decoder row dotted with the unit direction."""
    k: int
    """How many features :meth:`summary` lists at each end."""
    analysis_id: int | None = None
    """The stored analysis, if saved."""
    params: dict[str, Any] = field(default_factory=dict)
    """The call's parameters."""

    def top(self, k: int | None = None) -> np.ndarray:
        """Features with the largest cosines, best first.

        Example
        -------
        >>> dec.top(3)  # doctest: +SKIP
        array([17,  4, 200])
        """
        k = self.k if k is None else k
        return np.argsort(-self.cosines, kind="stable")[:k]

    def bottom(self, k: int | None = None) -> np.ndarray:
        """Features with the most negative cosines, most negative first.

        Example
        -------
        >>> dec.bottom(3)  # doctest: +SKIP
        """
        k = self.k if k is None else k
        return np.argsort(self.cosines, kind="stable")[:k]

    def summary(self) -> pa.Table:
        """The ``k`` top and ``k`` bottom features: side, rank, feature, cosine, dot.

        Example
        -------
        >>> dec.summary().to_pylist()[0]["feature"]  # doctest: +SKIP
        """
        rows = []
        for side, feats in (("top", self.top()), ("bottom", self.bottom())):
            for rank, f in enumerate(feats):
                rows.append(
                    {
                        "side": side,
                        "rank": rank,
                        "feature": int(f),
                        "cosine": float(self.cosines[f]),
                        "dot": float(self.dots[f]),
                    }
                )
        return pa.Table.from_pylist(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the extremes, not all F cosines).

        Example
        -------
        >>> dec.to_dict()["top"][0]  # doctest: +SKIP
        """
        table = self.summary().to_pylist()
        return jsonable(
            {
                "name": self.name,
                "direction": self.direction,
                "sae": self.sae,
                "hook": self.hook,
                "d_sae": int(self.cosines.size),
                "analysis_id": self.analysis_id,
                "top": [r for r in table if r["side"] == "top"],
                "bottom": [r for r in table if r["side"] == "bottom"],
            }
        )


def sae_decompose(
    store: Store | None = None,
    *,
    direction: str | Direction | np.ndarray,
    sae: str | int | Any,
    k: int = 20,
    check_hook: bool = True,
    name: str | None = None,
    save: bool = True,
) -> SAEDecomposition:
    """Cosine of a direction with every SAE decoder row; the top and bottom features.

    Parameters
    ----------
    store
        The store (needed for stored names and for saving).
    direction
        A stored direction's name, a :class:`~actstore.analysis.results.Direction`, or a (D,) array.
    sae
        An SAE name or id in the store (loaded from its ``source`` directory with
        sae_lens), an sae_lens SAE object, a directory, or an (F, D) decoder array.
    k
        Features listed at each end.
    check_hook
        Refuse a direction and an SAE that name different hooks.
    name
        Analysis name (default ``sae_decompose:{direction}``).
    save
        Store the analysis (needs ``store``).

    Returns
    -------
    SAEDecomposition

    Example
    -------
    >>> dec = sae_decompose(st, direction="trigger/mean_diff/blocks.2.hook_resid_post", sae="sae_l2")  # doctest: +SKIP
    >>> dec.top(5)  # doctest: +SKIP
    """
    vecs = resolve_vectors(store, direction)
    if len(vecs) != 1:
        raise InputError(f"sae_decompose takes one direction, got {len(vecs)}; loop over them")
    label, v, dir_hook = vecs[0]
    sae_name, sae_hook = type(sae).__name__, ""
    if (isinstance(sae, str) or as_id(sae) is not None) and not (
        isinstance(sae, str) and Path(sae).is_dir()
    ):
        if store is None:
            raise InputError(f"SAE {sae!r} is a stored name; pass the store too")
        rec = sae_record(store, sae)
        sae_name, sae_hook = str(rec["name"]), str(rec.get("hook") or "")
        W_dec_FD, loaded_hook = load_decoder(rec.get("source") or "")
    else:
        W_dec_FD, loaded_hook = load_decoder(sae)
        if isinstance(sae, str):
            sae_name = sae
    sae_hook = sae_hook or loaded_hook
    if check_hook and dir_hook and sae_hook and dir_hook != sae_hook:
        raise InputError(
            f"direction {label!r} lives in {dir_hook!r} but SAE {sae_name!r} reads {sae_hook!r}; "
            "choose an SAE of the same hook, or pass check_hook=False"
        )
    if W_dec_FD.ndim != 2 or W_dec_FD.shape[1] != v.size:
        raise InputError(
            f"SAE {sae_name!r} decodes to width {W_dec_FD.shape[-1]} but direction {label!r} has "
            f"width {v.size}"
        )
    unit = v / np.linalg.norm(v)
    dots = W_dec_FD @ unit
    norms = np.linalg.norm(W_dec_FD, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(norms > 0, dots / norms, 0.0)
    name = name or f"sae_decompose:{label}"
    call = {"direction": label, "sae": sae_name, "k": k, "check_hook": check_hook}
    result = SAEDecomposition(
        name=name,
        direction=label,
        sae=sae_name,
        hook=dir_hook or sae_hook,
        cosines=cos,
        dots=dots,
        k=k,
        params=call,
    )
    if not save or store is None:
        return result
    prov = provenance(store, runs={}, where=None, n_rows=0, d_sae=int(cos.size))
    aid = save_analysis(
        store,
        name=name,
        kind="sae_decompose",
        params=call,
        result=result.to_dict(),
        provenance=prov,
    )
    return dataclasses.replace(result, analysis_id=aid)
