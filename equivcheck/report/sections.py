"""The report's extra sections as neutral blocks, which :mod:`markdown` and :mod:`html` each render.

A block is a tuple: ``("heading", text, verdict)``, ``("para", text)``, ``("lead", label, text)``
(a paragraph led by a bold label), ``("items", [(label,
value), ...])``, ``("table", header, rows, marked_rows)``, ``("code", label, text)`` or
``("figures", [picture ids])``. Text is plain (each renderer escapes it).
"""

from __future__ import annotations

from typing import Any

from equivcheck.report.describe import section_kind, shape

__all__ = ["Block", "blocks", "fmt", "generic_table"]

Block = tuple


def fmt(value: Any) -> str:
    """A number in 3 significant digits, anything else as text; ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def generic_table(value: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns of a list of objects, without columns empty on every row nor an ``index`` that never changes."""
    keys: list[str] = []
    for v in value:
        keys += [k for k in v if k not in keys]
    keys = [k for k in keys if not all(_empty(v.get(k)) for v in value)]
    if "index" in keys and len({str(v.get("index")) for v in value}) == 1:
        keys.remove("index")
    keys = keys[:12]
    return keys, [[_joined(v.get(k)) for k in keys] for v in value]


def _joined(value: Any) -> Any:
    """A list of strings (notes) as one line; anything else as it is."""
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "; ".join(value)
    return value


def blocks(name: str, value: Any) -> list[Block] | None:
    """The blocks of a known section (explorations, verify-model results, model checks), else ``None``."""
    kind = section_kind(value)
    if kind == "explorations":
        return [b for item in value for b in _exploration(item)]
    if kind == "models":
        return [b for item in value for b in _model_verification(item)]
    if kind == "modelchecks":
        return [b for item in value for b in _model_check(item)]
    return None


# -- explore ------------------------------------------------------------------------------
def _side_row(role: str, side: dict[str, Any]) -> list[Any]:
    return [role, side.get("layer"), side.get("kind"), shape(side.get("kernel_shape")), side.get("data_format"),
            side.get("dtype"), side.get("geometry")]


def _exploration(e: dict[str, Any]) -> list[Block]:
    s, t = e.get("source") or {}, e.get("target") or {}
    found = e.get("found") is True
    out: list[Block] = [("heading", f"{s.get('layer')} → {t.get('layer')}: {'mapping found' if found else 'no mapping found'}",
                         "pass" if found else "fail")]
    out.append(("table", ["side", "layer", "kind", "kernel shape", "data format", "probed in", "geometry"],
                [_side_row("source", s), _side_row("target", t)], set()))
    if not found:
        out.append(("para", f"Why not: {e.get('reason') or 'no rearrangement of the source kernel reproduces the target'}"))
        for role, side in (("source", s), ("target", t)):
            if side.get("failure"):
                out.append(("para", f"The {role} is not a rearranged linear layer: {side['failure']}"))
        if e.get("nearest"):
            out.append(("para", f"Nearest named convention: {fmt(e['nearest'])}"))
    for lang, code in (e.get("code") or {}).items():
        if code:
            out.append(("code", f"{lang}: source kernel → target kernel", str(code)))
    items = []
    if e.get("bias"):
        items.append(("bias", str(e["bias"])))
    v = e.get("verification")
    if isinstance(v, dict):
        items.append(("verified on new inputs", f"{'passed' if v.get('passed') else 'failed'}, relative error "
                                                f"{fmt(v.get('relative_error'))}"))
    combos = e.get("named_combinations") or {}
    if combos:
        items.append(("named convention combinations", f"{fmt(combos.get('holding'))} of {fmt(combos.get('checked'))} hold"))
    if e.get("forward_calls") is not None:
        items.append(("forward calls", fmt(e["forward_calls"])))
    notes = [str(n) for n in e.get("notes") or [] if str(n).strip()]
    if notes:
        items.append(("notes", "; ".join(notes)))
    if items:
        out.append(("items", items))
    conventions = [c for c in e.get("conventions") or [] if isinstance(c, dict)]
    if conventions:
        out.append(("para", "Conventions each side follows, as probed:"))
        rows = [[c.get("side"), c.get("convention"), c.get("value"), c.get("status"), c.get("basis")] for c in conventions]
        marked = {i for i, c in enumerate(conventions) if c.get("holds")}
        out.append(("table", ["side", "convention", "value", "status", "basis"], rows, marked))
    return out


# -- verify-model -------------------------------------------------------------------------
def _positions(positions: Any) -> str:
    if not positions:
        return "-"
    text = " ".join("(" + ", ".join(str(i) for i in p) + ")" for p in positions[:8])
    return text + (f" … ({len(positions)} in all)" if len(positions) > 8 else "")


def _model_verification(m: dict[str, Any]) -> list[Block]:
    out: list[Block] = [("heading", f"{m.get('framework')} model {m.get('model')} ({m.get('dtype')})",
                         m.get("verdict"))]
    out.append(("items", [("input", shape(m.get("input_shape"))), ("larger input", shape(m.get("larger_shape"))),
                          ("total stride", shape(m.get("total_stride"))),
                          ("output positions", shape(m.get("output_positions")))]))
    rows = []
    for c in m.get("checks") or []:
        comp = c.get("comparison") or {}
        size = m.get("input_shape") if c.get("name") in ("training size", "mutants") else m.get("larger_shape")
        rows.append([c.get("name"), shape(size), _positions(c.get("positions")), fmt(comp.get("max_abs_error")),
                     fmt(comp.get("bound_at_worst")), fmt(comp.get("max_error_ratio")), c.get("verdict"), c.get("detail")])
    marked = {i for i, c in enumerate(m.get("checks") or []) if c.get("verdict") == "fail"}
    out.append(("table", ["check", "input", "output positions", "max |err|", "bound at worst", "err/bound", "verdict",
                          "detail"], rows, marked))
    layers = [x for x in m.get("layers") or [] if isinstance(x, dict)]
    if layers:
        out.append(("para", "Dense layers made convolutions:"))
        out.append(("table", ["layer", "dense", "conv", "kernel", "mapping", "activation"],
                    [[x.get("layer"), x.get("dense"), x.get("conv"),
                      " → ".join(shape(k) for k in x.get("kernel") or []), x.get("numpy"), x.get("activation")]
                     for x in layers], set()))
    return out


# -- check-models -------------------------------------------------------------------------
MODEL_COLUMNS = ("source", "converted", "kind", "dtype", "verdict", "err/bound", "input", "diagnosis", "right mapping")


def is_first(check: dict[str, Any], layer: dict[str, Any]) -> bool:
    first = check.get("first_divergence") or {}
    return bool(first) and (layer.get("source"), layer.get("converted")) == (first.get("source"), first.get("converted"))


def _model_check(check: dict[str, Any]) -> list[Block]:
    out: list[Block] = [("heading", f"{check.get('source')} → {check.get('converted')}",
                         check.get("verdict"))]
    items = [("input", shape(check.get("input_shape"))), ("dtypes", ", ".join(map(str, check.get("dtypes") or [])))]
    for dtype, e2e in (check.get("end_to_end") or {}).items():
        if isinstance(e2e, dict):
            items.append((f"final outputs ({dtype})", f"{'pass' if e2e.get('passed') else 'fail'}: max |err| "
                          f"{fmt(e2e.get('max_abs_error'))}, relative {fmt(e2e.get('max_rel_error'))} "
                          f"(tolerance {fmt(e2e.get('tolerance'))})"))
    first = check.get("first_divergence")
    if first:
        out.append(("lead", "First wrong layer", str(first.get("headline"))))
    elif check.get("reason"):
        out.append(("lead", "Reason", str(check["reason"])))
    notes = [str(n) for n in check.get("notes") or [] if str(n).strip()]
    if notes:
        items.append(("notes", "; ".join(notes)))
    out.append(("items", items))
    layers = [x for x in check.get("layers") or [] if isinstance(x, dict)]
    rows, marked = [], set()
    for i, x in enumerate(layers):
        if is_first(check, x):
            marked.add(i)
        what = x.get("diagnosis") or "; ".join(str(n) for n in x.get("notes") or [])
        rows.append([("→ " if i in marked else "") + str(x.get("source")), x.get("converted"), x.get("kind"),
                     x.get("dtype"), x.get("verdict"), fmt(x.get("max_error_ratio")), x.get("boundary"), what,
                     x.get("mapping") if x.get("verdict") != "pass" else ""])
    out.append(("table", list(MODEL_COLUMNS), rows, marked))
    unpaired = [u for u in check.get("unpaired") or [] if isinstance(u, dict)]
    if unpaired:
        out.append(("para", "Layers without a partner:"))
        out.append(("table", ["model", "layer", "kind", "weights"],
                    [[u.get("model"), u.get("name"), u.get("kind"), u.get("weights")] for u in unpaired], set()))
    if check.get("pictures"):
        out.append(("figures", [str(p) for p in check["pictures"]]))
    return out
