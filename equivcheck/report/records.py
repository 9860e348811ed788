"""Case records: a :class:`~equivcheck.verification.Case` as the plain dict a report stores.

A record is ``Case.to_dict()`` plus ``id`` (a content hash, so records sent twice — by two
pytest-xdist workers, or a retry — collapse into one), ``title``, and, for a case that did not
pass, ``error_map`` (its output error reduced to a small 2-D grid for a picture) and
``diagnosis`` (the mutant whose kernel the converter returned, found by
:func:`equivcheck.verification.verify_pair`). Everything that needs the case's arrays is computed
before the record leaves the process, so a record can cross a process boundary as JSON and
still give the same report.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from equivcheck.errors import SpecError

__all__ = ["case_id", "case_record", "check_record", "merge_cases", "reduce_map", "to_jsonable"]

MAP_CELLS = 48  # an error map is pooled down to at most this many rows and columns
_VOLATILE = ("id", "title", "pictures", "error_map", "diagnosis")


def to_jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples, sets and paths made JSON-safe; NaN/Inf → None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v) for v in value), key=str)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


def case_id(record: dict[str, Any]) -> str:
    """A stable hash of a record's content (its ``id`` if it has one)."""
    if record.get("id"):
        return str(record["id"])
    body = {k: v for k, v in record.items() if k not in _VOLATILE}
    text = json.dumps(to_jsonable(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def reduce_map(errors: np.ndarray) -> dict[str, Any] | None:
    """An output error array (batch first) as a small 2-D grid, with axis labels.

    A conv output (batch, channels, *spatial) becomes its spatial map, max over batch and
    channels (3-D maps laid side by side along depth); a flat output (batch, units) stays
    batch × units. Either is max-pooled to at most :data:`MAP_CELLS` per side.
    """
    a = np.asarray(errors, dtype=np.float64)
    if a.ndim < 2 or a.size == 0:
        return None
    a = np.where(np.isnan(a), np.inf, a)  # a non-finite output is the worst error there is
    if a.ndim > 2 and math.prod(a.shape[2:]) > 1:
        grid = a.max(axis=(0, 1))
        if grid.ndim == 1:
            grid, rows, cols = grid[None, :], "", "W"
        elif grid.ndim == 3:
            grid, rows, cols = np.concatenate(list(grid), axis=1), "H", "D×W (depth slices side by side)"
        else:
            rows, cols = "H", "W"
        what = "output map, max |error| over batch and channels"
    else:
        grid, rows, cols = a.reshape(a.shape[0], -1), "sample", "output unit"
        what = "output, |error| per sample and unit"
    grid = _pool(grid, MAP_CELLS)
    return {"what": what, "rows": rows, "cols": cols,
            "values": [[None if not math.isfinite(v) else float(f"{v:.4g}") for v in row] for row in grid.tolist()]}


def _pool(grid: np.ndarray, cells: int) -> np.ndarray:
    """Max-pool a 2-D grid down to at most ``cells`` per side."""
    for axis in (0, 1):
        n = grid.shape[axis]
        if n > cells:
            step = math.ceil(n / cells)
            width = [(0, 0), (0, 0)]
            width[axis] = (0, step * math.ceil(n / step) - n)
            g = np.pad(grid, width, constant_values=-np.inf)
            shape = list(g.shape)
            shape[axis : axis + 1] = [shape[axis] // step, step]
            grid = g.reshape(shape).max(axis=axis + 1)
    return grid


def case_record(case: Any) -> dict[str, Any]:
    """A :class:`~equivcheck.verification.Case` (or an existing record) as a report record."""
    if isinstance(case, dict):
        record = dict(case)
    elif hasattr(case, "to_dict"):
        record = case.to_dict()
        if case.verdict not in ("pass", "skip"):
            out = (getattr(case, "errors", None) or {}).get("output")
            if out is not None:
                record["error_map"] = reduce_map(out)
    else:
        raise SpecError(f"case={type(case).__name__} is not a Case or a case dict: pass verify()'s cases or Case.to_dict()")
    for key in ("source", "target", "verdict"):
        if key not in record:
            raise SpecError(f"case dict has no {key!r} key: expected Case.to_dict()'s format")
    record = to_jsonable(record)
    from equivcheck.report.conventions import conversion_label

    record.setdefault("title", conversion_label(record))
    record["id"] = case_id(record)
    return record


def merge_cases(*batches: Iterable[Any]) -> list[dict[str, Any]]:
    """Records from any number of batches (e.g. one per xdist worker), in order, duplicates merged into one."""
    seen: dict[str, dict[str, Any]] = {}
    for batch in batches:
        for case in batch:
            record = case_record(case)
            kept = seen.setdefault(record["id"], record)
            for key, value in record.items():  # a plain to_dict() copy gains what a fuller record adds
                kept.setdefault(key, value)
    return list(seen.values())


def check_record(check: Any) -> dict[str, Any]:
    """The report record of a :class:`equivcheck.checker.CheckRecord`: its case plus what the checker learned."""
    record = case_record(check.case)
    record.pop("id", None)
    record.update(check.details())
    return case_record(record)
