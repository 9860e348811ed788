"""pytest plugin (thin): options, the ``equivcheck`` fixture, a marker and a terminal summary.

All logic lives in the library; loading this module imports no deep-learning framework.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("equivcheck", "dense <-> conv weight conversion checks")
    group.addoption("--equivcheck-backends", default=None, help="comma-separated backends to check on")
