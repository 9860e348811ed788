"""Who hears of each finished model check: the pytest plugin collects them for its report.

    with listening() as found:
        run_the_test()
    found  # every ModelCheck that check_models returned meanwhile, in order

Framework-free; nothing listens unless asked, and a listener costs one list append per check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["listening", "notify"]

_LISTENERS: list[list[Any]] = []


@contextmanager
def listening() -> Iterator[list[Any]]:
    """A list that every :class:`~equivcheck.modelcheck.ModelCheck` finished inside the block is appended to."""
    found: list[Any] = []
    _LISTENERS.append(found)
    try:
        yield found
    finally:
        _LISTENERS.remove(found)


def notify(result: Any) -> None:
    """Called by :func:`~equivcheck.modelcheck.check_models` with each result it returns."""
    for found in _LISTENERS:
        found.append(result)
