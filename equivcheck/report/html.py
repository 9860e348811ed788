"""``equivcheck.html``: one self-contained page — no script, no external style, font or image.

Pictures are ``data:`` URIs from the report's ``pictures``; a Content-Security-Policy that
allows nothing else makes any accidental external reference fail loudly in a browser.
"""

from __future__ import annotations

import json
import re
from html import escape
from typing import Any

from equivcheck.report.describe import (
    backends,
    case_heading,
    case_identity,
    overall_verdict,
    section_title,
    subjects,
    title,
)
from equivcheck.report.environment import environment_line, facts_rows
from equivcheck.report.markdown import PROBLEMS, case_rows, counts_line, percent, run_failed
from equivcheck.report.sections import blocks, fmt, generic_table

__all__ = ["render"]

_CSS = """
:root { --holds:#1a7f37; --fails:#cf222e; --ambiguous:#9a6700; --na:#8c959f; --ink:#1f2328; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0 auto;
       max-width: 1200px; padding: 1.2rem 1.5rem 3rem; }
h1 { font-size: 1.5rem; margin: 0 0 .3rem; } h2 { font-size: 1.15rem; margin-top: 2rem;
     border-bottom: 1px solid var(--line); padding-bottom: .2rem; } h3 { font-size: 1rem; margin-bottom: .3rem; }
.meta { color: #57606a; font-size: .85rem; } code, pre { font: 12px/1.4 ui-monospace, "SFMono-Regular", Menlo, monospace; }
pre { background: #f6f8fa; padding: .5rem; overflow-x: auto; white-space: pre-wrap; overflow-wrap: anywhere;
      max-height: 24rem; }
td code, li code { overflow-wrap: anywhere; white-space: pre-wrap; }
.scroll { overflow-x: auto; max-width: 100%; }
.overall { font-size: 1rem; padding: .2rem .9rem; }
.subjects { margin: .3rem 0 .8rem; padding-left: 1.2rem; }
tr.marked td { background: #fff8c5; font-weight: 600; }
tr.first-divergence td { background: #ffebe9; font-weight: 600; }
.identity { color: #57606a; font-size: .85rem; margin: .1rem 0 .4rem; }
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
    ident = " · ".join(f"{_e(label)} <b>{_e(value)}</b>" for label, value in case_identity(c))
    return (f'<div class="{cls}"><h3><span class="badge {_e(c["verdict"])}">{_e(c["verdict"])}</span>'
            f'{_e(case_heading(c))} — {_e(backends(c))}, {_e(c.get("dtype"))}</h3>'
            f'<p class="identity">{ident}</p><ul>{"".join(items)}</ul>{pics}</div>')


def _cases(doc: dict[str, Any]) -> str:
    header, rows = case_rows(doc["cases"])
    v = header.index("verdict")
    body = []
    for c, row in zip(doc["cases"], rows):
        comp = c.get("comparison") or {}
        muts = c.get("mutations") or []
        detail = ""
        if c.get("mapping") or muts:
            code = "".join(f"<div>{_e(k)}: <code>{_e(x)}</code></div>" for k, x in (c.get("mapping") or {}).get("code", {}).items())
            mut = "".join(f"<li>{_e(m['name'])}: {_e(m['outcome'])} (error/bound {_e(m.get('max_error_ratio'))})</li>" for m in muts)
            detail = f"<details><summary>mapping, wrong conversions</summary>{code}<ul>{mut}</ul></details>"
        cells = [f"<td>{_e(x)}</td>" for x in row]
        cells[v] = f'<td class="verdict-{_e(c["verdict"])}">{_e(c["verdict"])}</td>'
        cells.append(f"<td>{_e(str(comp.get('worst_index', '-')))}</td>")
        cells[0] = cells[0][:-5] + detail + "</td>"
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in (*header, "worst element"))
    return f'<div class="scroll"><table id="cases"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _value(v: Any) -> str:
    if isinstance(v, (dict, list)):
        text = json.dumps(v, ensure_ascii=False, default=str)
        return f"<code>{_e(text if len(text) <= 300 else text[:297] + '…')}</code>"
    return _e(v)


def _table(header: list[str], rows: list[list[Any]], marked: set[int] = frozenset(), cls: str = "extra",
           mark: str = "marked") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join((f'<tr class="{mark}">' if i in marked else "<tr>") + "".join(f"<td>{_value(c)}</td>" for c in row)
                   + "</tr>" for i, row in enumerate(rows))
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _blocks(doc: dict[str, Any], name: str, items: list[tuple]) -> str:
    parts = []
    for block in items:
        kind = block[0]
        if kind == "heading":
            verdict = _e(block[2])
            parts.append(f'<h3><span class="badge {verdict}">{verdict}</span>{_e(block[1])}</h3>')
        elif kind == "para":
            parts.append(f"<p>{_e(block[1])}</p>")
        elif kind == "lead":
            parts.append(f"<p><b>{_e(block[1])}:</b> {_e(block[2])}</p>")
        elif kind == "items":
            parts.append("<ul>" + "".join(f"<li>{_e(k)}: <b>{_e(x)}</b></li>" for k, x in block[1]) + "</ul>")
        elif kind == "table":
            models = name == "modelchecks" or block[1][:2] == ["source", "converted"]
            parts.append(_table(block[1], block[2], block[3], cls="extra model-layers" if models else "extra",
                                mark="first-divergence fails" if models else "marked"))
        elif kind == "code":
            parts.append(f'<p class="meta">{_e(block[1])}</p><pre><code>{_e(block[2])}</code></pre>')
        elif kind == "figures":
            parts += [_figure(doc, pid) for pid in block[1]]
    return "".join(parts)


def _extra(doc: dict[str, Any], name: str, value: Any) -> str:
    heading = f"<h2>{_e(section_title(name, value))}</h2>"
    known = blocks(name, value)
    if known is not None:
        return heading + _blocks(doc, name, known)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return heading + _table(*generic_table(value))
    if isinstance(value, dict):
        body = "".join(f"<tr><th>{_e(k)}</th><td>{_value(v)}</td></tr>" for k, v in value.items())
        return f'{heading}<div class="scroll"><table class="extra">{body}</table></div>'
    return f"{heading}<p>{_value(value)}</p>"


def render(doc: dict[str, Any]) -> str:
    """The whole report as one HTML page."""
    run = doc["run"]
    verdict = overall_verdict(doc)
    meta = f"run <code>{_e(run['run_id'])}</code> · {_e(run['created'])}"
    if run.get("command"):
        meta += f" · <code>{_e(run['command'])}</code>"
    if run.get("seed") is not None:
        meta += f" · seed {_e(run['seed'])}"
    checked = "".join(f"<li>{_e(s)}</li>" for s in subjects(doc))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title(doc))}: {_e(verdict)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title(doc))}</h1>",
        f'<p id="verdict"><span class="badge overall {_e(verdict)}">{_e(verdict)}</span> {_e(counts_line(doc))}</p>',
        "<p>The run itself failed (a failing test or an error outside the checks).</p>" if run_failed(doc) else "",
        f'<p>What was checked:</p><ul class="subjects">{checked}</ul>' if checked else "",
        f'<p class="meta">{meta}</p>',
        f'<p class="meta">{_e(environment_line(doc["environment"]))}</p>',
    ]
    if doc["conventions"]["rows"]:
        parts += ["<h2>Conventions</h2>", _matrix(doc), _figure(doc, "overview")]
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
    parts += [_extra(doc, k, v) for k, v in (doc.get("extra") or {}).items()]
    facts = facts_rows(doc["environment"])
    if facts:
        rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in facts)
        parts += ["<h2>Machine facts (probed here)</h2>",
                  f'<div class="scroll"><table><tr><th>backend</th><th>layer</th><th>dtype</th><th>found</th></tr>'
                  f"{rows}</table></div>"]
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p) + "\n"
