"""What a whole-model check found: one row per paired layer, the first divergence, the rest."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from equivcheck.compare import Comparison

__all__ = ["LayerRow", "ModelCheck", "Unpaired"]


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


@dataclass
class LayerRow:
    """One source layer and its converted partner."""

    source: str
    converted: str
    kind: str  # "dense", "conv", "dense → conv"...
    dtype: str
    verdict: str  # "pass" | "fail" | "inconclusive"
    comparison: Comparison | None = None
    boundary: str = ""  # how the converted layer's input relates to the source's
    boundary_ok: bool = True
    diagnosis: str = ""  # "wrong flatten order: the kernel reads..." (failing pairs)
    mistake: str = ""  # the short name of the mistake
    mapping: str = ""  # the right mapping of the source kernel, as numpy code
    notes: list[str] = field(default_factory=list)
    source_spec: dict[str, Any] | None = None  # the two layers as specs (serialize.spec_to_dict), for the report
    converted_spec: dict[str, Any] | None = None
    readout: dict[str, Any] | None = None  # a failing pair: where its kernel's weights come from (report picture)
    position: tuple[int, int] = field(default=(-1, -1), repr=False)  # (source, converted) place in execution order

    @property
    def max_error(self) -> float | None:
        return None if self.comparison is None else self.comparison.max_abs_error

    @property
    def ratio(self) -> float | None:
        return None if self.comparison is None else self.comparison.max_error_ratio

    @property
    def label(self) -> str:
        return f"{self.source} ↔ {self.converted}"

    def settle_input(self, failed_before: bool) -> bool:
        """A right layer fed a different input than its partner's: settle the row (True), else leave it (False).

        After an earlier failure the difference is expected (the row passes, with a note); before
        one it is the converted graph's mistake, not the layer's.
        """
        if self.boundary_ok:
            return False
        if failed_before:
            self.verdict = "pass"
            self.notes.append(f"input differs from the source's after an earlier failure: {self.boundary}")
            return True
        self.verdict, self.mistake = "fail", "graph"
        self.diagnosis = (f"the converted graph feeds {self.converted} a different input than the source feeds "
                          f"{self.source}: {self.boundary}; the layer itself is right on the source's input")
        return True

    def headline(self) -> str:
        """``"features.fc1 ↔ fc1: wrong flatten order (...); right mapping w.reshape(...)"``."""
        what = self.diagnosis or "; ".join(self.notes[:1]) or (self.comparison.summary() if self.comparison else self.verdict)
        text = f"{self.label}: {what}"
        if not self.mapping or self.verdict != "fail" or self.mistake in ("graph", "input shape", "replay"):
            return text  # the kernel is not what is wrong: no mapping to offer
        return f"{text}; right mapping {self.mapping}" if self.mapping != "w" else f"{text}; right mapping: the kernel as is (w)"

    def to_dict(self) -> dict[str, Any]:
        comp = self.comparison
        return {
            "source": self.source, "converted": self.converted, "kind": self.kind, "dtype": self.dtype,
            "verdict": self.verdict,
            "max_abs_error": None if comp is None else _finite(comp.max_abs_error),
            "bound_at_worst": None if comp is None else _finite(comp.bound_at_worst),
            "max_error_ratio": None if comp is None else _finite(comp.max_error_ratio),
            "comparison": None if comp is None else comp.to_dict(),
            "boundary": self.boundary, "boundary_ok": self.boundary_ok,
            "mistake": self.mistake, "diagnosis": self.diagnosis, "mapping": self.mapping, "notes": list(self.notes),
            **{k: v for k, v in (("source_spec", self.source_spec), ("converted_spec", self.converted_spec),
                                 ("readout", self.readout)) if v is not None},
        }


NO_PARTNER = "no partner of the same kind and weight count"


@dataclass(frozen=True)
class Unpaired:
    """A layer with parameters that was not checked: no partner, or a kind no pairing rule covers."""

    model: str  # "source" | "converted"
    name: str
    kind: str
    weights: int
    why: str = NO_PARTNER
    after: int = field(default=-1, compare=False)  # how many of its model's checked layers ran before it (-1: unknown)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "name": self.name, "kind": self.kind, "weights": self.weights, "why": self.why}

    def __str__(self) -> str:
        return f"{self.model} {self.name} ({self.kind}, {self.weights} weights: {self.why})"


@dataclass
class ModelCheck:
    """The result of :func:`equivcheck.check_models`."""

    source: str  # "torch VGG" ...
    converted: str
    verdict: str  # "pass" | "fail" | "inconclusive"
    reason: str = ""
    layers: list[LayerRow] = field(default_factory=list)
    unpaired: list[Unpaired] = field(default_factory=list)
    end_to_end: dict[str, Any] = field(default_factory=dict)  # per dtype: max errors and whether they pass
    input_shape: tuple[int, ...] = ()
    dtypes: tuple[str, ...] = ("float32",)
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    likely_cause: str = ""  # an unchecked layer the first divergence (or the final outputs' difference) points to
    _models: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # what was checked, for repair()

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def repair(self) -> Any:
        """The converted model repaired and checked again: see :func:`equivcheck.modelcheck.repair.repair`."""
        from equivcheck.modelcheck.repair import repair

        return repair(self, **self._models)

    def patch(self) -> Any:
        """The fix of each failing layer for the converter: see :func:`equivcheck.modelcheck.repair.patch`."""
        from equivcheck.modelcheck.repair import patch

        return patch(self, self._models.get("source"), self._models.get("converted"))

    @property
    def unchecked(self) -> list[Unpaired]:
        """Every layer with parameters, of either model, that no checked pair covers (``unpaired`` and kinds no rule pairs)."""
        return list(self.unpaired)

    @property
    def first_divergence(self) -> LayerRow | None:
        """The first failing pair in the source's execution order, or None."""
        return next((row for row in self.layers if row.verdict == "fail"), None)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "schema": "equivcheck.modelcheck/1",
            "source": self.source, "converted": self.converted, "verdict": self.verdict, "reason": self.reason,
            "input_shape": list(self.input_shape), "dtypes": list(self.dtypes), "seed": self.seed,
            "first_divergence": None if first is None else {"source": first.source, "converted": first.converted,
                                                             "headline": first.headline()},
            "layers": [row.to_dict() for row in self.layers],
            "unpaired": [u.to_dict() for u in self.unpaired],
            "unchecked": [u.to_dict() for u in self.unchecked], "likely_cause": self.likely_cause,
            "end_to_end": {k: {kk: _finite(vv) for kk, vv in v.items()} for k, v in self.end_to_end.items()},
            "notes": list(self.notes),
        }

    def render(self, *, markdown: bool = False) -> str:
        """The layer table, the first divergence and what did not pair, as plain text (or Markdown)."""
        first = self.first_divergence
        head = ("source", "converted", "kind", "dtype", "verdict", "max |err|", "err/bound", "input", "diagnosis")
        rows = []
        for row in self.layers:
            comp = row.comparison
            mark = "→ " if row is first else ""
            rows.append((mark + row.source, row.converted, row.kind, row.dtype, row.verdict,
                         "-" if comp is None else f"{comp.max_abs_error:.3g}",
                         "-" if comp is None else f"{comp.max_error_ratio:.3g}", row.boundary,
                         row.diagnosis or "; ".join(row.notes)))
        title = f"{self.source} → {self.converted}: {self.verdict}"
        lines = [f"## {title}" if markdown else title]
        if markdown:
            lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            lines.append("")
        else:
            widths = [min(48, max(len(str(c)) for c in col)) for col in zip(head, *rows)]
            for r in (head, *rows):
                cells = [str(c) for c in r]
                lines.append("  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths[:-1])) + "  " + cells[-1])
        if first is not None:
            lines.append(f"first divergence: {first.headline()}")
            if self.likely_cause:
                lines.append(f"likely cause: {self.likely_cause}")
        elif self.reason:
            lines.append(self.reason)
        for dtype, e2e in self.end_to_end.items():
            lines.append(f"end to end ({dtype}): max |err| {e2e['max_abs_error']:.3g}, relative "
                         f"{e2e['max_rel_error']:.3g} (tolerance {e2e['tolerance']:.3g}) — {'ok' if e2e['passed'] else 'differs'}")
        if self.unchecked:
            lines.append("unchecked: " + "; ".join(str(u) for u in self.unchecked))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        """One line: the verdict and its reason (the first divergence, or what was not checked)."""
        reason = " ".join(self.reason.split())
        if len(reason) > 240:
            reason = reason[:237] + "..."
        return f"<ModelCheck {self.source} → {self.converted}: {self.verdict}{': ' + reason if reason else ''}>"
