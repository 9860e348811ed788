"""``equivcheck.md``: the report as Markdown (also appended to ``$GITHUB_STEP_SUMMARY``)."""

from __future__ import annotations

import html
import json
from typing import Any

from equivcheck.report.environment import environment_line, facts_rows

__all__ = ["fmt", "percent", "render"]

MARK = {"holds": "✅ holds", "fails": "❌ fails", "ambiguous": "⚠️ ambiguous", "n/a": "·"}
VERDICT_MARK = {"pass": "✅ pass", "fail": "❌ fail", "inconclusive": "⚠️ inconclusive", "skip": "⏭ skip", "error": "💥 error"}
PROBLEMS = ("fail", "error", "inconclusive")


def fmt(value: Any) -> str:
    """A number in 3 significant digits, anything else as text; ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def percent(value: Any) -> str:
    """A fraction as a percentage (``-`` when missing)."""
    return "-" if value is None else f"{100 * value:.3g}%"


def md(value: Any) -> str:
    """A value as inline Markdown text: no raw HTML (``<``, ``>``, ``&`` escaped), one line."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return html.escape(text, quote=False).replace("\n", " ")


def cell(value: Any) -> str:
    text = md(value).replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "…"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def counts_line(summary: dict[str, Any]) -> str:
    verdicts = ", ".join(f"{md(n)} {md(v)}" for v, n in summary["verdicts"].items() if n)
    mutations = ", ".join(f"{md(n)} {md(o)}" for o, n in summary["mutations"].items() if n)
    line = f"{md(summary['cases'])} cases: {verdicts or 'none'}"
    return line + (f"; wrong conversions tried: {mutations}" if mutations else "")


def backends(case: dict[str, Any]) -> str:
    return f"{case.get('source_backend')} → {case.get('target_backend')}"


MODEL_SCHEMA = "equivcheck.modelcheck/1"
MODEL_COLUMNS = ("source", "converted", "kind", "dtype", "verdict", "max_error_ratio", "diagnosis", "mapping")


def is_model_checks(value: Any) -> bool:
    """A report section of whole-model checks (:meth:`equivcheck.modelcheck.ModelCheck.to_dict`)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and v.get("schema") == MODEL_SCHEMA for v in value)


def model_rows(check: dict[str, Any]) -> list[tuple[bool, list[Any]]]:
    """``(is the first divergence, cells)`` for each paired layer of one model check."""
    first = check.get("first_divergence") or {}
    rows = []
    for layer in check.get("layers") or []:
        is_first = bool(first) and (layer.get("source"), layer.get("converted")) == (first.get("source"), first.get("converted"))
        rows.append((is_first, [layer.get(k) if k != "max_error_ratio" else fmt(layer.get(k)) for k in MODEL_COLUMNS]))
    return rows


def _model_sections(name: str, checks: list[dict[str, Any]]) -> list[str]:
    out = [f"## {md(name.replace('_', ' ').capitalize())}", ""]
    for check in checks:
        out += [f"### {md(check.get('source'))} → {md(check.get('converted'))}: {md(check.get('verdict'))}", ""]
        first = check.get("first_divergence")
        if first:
            out += [f"**First wrong layer:** {md(first.get('headline'))}", ""]
        rows = [[("→ " if is_first else "") + str(cells[0]), *cells[1:]] for is_first, cells in model_rows(check)]
        out += _table(list(MODEL_COLUMNS), rows)
        if check.get("unpaired"):
            out += ["", f"Unpaired: {md(check['unpaired'])}"]
        out.append("")
    return out


def extra_section(name: str, value: Any) -> list[str]:
    """Any JSON value as Markdown: a list of objects as a table, an object as key/value rows."""
    if is_model_checks(value):
        return _model_sections(name, value)
    out = [f"## {name.replace('_', ' ').capitalize()}", ""]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys: list[str] = []
        for v in value:
            keys += [k for k in v if k not in keys]
        keys = keys[:12]
        out += _table(keys, [[fmt(v.get(k)) if not isinstance(v.get(k), (dict, list)) else v.get(k) for k in keys]
                             for v in value])
    elif isinstance(value, dict):
        out += _table(["key", "value"], [[k, fmt(v) if not isinstance(v, (dict, list)) else v] for k, v in value.items()])
    elif isinstance(value, list):
        out += [f"- {cell(v)}" for v in value] or ["(empty)"]
    else:
        out.append(cell(value))
    return [*out, ""]


def render(doc: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    run, summary = doc["run"], doc["summary"]
    out = [
        "# equivcheck report",
        "",
        f"Run `{md(run['run_id'])}` · {md(run['created'])}" + (f" · `{md(run['command'])}`" if run.get("command") else "")
        + (f" · seed {run['seed']}" if run.get("seed") is not None else ""),
        "",
        f"Environment: {md(environment_line(doc['environment']))}",
        "",
        f"**{'OK' if summary['ok'] else 'PROBLEMS'}** — {counts_line(summary)}",
        "",
        "## Conventions",
        "",
    ]
    conv = doc["conventions"]
    if conv["rows"]:
        rows = [[r["conversion"], VERDICT_MARK.get(r["verdict"], r["verdict"]), r["cases"],
                 *(MARK[r["cells"][c]["state"]] for c in conv["columns"])] for r in conv["rows"]]
        out += _table(["conversion", "verdict", "cases", *conv["columns"]], rows)
        out += ["", "✅ holds: every wrong conversion breaking it was rejected · ❌ fails · "
                "⚠️ ambiguous: a wrong conversion could not be told apart on this data · · not checked", ""]
    else:
        out += ["No cases.", ""]
    problems = [c for c in doc["cases"] if c.get("verdict") in PROBLEMS]
    if problems:
        out += ["## Failures", ""]
        for c in problems:
            out += _problem(c)
    if doc["cases"]:
        out += ["## Cases", ""]
        rows = []
        for i, c in enumerate(doc["cases"]):
            comp = c.get("comparison") or {}
            muts = c.get("mutations") or []
            rows.append([i, c.get("title"), backends(c), c.get("dtype"), VERDICT_MARK.get(c["verdict"], c["verdict"]),
                         fmt(comp.get("max_abs_error")), fmt(comp.get("bound_at_worst")), fmt(comp.get("max_error_ratio")),
                         f"{sum(m.get('outcome') == 'rejected' for m in muts)}/{len(muts)}"])
        out += _table(["#", "conversion", "backends", "dtype", "verdict", "max abs err", "bound", "err/bound",
                       "mutants rejected"], rows)
        out.append("")
    for name, value in (doc.get("extra") or {}).items():
        out += extra_section(name, value)
    facts = facts_rows(doc["environment"])
    if facts:
        out += ["## Machine facts (probed here)", "", *_table(["backend", "layer", "dtype", "found"], facts), ""]
    return "\n".join(out).rstrip() + "\n"


def _problem(c: dict[str, Any]) -> list[str]:
    comp = c.get("comparison") or {}
    out = [f"### {md(c.get('title'))} — {md(backends(c))}, {md(c.get('dtype'))}: {md(c['verdict'])}", ""]
    if c.get("reason"):
        out.append(f"- reason: {md(c['reason'])}")
    if comp:
        out.append(f"- worst element {comp.get('worst_index')}: |error| {fmt(comp.get('max_abs_error'))}, "
                   f"bound {fmt(comp.get('bound_at_worst'))}, error/bound {fmt(comp.get('max_error_ratio'))}, "
                   f"relative {fmt(comp.get('max_rel_error'))}, {percent(comp.get('fraction_out_of_bound'))} of outputs out of bound")
    diagnosis = c.get("diagnosis")
    if diagnosis:
        out.append(f"- looks like: **{md(diagnosis['mutant'])}** ({md(diagnosis['description'])}); "
                   f"convention: {md(diagnosis['convention'])}")
    missed = [m["name"] for m in c.get("mutations") or [] if m.get("outcome") == "not rejected"]
    if missed:
        out.append(f"- wrong conversions that also pass: {md(', '.join(map(str, missed)))}")
    mapping = c.get("mapping")
    if mapping:
        code = md(mapping["code"]["numpy"]).replace("`", "'")
        out.append(f"- right mapping: `{code}`")
    return [*out, ""]
