"""Part files for runs split across processes (pytest-xdist workers).

Each worker writes its case records with :func:`write_part`; the controller reads those of
its own run with :func:`merge_parts` (parts of any other run — left by an interrupted
earlier session — are removed, never mixed in) and passes them to
:func:`equivcheck.report.write_report`, which clears the part folder once the report is
written. Records are de-duplicated by id, so a part read twice changes nothing. Workers
that can send data to the controller directly (xdist's ``workeroutput``) need no files:
send ``[case_record(c) for c in cases]`` and pass every worker's list to ``write_report``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from equivcheck.errors import FileFormatError, SpecError
from equivcheck.files import atomic_write_text

__all__ = ["PARTS_DIR", "clear_parts", "merge_parts", "write_part"]

PARTS_DIR = ".equivcheck-parts"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise SpecError(f"{what}={value!r} is not valid: expected 1–64 letters, digits, '_' or '-'")
    return value


def write_part(directory: str | Path, cases: Sequence[Any], *, run_id: str, worker: str) -> Path:
    """Write one worker's records for run ``run_id`` into ``directory``'s part folder."""
    from equivcheck.report.jsonio import SCHEMA_VERSION
    from equivcheck.report.records import case_record

    folder = Path(directory) / PARTS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileFormatError(f"report folder={str(folder)!r} cannot be created ({exc.strerror})") from None
    path = folder / f"{_check('run_id', run_id)}.{_check('worker', worker)}.json"
    body = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "worker": worker,
            "cases": [case_record(c) for c in cases]}
    atomic_write_text(path, json.dumps(body, ensure_ascii=False, allow_nan=False))
    return path


def merge_parts(directory: str | Path, run_id: str) -> list[dict[str, Any]]:
    """The records of every part of run ``run_id``, de-duplicated; parts of other runs are deleted."""
    from equivcheck.report.records import merge_cases

    folder = Path(directory) / PARTS_DIR
    if not folder.is_dir():
        return []
    _check("run_id", run_id)
    batches = []
    for path in sorted(folder.glob("*.json")):
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            body = None
        if not isinstance(body, dict) or body.get("run_id") != run_id or not path.name.startswith(run_id + "."):
            path.unlink(missing_ok=True)  # another run's leftovers, or a torn file: never mixed in
            continue
        batches.append(body.get("cases") or [])
    return merge_cases(*batches)


def clear_parts(directory: str | Path) -> None:
    """Remove ``directory``'s part folder (after the report that merged it is written)."""
    shutil.rmtree(Path(directory) / PARTS_DIR, ignore_errors=True)
