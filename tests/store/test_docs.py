"""The runnable examples in the store modules' docstrings pass."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "arrays",
    "access",
    "catalog",
    "features",
    "format",
    "create",
    "location",
    "part_check",
    "predicate",
    "readcache",
    "remote",
    "session",
    "shard_buffer",
    "store",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path))  # remote catalogs' local cache
    module = importlib.import_module(f"actstore.store.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0
