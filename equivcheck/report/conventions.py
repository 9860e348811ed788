"""The convention matrix: for each conversion, which conventions the checks established.

Rows are conversions (``"keras:dense → torch:conv"``, with the converter's name where the case
records one), columns are the conventions of
:class:`equivcheck.mutations.Convention` (flip, flatten order, kernel transposed, kernel axes,
channels, channel order, padding, bias). Each mutant of
:mod:`equivcheck.mutations` breaks one convention, so its outcome says what the data showed:

- ``holds``: the case passed and every mutant breaking that convention was rejected;
- ``ambiguous``: a mutant breaking it was ambiguous on this shape or also passed;
- ``fails``: the case failed — on the convention a mutant reproduces when one does
  (see :func:`equivcheck.report.records.diagnose`), else on every convention checked;
- ``n/a``: no check touches that convention (e.g. flatten order between two convs).

Several cases of one conversion (backend pairs, dtypes, shapes) combine: fails beats holds
beats ambiguous beats n/a — ambiguity at one shape does not undo proof at another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from equivcheck.mutations import Convention, convention_of

__all__ = ["COLUMNS", "STATES", "convention_of", "conversion_label", "matrix"]

COLUMNS = tuple(c.value for c in Convention)
STATES = ("holds", "fails", "ambiguous", "n/a")
_RANK = {"n/a": 0, "ambiguous": 1, "holds": 2, "fails": 3}
_VERDICT_RANK = {"skip": 0, "pass": 1, "inconclusive": 2, "error": 3, "fail": 4}


def spec_label(spec: dict[str, Any]) -> str:
    """A spec's preset name, else a short description from its fields."""
    if spec.get("name"):
        return str(spec["name"])
    if spec.get("kind") == "dense":
        return f"dense[{spec.get('flatten', '?')},{spec.get('kernel_layout', '?')}]"
    kind = "conv_transpose" if spec.get("transposed") else "conv"
    op = "" if spec.get("op", "correlate") == "correlate" else f",{spec['op']}"
    return f"{kind}[{spec.get('kernel_layout', '?')}{op}]"


def conversion_label(case: dict[str, Any]) -> str:
    return f"{spec_label(case.get('source') or {})} → {spec_label(case.get('target') or {})}"


def case_cells(case: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """``{convention: (state, why)}`` for one serialised case."""
    verdict = case.get("verdict")
    diagnosis = case.get("diagnosis") or {}
    blamed = diagnosis.get("convention")
    cells: dict[str, tuple[str, str]] = {}
    for m in case.get("mutations") or []:
        conv = convention_of(m)
        outcome = m.get("outcome")
        if verdict == "fail" and (blamed is None or conv == blamed):
            state = "fails"
            why = (f"the conversion matches mutant {diagnosis['mutant']!r}" if blamed
                   else "the conversion failed; no single wrong convention reproduces it")
        elif outcome == "rejected":
            state, why = "holds", f"mutant {m.get('name')!r} rejected"
        elif outcome == "ambiguous":
            state, why = "ambiguous", f"mutant {m.get('name')!r} moves no weight on this shape"
        else:
            state, why = "ambiguous", f"mutant {m.get('name')!r} also passes on this data"
        old = cells.get(conv)
        # within one case a convention holds only if every mutant breaking it was rejected
        if old is None or _within_case(state) > _within_case(old[0]):
            cells[conv] = (state, why)
    if verdict == "fail" and blamed and blamed not in cells:
        cells[blamed] = ("fails", f"the conversion matches mutant {diagnosis['mutant']!r}")
    return cells


def _within_case(state: str) -> int:
    return {"n/a": 0, "holds": 1, "ambiguous": 2, "fails": 3}[state]


def matrix(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The convention matrix of serialised cases: ``{"columns": [...], "rows": [...]}``."""
    rows: dict[str, dict[str, Any]] = {}
    columns = list(COLUMNS)
    for case in cases:
        label = conversion_label(case)
        if case.get("converter"):  # two converters of one conversion are two rows
            label += f" ({case['converter']})"
        row = rows.setdefault(label, {"conversion": label, "verdict": "skip", "cases": 0, "cells": {},
                                      "counts": {}})
        verdict = case.get("verdict", "error")
        row["cases"] += 1
        row["counts"][verdict] = row["counts"].get(verdict, 0) + 1
        if _VERDICT_RANK.get(verdict, 3) > _VERDICT_RANK.get(row["verdict"], 3):
            row["verdict"] = verdict
        for conv, (state, why) in case_cells(case).items():
            if conv not in columns:
                columns.append(conv)
            old = row["cells"].get(conv)
            if old is None or _RANK[state] > _RANK[old["state"]]:
                where = f"{case.get('source_backend')}→{case.get('target_backend')} {case.get('dtype')}"
                row["cells"][conv] = {"state": state, "detail": f"{why} ({where})"}
    for row in rows.values():
        for conv in columns:
            row["cells"].setdefault(conv, {"state": "n/a", "detail": "no check touches this convention"})
        row["cells"] = {conv: row["cells"][conv] for conv in columns}
    return {"columns": columns, "rows": list(rows.values())}
