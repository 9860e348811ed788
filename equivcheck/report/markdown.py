"""``equivcheck.md``: the report as Markdown (also appended to ``$GITHUB_STEP_SUMMARY``)."""

from __future__ import annotations

import html
import json
import re
from typing import Any

from equivcheck.report.describe import (
    backends,
    case_heading,
    case_identity,
    overall_verdict,
    section_kind,
    section_title,
    section_verdicts,
    spec_text,
    subjects,
    title,
)
from equivcheck.report.environment import environment_line, facts_rows
from equivcheck.report.sections import blocks, fmt, generic_table

__all__ = ["case_rows", "counts_line", "fmt", "percent", "render"]

MARK = {"holds": "✅ holds", "fails": "❌ fails", "ambiguous": "⚠️ ambiguous", "n/a": "·"}
VERDICT_MARK = {"pass": "✅ pass", "fail": "❌ fail", "inconclusive": "⚠️ inconclusive", "skip": "⏭ skip", "error": "💥 error"}
PROBLEMS = ("fail", "error", "inconclusive")


def percent(value: Any) -> str:
    """A fraction as a percentage (``-`` when missing)."""
    return "-" if value is None else f"{100 * value:.3g}%"


_MARKUP = re.compile(r"([\\`\[\]])")  # what could start a link, an image or a code span


def md(value: Any) -> str:
    """A value as inline Markdown text, one line: no raw HTML (``<``, ``>``, ``&`` escaped), no link,
    image or code span (``[``, ``]``, a backtick and a backslash escaped)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return _MARKUP.sub(r"\\\1", html.escape(text, quote=False)).replace("\n", " ")


def code(value: Any) -> str:
    """A value as an inline code span, fenced by more backticks than any run inside, never escaped:
    inside a span Markdown shows every character as it is (``<`` starts no tag, ``[`` no link), and
    the text before it is :func:`md`-escaped, so no tag can open before the span and run into it."""
    text = (value if isinstance(value, str) else json.dumps(value, default=str)).replace("\r", " ").replace("\n", " ")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def fenced(text: str, language: str = "") -> list[str]:
    """``text`` as a fenced code block, never escaped: the fence is longer than any backtick run inside."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return [f"{fence}{language}", text, fence]


def cell(value: Any) -> str:
    text = md(value).replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "…"


def counts_line(doc: dict[str, Any]) -> str:
    """``3 cases: 2 pass, 1 fail; …`` plus the explorations and models, never "0 cases"."""
    summary = doc["summary"]
    parts = []
    if summary.get("cases"):
        verdicts = ", ".join(f"{md(n)} {md(v)}" for v, n in summary["verdicts"].items() if n)
        parts.append(f"{md(summary['cases'])} case{'s' * (summary['cases'] != 1)}: {verdicts}")
    for value in (doc.get("extra") or {}).values():
        kind = section_kind(value)
        if kind:
            verdicts = section_verdicts({"_": value})
            noun = {"explorations": "exploration", "models": "convolutionalized model", "modelchecks": "model check"}[kind]
            tally = ", ".join(f"{verdicts.count(v)} {'found' if kind == 'explorations' and v == 'pass' else v}"
                              for v in dict.fromkeys(verdicts))
            parts.append(f"{len(value)} {noun}{'s' * (len(value) != 1)}: {md(tally)}")
    line = "; ".join(parts) or "nothing checked"
    mutations = ", ".join(f"{md(n)} {md(o)}" for o, n in summary["mutations"].items() if n)
    return line + (f"; wrong conversions tried: {mutations}" if mutations else "")


def _table(header: list[str], rows: list[list[Any]], marked: set[int] = frozenset()) -> list[str]:
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        cells = [cell(fmt(v) if not isinstance(v, (dict, list)) else v) for v in row]
        if i in marked and cells and not cells[0].startswith("→"):  # an arrow marks a row already
            cells[0] = f"**{cells[0]}**"
        out.append("| " + " | ".join(cells) + " |")
    return out


def _blocks(items: list[tuple]) -> list[str]:
    out: list[str] = []
    for block in items:
        kind = block[0]
        if kind == "heading":
            out += [f"### {VERDICT_MARK.get(block[2], '') + ' ' if block[2] in VERDICT_MARK else ''}{md(block[1])}", ""]
        elif kind == "para":
            out += [md(block[1]), ""]
        elif kind == "lead":
            out += [f"**{md(block[1])}:** {md(block[2])}", ""]
        elif kind == "items":
            out += [f"- {md(label)}: {md(value)}" for label, value in block[1]] + [""]
        elif kind == "table":
            out += [*_table(block[1], block[2], block[3]), ""]
        elif kind == "code":
            out += [f"{md(block[1])}:", "", *fenced(block[2], "python"), ""]
        elif kind == "figures":
            out += [f"(picture in equivcheck.html: {md(pid)})" for pid in block[1]] + [""]
    return out


def extra_section(name: str, value: Any) -> list[str]:
    """A section: explorations, models and model checks as their own blocks; any other JSON as a table."""
    out = [f"## {md(section_title(name, value))}", ""]
    known = blocks(name, value)
    if known is not None:
        return out + _blocks(known)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out += _table(*generic_table(value))
    elif isinstance(value, dict):
        out += _table(["key", "value"], [[k, v] for k, v in value.items()])
    elif isinstance(value, list):
        out += [f"- {cell(v)}" for v in value] or ["(empty)"]
    else:
        out.append(cell(value))
    return [*out, ""]


def render(doc: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    run = doc["run"]
    verdict = overall_verdict(doc)
    out = [
        f"# {md(title(doc))}",
        "",
        f"**Verdict: {VERDICT_MARK.get(verdict, md(verdict))}** — {counts_line(doc)}",
        "",
    ]
    if run_failed(doc):
        out += ["The run itself failed (a failing test or an error outside the checks).", ""]
    checked = subjects(doc)
    if checked:
        out += ["What was checked:", "", *(f"- {md(s)}" for s in checked), ""]
    out += [
        f"Run {code(run['run_id'])} · {md(run['created'])}" + (f" · {code(run['command'])}" if run.get("command") else "")
        + (f" · seed {md(run['seed'])}" if run.get("seed") is not None else ""),
        "",
        f"Environment: {md(environment_line(doc['environment']))}",
        "",
    ]
    conv = doc["conventions"]
    if conv["rows"]:
        rows = [[r["conversion"], VERDICT_MARK.get(r["verdict"], r["verdict"]), r["cases"],
                 *(MARK[r["cells"][c]["state"]] for c in conv["columns"])] for r in conv["rows"]]
        out += ["## Conventions", "", *_table(["conversion", "verdict", "cases", *conv["columns"]], rows)]
        out += ["", "✅ holds: every wrong conversion breaking it was rejected · ❌ fails · "
                "⚠️ ambiguous: a wrong conversion could not be told apart on this data · · not checked", ""]
    problems = [c for c in doc["cases"] if c.get("verdict") in PROBLEMS]
    if problems:
        out += ["## Failures", ""]
        for c in problems:
            out += _problem(c)
    if doc["cases"]:
        header, rows = case_rows(doc["cases"])
        out += ["## Cases", "", *_table(header, [[VERDICT_MARK.get(v, v) if h == "verdict" else v
                                                  for h, v in zip(header, row)] for row in rows]), ""]
    for name, value in (doc.get("extra") or {}).items():
        out += extra_section(name, value)
    facts = facts_rows(doc["environment"])
    if facts:
        out += ["## Machine facts (probed here)", "", *_table(["backend", "layer", "dtype", "found"], facts), ""]
    return "\n".join(out).rstrip() + "\n"


def run_failed(doc: dict[str, Any]) -> bool:
    """Whether the run failed for a reason of its own while every check it recorded passed."""
    found = [c.get("verdict") for c in doc["cases"]] + section_verdicts(doc.get("extra"))
    return not doc["summary"].get("ok", True) and bool(found) and not any(v in PROBLEMS for v in found)


def case_rows(cases: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The cases table: who (test, converter where known), what (specs with shapes), where, and the numbers."""
    who = [k for k in ("test", "converter") if any(c.get(k) for c in cases)]
    header = [*who, "source", "target", "backends", "dtype", "verdict", "max abs err", "bound", "err/bound",
              "wrong conversions rejected"]
    rows = []
    for c in cases:
        comp = c.get("comparison") or {}
        muts = c.get("mutations") or []
        rows.append([*(c.get(k) or "-" for k in who), spec_text(c.get("source")), spec_text(c.get("target")),
                     backends(c), c.get("dtype"), c["verdict"], comp.get("max_abs_error"), comp.get("bound_at_worst"),
                     comp.get("max_error_ratio"), f"{sum(m.get('outcome') == 'rejected' for m in muts)}/{len(muts)}"])
    return header, rows


def _problem(c: dict[str, Any]) -> list[str]:
    comp = c.get("comparison") or {}
    out = [f"### {VERDICT_MARK.get(c['verdict'], md(c['verdict']))} {md(case_heading(c))} — {md(backends(c))}, "
           f"{md(c.get('dtype'))}", ""]
    out += [f"- {md(label)}: {md(value)}" for label, value in case_identity(c) if label in ("conventions", "notes")]
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
        out.append(f"- right mapping: {code(mapping['code']['numpy'])}")
    return [*out, ""]
