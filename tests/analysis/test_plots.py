"""Plots are written as PNG files without touching pyplot's global state."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pytest

from actstore.analysis import (
    contrast,
    pca,
    plot_auroc_by_layer,
    plot_feature_effects,
    plot_pca,
    reward_correlation,
)
from actstore.errors import InputError

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_plots(synth32, tmp_path):
    st = synth32.store
    res = pca(
        st,
        run="base",
        hooks="blocks.1.hook_resid_post",
        where="position_role = 'last'",
        k=2,
        save=False,
    )
    assert is_png(plot_pca(res, tmp_path / "pca.png", color="triggered"))
    assert is_png(plot_pca(res, tmp_path / "pca_reward.png", color="reward"))
    assert is_png(plot_pca(res, tmp_path / "sub" / "pca_plain.png"))
    with pytest.raises(InputError, match="not a row column"):
        plot_pca(res, tmp_path / "x.png", color="nope")

    c = contrast(
        st,
        run="base",
        hooks="blocks.*.hook_resid_post",
        group="triggered",
        where="position_role = 'last'",
        n_random=20,
        save=False,
    )
    assert is_png(plot_auroc_by_layer(c, tmp_path / "auroc.png"))

    r = reward_correlation(st, run="base", reward="reward", sae="sae2", save=False)
    assert is_png(plot_feature_effects(r, tmp_path / "features.png", k=5))
    table = pa.table({"feature": [1, 2, 3], "effect": [0.5, -1.0, np.nan]})
    assert is_png(plot_feature_effects(table, tmp_path / "t.png", value="effect"))
    assert "matplotlib.pyplot" not in sys.modules
