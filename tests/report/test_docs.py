"""The runnable examples in the report modules' docstrings pass."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "analyses",
    "data",
    "features",
    "figures",
    "logit_lens",
    "pages",
    "prompts",
    "render",
    "serve",
    "site",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"actstore.report.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


def test_package_examples():
    import actstore.report

    assert doctest.testmod(actstore.report, optionflags=doctest.ELLIPSIS).failed == 0
