"""The :class:`Exploration` result: the mapping, its code, the named conventions, the check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from equivcheck.exploration.check import Verification
from equivcheck.exploration.conventions import ConventionRow
from equivcheck.exploration.probe import Probed
from equivcheck.mapping import Mapping

__all__ = ["Exploration", "SideReport"]

LANGS = ("numpy", "torch", "einops")


def _codes(m: Mapping | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lang in LANGS:
        try:
            out[lang] = None if m is None else m.code(lang)
        except Exception:  # einops cannot express an irregular reshape
            out[lang] = None
    return out


@dataclass(frozen=True)
class SideReport:
    """What was learnt about one side."""

    role: str
    probed: Probed
    presets: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        p, s = self.probed, self.probed.side
        return {
            "layer": s.label,
            "kind": s.kind,
            "kernel_shape": list(s.kernel_shape),
            "canonical_shape": list(s.canonical_shape),
            "geometry": s.geometry.describe(),
            "data_format": s.data_format,
            "dtype": s.dtype,
            "probe": p.strategy,
            "forward_calls": p.calls,
            "bias": p.bias,
            "canonical": None if p.canonical is None else p.canonical.code("numpy"),
            "presets": list(self.presets),
            "failure": p.failure,
        }

    def line(self) -> str:
        p, s = self.probed, self.probed.side
        shape = "×".join(str(d) for d in s.kernel_shape)
        text = (
            f"{self.role:<7} {s.label}: {s.kind} kernel {shape}, {s.data_format}, "
            f"probed in {s.dtype} with {p.calls} call{'s' * (p.calls != 1)} ({p.strategy})"
        )
        if p.failure:
            text += f"\n        not a rearranged linear layer: {p.failure}"
        return text


@dataclass
class Exploration:
    """Result of :func:`equivcheck.explore`."""

    found: bool
    reason: str
    source: SideReport
    target: SideReport
    mapping: Mapping | None
    conventions: list[ConventionRow]
    combinations: int  # named convention combinations checked (both sides)
    combinations_holding: int
    verification: Verification | None
    nearest: dict[str, Any] | None
    forward_calls: int
    seconds: float  # wall time, leaving out framework imports
    bias: str = ""
    notes: list[str] = field(default_factory=list)
    imports: dict[str, float] = field(default_factory=dict)  # backend -> seconds its first import took here

    @property
    def code(self) -> dict[str, str | None]:
        return _codes(self.mapping)

    def holding(self, side: str | None = None) -> list[ConventionRow]:
        return [r for r in self.conventions if r.status == "holds" and (side is None or r.side == side)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "reason": self.reason,
            "mapping": None if self.mapping is None else self.mapping.to_dict(),
            "code": self.code,
            "bias": self.bias,
            "conventions": [r.to_dict() for r in self.conventions],
            "named_combinations": {"checked": self.combinations, "holding": self.combinations_holding},
            "verification": None if self.verification is None else self.verification.to_dict(),
            "nearest": self.nearest,
            "forward_calls": self.forward_calls,
            "seconds": round(self.seconds, 4),
            "import_seconds": {name: round(s, 4) for name, s in self.imports.items()},
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "notes": list(self.notes),
        }

    # -- human output ------------------------------------------------------------------------
    def render(self) -> str:
        out = [self.source.line(), self.target.line(), ""]
        if self.found and self.mapping is not None:
            out.append("mapping found (source kernel → target kernel):")
            for lang, code in self.code.items():
                if code is not None:
                    out.append(f"  {lang:<7} {code}")
            out.append(f"  {'bias':<7} {self.bias}")
        else:
            out.append(f"no mapping: {self.reason}")
            if self.mapping is not None:
                out.append(f"  probed mapping (does not verify): {self.mapping.code('numpy')}")
            if self.nearest:
                near = self.nearest
                err = near.get("relative_error")
                err_text = "n/a" if err is None else f"{err:.3g}"
                out.append(f"  nearest named convention: {near['description']}")
                if near.get("code"):
                    out.append(f"    as code: {near['code']}")
                if near.get("code") or err is not None:
                    scale = near.get("scale")
                    out.append(f"    relative error on random data: {err_text}"
                               + (f" (the output is {scale:.4g} × the expected one)" if scale is not None else ""))
        out.append("")
        out.append(
            f"conventions (derived from the probed mappings; {self.combinations} named combinations checked, "
            f"{self.combinations_holding} hold):"
        )
        out.extend(self._convention_lines())
        for rep in (self.source, self.target):
            if rep.presets:
                out.append(f"  {rep.role:<7} {'presets':<19} {', '.join(rep.presets)}")
        if self.verification is not None:
            out.append("")
            out.append(f"verification on random data at the real shape: {self.verification.summary()}")
        out.append("")
        out.append(
            f"forward calls: {self.forward_calls} (source probe {self.source.probed.calls}, "
            f"target probe {self.target.probed.calls}, checks {self.forward_calls - self.source.probed.calls - self.target.probed.calls})"
            f" in {self.seconds:.2f} s{self._import_note()}"
        )
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    def _import_note(self) -> str:
        slow = {name: s for name, s in self.imports.items() if s >= 0.01}
        if not slow:
            return ""
        return f" (+{sum(slow.values()):.2f} s importing {', '.join(slow)})"

    def _convention_lines(self) -> list[str]:
        lines = []
        groups: dict[tuple[str, str], list[ConventionRow]] = {}
        for r in self.conventions:
            groups.setdefault((r.side, r.convention), []).append(r)
        for (side, name), rows in groups.items():
            holds = [r.value for r in rows if r.status == "holds"]
            amb = [r.value for r in rows if r.status == "ambiguous"]
            fails = [r.value for r in rows if r.status == "fails"]
            declared = " (declared)" if rows[0].basis == "declared" else ""
            if holds:
                shown, status = ", ".join(holds), "holds" + declared
            elif amb:
                shown, status = " / ".join(amb), "ambiguous on this shape"
            else:
                shown, status = "—", "no value holds"
            tail = ""
            if fails and (holds or amb):
                tail = f"  ({', '.join(fails)} fail)" if len(fails) <= 5 else f"  ({len(fails)} others fail)"
            lines.append(f"  {side:<7} {name:<19} {shown:<15} {status}{tail}")
        return lines
