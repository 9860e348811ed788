"""Terminal rendering of verification cases (rich when the terminal supports it)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from equivcheck.verification import Case

_STYLE = {"pass": "green", "fail": "red", "inconclusive": "yellow", "skip": "dim", "error": "red"}


def case_rows(cases: Sequence[Case]) -> list[list[str]]:
    rows = []
    for c in cases:
        comp = c.comparison
        rows.append([
            f"{c.source_backend} → {c.target_backend}",
            c.dtype,
            "-" if comp is None else f"{comp.max_abs_error:.3g}",
            "-" if comp is None else f"{comp.bound_at_worst:.3g}",
            "-" if comp is None else f"{comp.max_error_ratio:.3f}",
            f"{sum(m.outcome == 'rejected' for m in c.mutations)}/{len(c.mutations)}",
            c.verdict,
            "; ".join(x for x in (c.reason, *c.notes) if x),
        ])
    return rows


def print_cases(cases: Sequence[Case]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not cases:
        print("no cases")
        return
    table = Table(title=cases[0].title())
    for col in ("backends", "dtype", "max |err|", "bound", "err/bound", "mutants rejected", "verdict", "note"):
        table.add_column(col)
    for c, row in zip(cases, case_rows(cases)):
        row[6] = f"[{_STYLE.get(c.verdict, '')}]{row[6]}[/]"
        table.add_row(*row)
    # Full width when not a terminal (CI logs): rich would squeeze the columns to 80.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
