"""Stored results, the analysis registry, JSON safety, and the one-call contract."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

import actstore.analysis as an
from actstore.analysis import (
    ANALYSES,
    analysis_params,
    get_analysis,
    list_analyses,
    list_directions,
    load_direction,
    run_analysis,
)
from actstore.analysis.results import jsonable, resolve_vectors
from actstore.errors import NotFoundError, SpecError


def test_every_public_function_has_an_example():
    for name in an.__all__:
        obj = getattr(an, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and "Example" in obj.__doc__, name


def test_every_result_has_summary_and_to_dict():
    results = [an.PCAResult, an.ContrastResult, an.RewardResult, an.DiffResult, an.LensResult]
    for cls in [*results, an.SAEDecomposition]:
        assert callable(cls.summary) and callable(cls.to_dict), cls.__name__


def test_run_analysis_validates_parameters(synth32):
    st = synth32.store
    res = run_analysis(
        st, "pca", {"run": "base", "hooks": "blocks.1.hook_resid_post", "k": 2, "save": False}
    )
    assert res.components.shape == (2, 16)
    with pytest.raises(SpecError, match="unknown parameter\\(s\\) \\['kk'\\]"):
        run_analysis(st, "pca", {"run": "base", "hooks": "x", "kk": 2})
    with pytest.raises(SpecError, match="needs parameter\\(s\\) \\['hooks'\\]"):
        run_analysis(st, "pca", {"run": "base"})
    with pytest.raises(SpecError, match="unknown analysis 'svd'"):
        run_analysis(st, "svd", {})
    assert set(ANALYSES) == {"pca", "contrast", "reward", "diff", "unembed", "sae_decompose"}
    assert "where" in analysis_params("contrast") and "store" not in analysis_params("contrast")


def test_stored_objects_round_trip(synth32):
    st = synth32.store
    res = an.contrast(
        st,
        run="base",
        hooks="blocks.1.hook_resid_post",
        group="triggered",
        where="position_role = 'last'",
        n_random=5,
        name="rt",
    )
    d = load_direction(st, "rt/logistic/blocks.1.hook_resid_post")
    np.testing.assert_allclose(d.vector, res.direction("logistic"))
    assert np.linalg.norm(d.unit) == pytest.approx(1.0)
    assert d.params["intercept"] == res.layer().extras["logistic"]["intercept"]
    names = list_directions(st).column("name").to_pylist()
    assert "rt/mean_diff/blocks.1.hook_resid_post" in names
    assert "rt" in list_analyses(st, "contrast").column("name").to_pylist()
    rec = get_analysis(st, res.analysis_id)
    assert rec.name == "rt" and rec.provenance["versions"]["actstore"]
    assert rec.provenance["where"] == "position_role = 'last'"
    assert json.dumps(rec.result)  # JSON all the way down
    with pytest.raises(NotFoundError, match="stored directions"):
        load_direction(st, "nope")
    with pytest.raises(NotFoundError, match="stored analyses"):
        get_analysis(st, "nope")
    assert resolve_vectors(st, ["rt/mean_diff/blocks.1.hook_resid_post", np.ones(16)])[1][0] == "v1"


def test_jsonable():
    out = jsonable({"a": np.float64("nan"), "b": np.int32(3), "c": (np.bool_(True),)})
    assert out == {"a": None, "b": 3, "c": [True]}
    assert json.dumps(out, allow_nan=False)
