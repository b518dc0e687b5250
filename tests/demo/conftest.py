"""The worked example, run once per session and shared by the tests that read its store."""

from __future__ import annotations

import pytest

import actstore
from actstore.demo.run import DemoReport


@pytest.fixture(scope="session")
def demo(demo_run) -> tuple[DemoReport, actstore.Store]:
    """``actstore demo`` (run once per session by ``demo_run`` in tests/conftest.py):
    its report and its store."""
    report, out = demo_run
    return report, actstore.open(out / "store")
