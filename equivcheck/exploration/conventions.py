"""Name a probed mapping in terms of the conventions frameworks use — derived, not re-run.

For each side, every combination of named conventions (a dense side: 6 flatten orders × 2
kernel orientations in 2-D; a conv side: 24 kernel layouts × 4 flips in 2-D, plus 24
depthwise layouts when it is depthwise) is a candidate stored → canonical mapping, built with
the planner. A candidate *holds* when it moves every weight where the probed mapping does;
that is decided from the mappings alone (their indices on the axis lines through the
origin), without a single forward call. A convention value then holds when every holding
candidate has it, is ambiguous when some do and some do not (a flip of a 1-wide axis, a
flatten order on a 1×1 map), and fails when none does.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from equivcheck.errors import EquivcheckError
from equivcheck.exploration.atoms import signature
from equivcheck.exploration.sides import Side
from equivcheck.mapping import Mapping
from equivcheck.planning import canonical
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, DenseSpec

__all__ = ["Candidate", "ConventionRow", "candidates", "convention_rows", "matching_presets"]


@dataclass(frozen=True)
class Candidate:
    """One combination of named conventions for a side, as its stored → canonical mapping."""

    values: tuple[tuple[str, str], ...]  # (convention, value) pairs
    mapping: Mapping | None  # None: the combination does not fit the stored kernel's shape

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.values)


@dataclass(frozen=True)
class ConventionRow:
    side: str
    convention: str
    value: str
    status: str  # "holds" | "fails" | "ambiguous"
    basis: str = "probed"  # or "declared": read from the layer, not from its responses

    @property
    def holds(self) -> bool | None:
        return {"holds": True, "fails": False}.get(self.status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": f"{self.side} {self.convention} = {self.value}",
            "side": self.side,
            "convention": self.convention,
            "value": self.value,
            "status": self.status,
            "holds": self.holds,
            "basis": self.basis,
        }


def _fit(m: Mapping, side: Side) -> Mapping | None:
    if m.in_shape != side.kernel_shape:
        return None
    return m if m.out_shape == side.canonical_shape else m.reshape(*side.canonical_shape)


def candidates(side: Side) -> list[Candidate]:
    """Every named-convention combination for this side's kind of layer."""
    g = side.geometry
    out: list[Candidate] = []
    if side.kind == "dense":
        spatial = () if side.rank0 else g.spatial
        letters = "C" + "DHW"[3 - len(spatial):] if spatial else "C"
        for order in itertools.permutations(letters):
            for orient in ("IO", "OI"):
                spec = DenseSpec(g.in_channels, spatial, g.out_channels, flatten="".join(order), kernel_layout=orient)
                values = (("flatten order", "".join(order)), ("kernel orientation", orient))
                out.append(Candidate(values, _fit(canonical(spec), side)))
        return out
    letters = g.letters
    families = ["OI"]
    if not g.transposed and g.groups == g.in_channels and g.out_channels % g.in_channels == 0:
        families.append("IM")
    flips = list(itertools.product((False, True), repeat=g.rank))
    for family in families:
        for layout in itertools.permutations(family + letters):
            layout_s = "".join(layout)
            try:
                base = canonical(g.replace(kernel_layout=layout_s))
            except EquivcheckError:
                continue
            for flip in flips:
                flip_values = ((f"flip {a}", "yes" if f else "no") for a, f in zip(letters, flip))
                values = (("kernel layout", layout_s), *flip_values)
                axes = [2 + i for i, f in enumerate(flip) if f]
                m = base.flip(*axes) if axes else base
                out.append(Candidate(values, _fit(m, side)))
    return out


def holding(side: Side, found: Mapping, cands: list[Candidate]) -> list[bool]:
    target = signature(found)
    return [c.mapping is not None and signature(c.mapping) == target for c in cands]


def convention_rows(role: str, side: Side, cands: list[Candidate], holds: list[bool]) -> list[ConventionRow]:
    """One row per (convention, value): holds / fails / ambiguous, plus the declared data format."""
    rows: list[ConventionRow] = []
    names = [k for k, _ in cands[0].values] if cands else []
    held = [c for c, h in zip(cands, holds) if h]
    for i, name in enumerate(names):
        values = list(dict.fromkeys(c.values[i][1] for c in cands))
        held_values = {c.values[i][1] for c in held}
        for v in values:
            if v not in held_values:
                status = "fails"
            else:
                status = "holds" if held_values == {v} else "ambiguous"
            rows.append(ConventionRow(role, name, v, status))
    rows.extend(data_format_rows(role, side))
    return rows


def data_format_rows(role: str, side: Side) -> list[ConventionRow]:
    """The map layout the side reads: declared by the layer; ambiguous when both layouts coincide."""
    g = side.geometry
    same = g.in_channels == 1 or math.prod(g.spatial) == 1
    rows = []
    for fmt in (CHANNELS_FIRST, CHANNELS_LAST):
        status = "ambiguous" if same else ("holds" if fmt == side.data_format else "fails")
        rows.append(ConventionRow(role, "data format", fmt, status, basis="declared"))
    return rows


def matching_presets(side: Side, found: Mapping) -> list[str]:
    """Presets whose layer of this shape stores its kernel the way the probe found (and reads this data format)."""
    from equivcheck.identification import as_preset, layer_kinds
    from equivcheck.presets import PRESETS

    g = side.geometry
    layer = DenseSpec(g.in_channels, () if side.rank0 else g.spatial, g.out_channels, bias=g.bias) if side.kind == "dense" else g
    target = signature(found)
    same_format = g.in_channels == 1 or math.prod(g.spatial) == 1
    out = []
    for name in PRESETS:
        for kind in layer_kinds(layer):
            spec = as_preset(layer, name, kind)
            m = None if spec is None else _fit(canonical(spec), side)
            if m is not None and signature(m) == target and (same_format or spec.data_format == side.data_format):
                out.append(name)
                break
    return out
