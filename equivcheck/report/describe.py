"""What a report is about, in words: its title, overall verdict, and each case's identity.

Everything here reads the report document alone (so ``equivcheck report X.json`` renders the
same page again) and is shared by the Markdown and the HTML renderers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MODEL_SCHEMA", "case_heading", "case_identity", "is_model_checks", "overall_verdict", "section_kind",
           "section_title", "shape", "spec_text", "subjects", "title", "verdict_of"]

MODEL_SCHEMA = "equivcheck.modelcheck/1"
_RANK = {"skip": 0, "pass": 1, "inconclusive": 2, "fail": 3, "error": 4}


def shape(dims: Any) -> str:
    """``[3, 6, 7]`` as ``3×6×7`` (``-`` when missing)."""
    if not isinstance(dims, (list, tuple)) or not dims:
        return "-"
    return "×".join(str(d) for d in dims)


def spec_text(spec: Any) -> str:
    """``keras:dense (input 6×7×3 → 2, kernel 126×2)``: a spec's name with its shapes."""
    if not isinstance(spec, dict):
        return str(spec)
    from equivcheck.report.conventions import spec_label

    name = spec_label(spec)
    from equivcheck.errors import EquivcheckError
    from equivcheck.serialize import spec_from_dict

    try:
        s = spec_from_dict(spec)
        io = f"input {shape(s.input_shape)} → {shape(s.output_shape)}"
    except (EquivcheckError, TypeError, ValueError):  # a report written elsewhere: show what it says
        io = ""
    parts = [p for p in (io, f"kernel {shape(spec.get('kernel_shape'))}" if spec.get("kernel_shape") else "") if p]
    return f"{name} ({', '.join(parts)})" if parts else name


def backends(case: dict[str, Any]) -> str:
    return f"{case.get('source_backend')} → {case.get('target_backend')}"


def case_identity(case: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` pairs that tell one case from every other: test, converter, specs, backends, dtype."""
    out = []
    if case.get("test"):
        out.append(("test", str(case["test"])))
    if case.get("converter"):
        out.append(("converter", str(case["converter"])))
    out += [("source", spec_text(case.get("source"))), ("target", spec_text(case.get("target"))),
            ("backends", backends(case)), ("dtype", str(case.get("dtype")))]
    if case.get("conventions"):
        out.append(("conventions", str(case["conventions"])))
    notes = [str(n) for n in case.get("notes") or [] if str(n).strip()]
    if notes:
        out.append(("notes", "; ".join(notes)))
    return out


def case_heading(case: dict[str, Any]) -> str:
    """A failure heading that differs between converters, tests and shapes."""
    who = " · ".join(str(case[k]) for k in ("test", "converter") if case.get(k))
    what = f"{spec_text(case.get('source'))} → {spec_text(case.get('target'))}"
    return f"{who}: {what}" if who else what


def is_model_checks(value: Any) -> bool:
    """A report section of whole-model checks (:meth:`equivcheck.modelcheck.ModelCheck.to_dict`)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and v.get("schema") == MODEL_SCHEMA for v in value)


def _is_explorations(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and "found" in v and isinstance(v.get("source"), dict) for v in value)


def _is_model_verifications(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and "checks" in v and "model" in v for v in value)


_SECTION_TITLES = {"modelchecks": "Model checks", "models": "Convolutionalized models", "explorations": "Explorations"}


def section_title(name: str, value: Any) -> str:
    """A section's heading: what it holds where known, else its key made readable."""
    return _SECTION_TITLES.get(section_kind(value), name.replace("_", " ").capitalize())


def section_kind(value: Any) -> str:
    """``"modelchecks"``, ``"explorations"``, ``"models"`` (verify-model) or ``""`` for any other section."""
    if is_model_checks(value):
        return "modelchecks"
    if _is_explorations(value):
        return "explorations"
    if _is_model_verifications(value):
        return "models"
    return ""


def section_verdicts(extra: dict[str, Any] | None) -> list[str]:
    """The verdict of every exploration, model verification and model check in ``extra``."""
    out = []
    for value in (extra or {}).values():
        kind = section_kind(value)
        for item in value if kind else ():
            if kind == "explorations":
                out.append("pass" if item.get("found") is True else "fail")
            else:
                out.append(str(item.get("verdict")) if item.get("verdict") in _RANK else "error")
    return out


def overall_verdict(doc: dict[str, Any]) -> str:
    """One verdict for the whole report: the worst of its cases and sections; ``inconclusive`` when nothing was checked."""
    stored = doc["summary"].get("verdict")
    if stored in _RANK:
        return str(stored)
    return verdict_of([c.get("verdict", "error") for c in doc.get("cases") or []], doc.get("extra"),
                      ok=doc["summary"].get("ok", True))


def verdict_of(case_verdicts: Sequence[str], extra: dict[str, Any] | None, *, ok: bool = True) -> str:
    verdicts = [v if v in _RANK else "error" for v in (*case_verdicts, *section_verdicts(extra))]
    if not verdicts:
        return "inconclusive" if ok else "fail"
    worst = max(verdicts, key=_RANK.__getitem__)
    if worst == "skip" and len(set(verdicts)) == 1:
        return "skip"
    if not ok and worst in ("pass", "skip"):
        return "fail"  # the run failed for a reason of its own (a failing test)
    return worst


def command_name(doc: dict[str, Any]) -> str:
    words = str(doc["run"].get("command") or "").split()
    if not words:
        return "run"
    return words[0] if words[0] != "python" else "example"


def subjects(doc: dict[str, Any]) -> list[str]:
    """What the report checked, one line each, with shapes: conversions, explorations, models."""
    out: list[str] = []
    for case in doc.get("cases") or []:
        line = f"{spec_text(case.get('source'))} → {spec_text(case.get('target'))}"
        if line not in out:
            out.append(line)
    for value in (doc.get("extra") or {}).values():
        kind = section_kind(value)
        for item in value if kind else ():
            if kind == "explorations":
                s, t = item["source"], item.get("target") or {}
                out.append(f"{s.get('layer')}, kernel {shape(s.get('kernel_shape'))} → "
                           f"{t.get('layer')}, kernel {shape(t.get('kernel_shape'))}")
            elif kind == "models":
                out.append(f"{item.get('framework')} model {item.get('model')} (input {shape(item.get('input_shape'))}) "
                           f"→ its convolutionalized version (input {shape(item.get('larger_shape'))})")
            else:
                out.append(f"{item.get('source')} → {item.get('converted')} (input {shape(item.get('input_shape'))})")
    return out


def title(doc: dict[str, Any]) -> str:
    """``equivcheck verify: keras:dense → torch:conv`` (names only; :func:`subjects` has the shapes)."""
    names: list[str] = []
    from equivcheck.report.conventions import conversion_label

    for case in doc.get("cases") or []:
        label = conversion_label(case)
        if label not in names:
            names.append(label)
    for value in (doc.get("extra") or {}).values():
        kind = section_kind(value)
        for item in value if kind else ():
            if kind == "explorations":
                names.append(f"{item['source'].get('layer')} → {(item.get('target') or {}).get('layer')}")
            elif kind == "models":
                names.append(f"{item.get('framework')} {item.get('model')} → convolutionalized")
            else:
                names.append(f"{item.get('source')} → {item.get('converted')}")
    what = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"equivcheck {command_name(doc)}: {what or 'nothing checked'}"
