"""The runnable examples in the analysis modules' docstrings pass."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "contrast", "diff", "groups", "lens", "metrics", "pca", "pca_result", "plots", "results", "reward",
    "rows", "sae", "splits",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"actstore.analysis.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


def test_package_examples():
    import actstore.analysis

    assert doctest.testmod(actstore.analysis, optionflags=doctest.ELLIPSIS).failed == 0
