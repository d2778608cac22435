"""Suite-wide pytest options."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-seconds", type=float, default=float(os.environ.get("DUETSERVE_SOAK_SECONDS", "60")),
                     help="how long tests/e2e/test_soak.py drives traffic (default 60, or $DUETSERVE_SOAK_SECONDS)")
