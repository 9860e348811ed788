"""Leftovers of earlier versions, which wrote per-worker part files into the report folder.

The pytest plugin now sends each test's records with its test report (they reach the xdist
controller as each test finishes), so no part files are written; :func:`clear_parts` removes
a part folder an older run left behind when a report is written there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["PARTS_DIR", "clear_parts"]

PARTS_DIR = ".equivcheck-parts"


def clear_parts(directory: str | Path) -> None:
    """Remove ``directory``'s part folder (after the report that merged it is written)."""
    shutil.rmtree(Path(directory) / PARTS_DIR, ignore_errors=True)
