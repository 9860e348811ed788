"""``equivcheck.html``: one self-contained page — no script, no external style, font or image.

Pictures are ``data:`` URIs from the report's ``pictures``; a Content-Security-Policy that
allows nothing else makes any accidental external reference fail loudly in a browser.
"""

from __future__ import annotations

import json
import re
from html import escape
from typing import Any

from equivcheck.report.environment import environment_line, facts_rows
from equivcheck.report.markdown import (
    MODEL_COLUMNS,
    PROBLEMS,
    backends,
    counts_line,
    fmt,
    is_model_checks,
    model_rows,
    percent,
)

__all__ = ["render"]

_CSS = """
:root { --holds:#1a7f37; --fails:#cf222e; --ambiguous:#9a6700; --na:#8c959f; --ink:#1f2328; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0 auto;
       max-width: 1200px; padding: 1.2rem 1.5rem 3rem; }
h1 { font-size: 1.5rem; margin: 0 0 .3rem; } h2 { font-size: 1.15rem; margin-top: 2rem;
     border-bottom: 1px solid var(--line); padding-bottom: .2rem; } h3 { font-size: 1rem; margin-bottom: .3rem; }
.meta { color: #57606a; font-size: .85rem; } code, pre { font: 12px/1.4 ui-monospace, "SFMono-Regular", Menlo, monospace; }
pre { background: #f6f8fa; padding: .5rem; overflow-x: auto; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .85rem; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.holds { background: #dafbe1; color: var(--holds); font-weight: 600; }
td.fails { background: #ffebe9; color: var(--fails); font-weight: 600; }
td.ambiguous { background: #fff8c5; color: var(--ambiguous); font-weight: 600; }
td.na { color: var(--na); text-align: center; }
.badge { display: inline-block; border-radius: 1rem; padding: .05rem .6rem; margin-right: .3rem; color: #fff;
         font-size: .8rem; font-weight: 600; }
.pass { background: var(--holds); } .fail, .error { background: var(--fails); } .inconclusive { background: var(--ambiguous); }
.skip { background: var(--na); }
.verdict-pass { color: var(--holds); } .verdict-fail, .verdict-error { color: var(--fails); }
.verdict-inconclusive { color: var(--ambiguous); } .verdict-skip { color: var(--na); }
figure { margin: .8rem 0; } figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { color: #57606a; font-size: .8rem; max-width: 60rem; }
.problem { border-left: 4px solid var(--fails); padding-left: .8rem; margin: 1rem 0; }
.problem.inconclusive-case { border-color: var(--ambiguous); }
details { margin: .2rem 0; } summary { cursor: pointer; }
"""

_STATE_CLASS = {"holds": "holds", "fails": "fails", "ambiguous": "ambiguous", "n/a": "na"}
_STATE_TEXT = {"holds": "holds", "fails": "fails", "ambiguous": "ambiguous", "n/a": "–"}


def _e(value: Any) -> str:
    return escape(value if isinstance(value, str) else fmt(value))


def _figure(doc: dict[str, Any], pid: str) -> str:
    pic = (doc.get("pictures") or {}).get(pid)
    if not pic:
        return ""
    png = str(pic.get("png", ""))
    if not re.fullmatch(r"[A-Za-z0-9+/=\s]*", png):  # only base64 goes into the attribute
        return ""
    return (f'<figure id="pic-{_e(pid)}"><img src="data:image/png;base64,{png}" alt="{_e(pic["title"])}">'
            f"<figcaption>{_e(pic['caption'])}</figcaption></figure>")


def _matrix(doc: dict[str, Any]) -> str:
    conv = doc["conventions"]
    if not conv["rows"]:
        return "<p>No cases.</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in ("conversion", "verdict", "cases", *conv["columns"]))
    rows = []
    for r in conv["rows"]:
        cells = "".join(
            f'<td class="{_STATE_CLASS.get(cell["state"], "na")}" title="{_e(cell["detail"])}">'
            f'{_e(_STATE_TEXT.get(cell["state"], cell["state"]))}</td>'
            for cell in (r["cells"][c] for c in conv["columns"])
        )
        counts = ", ".join(f"{n} {v}" for v, n in (r.get("counts") or {}).items())
        rows.append(f'<tr><th scope="row">{_e(r["conversion"])}</th>'
                    f'<td class="verdict-{_e(r["verdict"])}">{_e(r["verdict"])}</td>'
                    f'<td title="{_e(counts)}">{_e(r["cases"])}</td>{cells}</tr>')
    legend = ("<p class=\"meta\"><b>holds</b>: every wrong conversion breaking this convention was rejected on the "
              "same data · <b>fails</b>: the conversion is wrong here · <b>ambiguous</b>: a wrong conversion could "
              "not be told apart on this shape or data · <b>–</b>: not checked. Hover a cell for why.</p>")
    return f'<table id="conventions"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{legend}'


def _problem(doc: dict[str, Any], c: dict[str, Any]) -> str:
    comp = c.get("comparison") or {}
    items = []
    if c.get("reason"):
        items.append(f"<li>reason: {_e(c['reason'])}</li>")
    if comp:
        items.append(f"<li>worst element <code>{_e(str(comp.get('worst_index')))}</code>: |error| "
                     f"{_e(comp.get('max_abs_error'))}, bound {_e(comp.get('bound_at_worst'))}, error/bound "
                     f"{_e(comp.get('max_error_ratio'))}, relative {_e(comp.get('max_rel_error'))}, "
                     f"{_e(percent(comp.get('fraction_out_of_bound')))} of outputs out of bound</li>")
    d = c.get("diagnosis")
    if d:
        items.append(f"<li>looks like: <b>{_e(d['mutant'])}</b> ({_e(d['description'])}); convention: "
                     f"{_e(d['convention'])}</li>")
    missed = [m["name"] for m in c.get("mutations") or [] if m.get("outcome") == "not rejected"]
    if missed:
        items.append(f"<li>wrong conversions that also pass: {_e(', '.join(missed))}</li>")
    if c.get("mapping"):
        items.append(f"<li>right mapping: <code>{_e(c['mapping']['code']['numpy'])}</code></li>")
    pics = "".join(_figure(doc, p) for p in c.get("pictures") or [] if p.startswith("failure-"))
    cls = "problem inconclusive-case" if c["verdict"] == "inconclusive" else "problem"
    return (f'<div class="{cls}"><h3>{_e(c.get("title"))} — {_e(backends(c))}, {_e(c.get("dtype"))}: '
            f'<span class="verdict-{_e(c["verdict"])}">{_e(c["verdict"])}</span></h3><ul>{"".join(items)}</ul>{pics}</div>')


def _cases(doc: dict[str, Any]) -> str:
    rows = []
    for i, c in enumerate(doc["cases"]):
        comp = c.get("comparison") or {}
        muts = c.get("mutations") or []
        detail = ""
        if c.get("mapping") or muts:
            code = "".join(f"<div>{_e(k)}: <code>{_e(v)}</code></div>" for k, v in (c.get("mapping") or {}).get("code", {}).items())
            mut = "".join(f"<li>{_e(m['name'])}: {_e(m['outcome'])} (error/bound {_e(m.get('max_error_ratio'))})</li>" for m in muts)
            detail = f"<details><summary>mapping, mutants</summary>{code}<ul>{mut}</ul></details>"
        rows.append(
            f"<tr><td>{i}</td><td>{_e(c.get('title'))}{detail}</td><td>{_e(backends(c))}</td><td>{_e(c.get('dtype'))}</td>"
            f'<td class="verdict-{_e(c["verdict"])}">{_e(c["verdict"])}</td><td>{_e(comp.get("max_abs_error"))}</td>'
            f"<td>{_e(comp.get('bound_at_worst'))}</td><td>{_e(comp.get('max_error_ratio'))}</td>"
            f"<td>{_e(str(comp.get('worst_index', '-')))}</td>"
            f"<td>{sum(m.get('outcome') == 'rejected' for m in muts)}/{len(muts)}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("#", "conversion", "backends", "dtype", "verdict", "max abs err", "bound",
                                              "err/bound", "worst element", "mutants rejected"))
    return f'<table id="cases"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        text = json.dumps(v, ensure_ascii=False, default=str)
        return f"<code>{_e(text if len(text) <= 300 else text[:297] + '…')}</code>"
    return _e(v)


def _model_checks(title: str, checks: list[dict[str, Any]]) -> str:
    """Each whole-model check: its layer table, the first wrong layer highlighted."""
    parts = [title]
    for check in checks:
        parts.append(f"<h3>{_e(check.get('source'))} → {_e(check.get('converted'))}: "
                     f'<span class="verdict-{_e(check.get("verdict"))}">{_e(check.get("verdict"))}</span></h3>')
        first = check.get("first_divergence")
        if first:
            parts.append(f"<p><b>First wrong layer:</b> {_e(first.get('headline'))}</p>")
        head = "".join(f"<th>{_e(c)}</th>" for c in MODEL_COLUMNS)
        marked = ' class="first-divergence fails"'
        body = "".join(f"<tr{marked if is_first else ''}>" + "".join(f"<td>{_value(c)}</td>" for c in cells) + "</tr>"
                       for is_first, cells in model_rows(check))
        parts.append(f'<table class="extra model-layers"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
    return "".join(parts)


def _extra(name: str, value: Any) -> str:
    title = f"<h2>{_e(name.replace('_', ' ').capitalize())}</h2>"
    if is_model_checks(value):
        return _model_checks(title, value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys: list[str] = []
        for v in value:
            keys += [k for k in v if k not in keys]
        keys = keys[:12]
        head = "".join(f"<th>{_e(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_value(v.get(k))}</td>" for k in keys) + "</tr>" for v in value)
        return f'{title}<table class="extra"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    if isinstance(value, dict):
        body = "".join(f"<tr><th>{_e(k)}</th><td>{_value(v)}</td></tr>" for k, v in value.items())
        return f'{title}<table class="extra">{body}</table>'
    return f"{title}<p>{_value(value)}</p>"


def render(doc: dict[str, Any]) -> str:
    """The whole report as one HTML page."""
    run, summary = doc["run"], doc["summary"]
    badges = "".join(f'<span class="badge {_e(v)}">{_e(n)} {_e(v)}</span>' for v, n in summary["verdicts"].items() if n)
    meta = f"run <code>{_e(run['run_id'])}</code> · {_e(run['created'])}"
    if run.get("command"):
        meta += f" · <code>{_e(run['command'])}</code>"
    if run.get("seed") is not None:
        meta += f" · seed {_e(run['seed'])}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>equivcheck report {_e(run['run_id'][:12])}</title><style>{_CSS}</style></head><body>",
        "<h1>equivcheck report</h1>",
        f'<p class="meta">{meta}</p>',
        f'<p class="meta">{_e(environment_line(doc["environment"]))}</p>',
        f"<p>{badges} {_e(counts_line(summary))}</p>",
        "<h2>Conventions</h2>",
        _matrix(doc),
        _figure(doc, "overview"),
    ]
    problems = [c for c in doc["cases"] if c.get("verdict") in PROBLEMS]
    if problems:
        parts += ["<h2>Failures</h2>", *(_problem(doc, c) for c in problems)]
    pair_ids: list[str] = []
    for c in doc["cases"]:
        pair_ids += [p for p in c.get("pictures") or [] if p.startswith("pair-") and p not in pair_ids]
    if pair_ids:
        parts += ["<h2>Right and wrong conversions</h2>", *(_figure(doc, p) for p in pair_ids)]
    if doc["cases"]:
        parts += ["<h2>Cases</h2>", _cases(doc)]
    parts += [_extra(k, v) for k, v in (doc.get("extra") or {}).items()]
    facts = facts_rows(doc["environment"])
    if facts:
        rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in facts)
        parts += ["<h2>Machine facts (probed here)</h2>",
                  f"<table><tr><th>backend</th><th>layer</th><th>dtype</th><th>found</th></tr>{rows}</table>"]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"
