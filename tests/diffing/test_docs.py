"""The runnable examples in the diffing modules' docstrings pass."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "adl",
    "crosscoder",
    "crosscoder_store",
    "matching",
    "models",
    "token_diff",
    "trajectory",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"actstore.diffing.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0
