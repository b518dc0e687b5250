"""Analyses over a store: PCA, contrast directions, reward correlation, checkpoint diffs, lenses.

Each analysis is one function taking the store and keyword parameters; rows
are chosen with a SQL predicate over ``labeled_tokens`` and activations are
read in blocks. Each returns a frozen result with ``.summary()`` (an Arrow
table) and ``.to_dict()`` (JSON values), and, unless ``save=False``, stores
the result in the catalog's ``analyses`` table with its parameters and
provenance, and the directions it finds in ``directions`` by name.

========================  =====================================================
``pca``                   :func:`~actstore.analysis.pca.pca`
``contrast``              :func:`~actstore.analysis.contrast.contrast`
``reward``                :func:`~actstore.analysis.reward.reward_correlation`
``diff``                  :func:`~actstore.analysis.diff.checkpoint_diff`
``unembed``               :func:`~actstore.analysis.lens.unembed`
``sae_decompose``         :func:`~actstore.analysis.sae.sae_decompose`
========================  =====================================================

:data:`ANALYSES` maps these kinds to the functions and :func:`run_analysis`
calls one by kind with parameters from a mapping (a TOML table, CLI options),
rejecting unknown parameters.

Example
-------
>>> from actstore.analysis import contrast
>>> res = contrast(st, run="backdoored/pairs", hooks="blocks.*.hook_resid_post",
...                group="triggered", where="position_role = 'last'", split="split")  # doctest: +SKIP
>>> res.best().hook, res.best().auroc["mean_diff"]  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from actstore.analysis.contrast import ContrastLayer, ContrastResult, contrast, fit_directions
from actstore.analysis.diff import DiffLayer, DiffResult, Transfer, checkpoint_diff
from actstore.analysis.lens import LensResult, direction_logits, unembed
from actstore.analysis.metrics import RandomBaseline
from actstore.analysis.pca import PCAFit, PCAResult, pca
from actstore.analysis.plots import plot_auroc_by_layer, plot_feature_effects, plot_pca
from actstore.analysis.results import (
    AnalysisRecord,
    Direction,
    get_analysis,
    list_analyses,
    list_directions,
    load_direction,
)
from actstore.analysis.reward import RewardResult, RidgeFit, reward_correlation
from actstore.analysis.sae import SAEDecomposition, sae_decompose
from actstore.errors import SpecError

if TYPE_CHECKING:
    from actstore.store.store import Store

ANALYSES: dict[str, Callable[..., Any]] = {
    "pca": pca,
    "contrast": contrast,
    "reward": reward_correlation,
    "diff": checkpoint_diff,
    "unembed": unembed,
    "sae_decompose": sae_decompose,
}
"""Analysis kind -> entry function (``fn(store, **params)``)."""


def analysis_params(kind: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of an analysis kind (for CLIs and spec validation).

    Example
    -------
    >>> "group" in analysis_params("contrast")
    True
    """
    if kind not in ANALYSES:
        raise SpecError(f"unknown analysis {kind!r}; choose from {sorted(ANALYSES)}")
    sig = inspect.signature(ANALYSES[kind])
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def run_analysis(store: Store, kind: str, params: Mapping[str, Any]) -> Any:
    """Run an analysis by kind with parameters from a mapping; unknown keys are errors.

    Example
    -------
    >>> run_analysis(st, "pca", {"run": "r", "hooks": "blocks.1.hook_resid_post", "k": 3})  # doctest: +SKIP
    """
    known = analysis_params(kind)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise SpecError(
            f"unknown parameter(s) {unknown} for analysis {kind!r}; it takes {sorted(known)}"
        )
    missing = sorted(
        n for n, p in known.items() if p.default is inspect.Parameter.empty and n not in params
    )
    if missing:
        raise SpecError(f"analysis {kind!r} needs parameter(s) {missing}")
    return ANALYSES[kind](store, **params)


__all__ = [
    "ANALYSES",
    "AnalysisRecord",
    "ContrastLayer",
    "ContrastResult",
    "DiffLayer",
    "DiffResult",
    "Direction",
    "LensResult",
    "PCAFit",
    "PCAResult",
    "RandomBaseline",
    "RewardResult",
    "RidgeFit",
    "SAEDecomposition",
    "Transfer",
    "analysis_params",
    "checkpoint_diff",
    "contrast",
    "direction_logits",
    "fit_directions",
    "get_analysis",
    "list_analyses",
    "list_directions",
    "load_direction",
    "pca",
    "plot_auroc_by_layer",
    "plot_feature_effects",
    "plot_pca",
    "reward_correlation",
    "run_analysis",
    "sae_decompose",
    "unembed",
]
