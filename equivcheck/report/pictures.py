"""Pictures for a report, as base64 PNG: what a wrong conversion does to the kernel and the output.

For each conversion (spec pair), one figure with a column for the right mapping and one per
mutant of :mod:`equivcheck.mutations`:

- **read from**: for each position of the target kernel (first out/in channel), the map
  position (row-major index) its weight is applied to. The right mapping gives a smooth ramp;
  a missing flip the same ramp mirrored; a wrong flatten order stripes.
- **|right − mutant|**: on weights drawn as :func:`equivcheck.verify.draw` draws them,
  summed over channels at each kernel position — symmetric under the flip a flip mutant makes.
- **output map** (a conv target whose output is a map): ``|y_right − y_mutant|``, max over
  batch and channels, from :func:`equivcheck.backends.numpy.forward`.

A failed case adds its own output error map. One overview plots each case's max error
against its bound, and the error/bound ratio of the right conversion next to its mutants'.
Pictures are computed on small shapes only: channels are shrunk to at most
:data:`PICTURE_CHANNELS` (the spatial pattern does not depend on them); matplotlib's Agg
canvas is used without pyplot, imported on first use.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError

__all__ = ["MAX_PAIR_PICTURES", "add_pictures", "overview_picture"]

MAX_PAIR_PICTURES = 8  # conversions pictured per report
MAX_FAILURE_PICTURES = 8  # failed cases pictured per report
PICTURE_CHANNELS = 3
MAX_POSITIONS = 4096  # kernel positions (product of the spatial sizes) a picture may show
_DPI = 80
_CELL = 112  # pixels per panel of a mosaic
_OUTCOME_COLOUR = {"rejected": "#1a7f37", "not rejected": "#cf222e", "ambiguous": "#9a6700", "right": "#0969da"}
_OUTCOME_RANK = {"rejected": 0, "ambiguous": 1, "not rejected": 2}
_VERDICT_COLOUR = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700", "error": "#8250df", "skip": "#6e7781"}


# -- matplotlib, lazily -------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _panel(img: np.ndarray, cmap: str, hi: float) -> np.ndarray:
    """A 2-D array as RGBA pixels in ``cmap`` (0..hi), scaled by whole pixels to about :data:`_CELL`."""
    from matplotlib import colormaps

    with np.errstate(invalid="ignore", divide="ignore"):
        rgba = colormaps[cmap](np.clip(img / hi, 0.0, 1.0), bytes=True)
    rgba[np.isnan(img)] = 255
    h, w = img.shape
    if max(h, w) > _CELL:
        step = math.ceil(max(h, w) / _CELL)
        return rgba[::step, ::step]
    scale = max(1, _CELL // max(h, w))
    return np.repeat(np.repeat(rgba, scale, axis=0), scale, axis=1)


def _mosaic(title: str, columns: list[tuple[str, str]], rows: list[str],
            panels: list[list[np.ndarray | None]], framed: set[int]) -> Any:
    """One figure of panels drawn as a single image, with text labels (fast: no Axes per panel)."""
    left, top, gap = 150, 74, 18
    cell = _CELL + gap
    width, height = left + cell * len(columns), top + cell * len(rows)
    canvas = np.full((height, width, 4), 255, dtype=np.uint8)
    for i, row in enumerate(panels):
        for j, img in enumerate(row):
            y0, x0 = top + i * cell, left + j * cell
            if img is None:
                canvas[y0 : y0 + _CELL, x0 : x0 + _CELL, :3] = 246
                continue
            h, w = img.shape[:2]
            y, x = y0 + (_CELL - h) // 2, x0 + (_CELL - w) // 2
            if j in framed:
                canvas[y - 4 : y + h + 4, x - 4 : x + w + 4] = (207, 34, 46, 255)
            canvas[y : y + h, x : x + w] = img
    fig = _figure(width / _DPI, height / _DPI)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")

    def at(x: float, y: float) -> tuple[float, float]:
        return x / width, 1 - y / height

    fig.text(*at(8, 6), title, fontsize=10, va="top", ha="left")
    for j, (name, colour) in enumerate(columns):
        name = "\n".join(textwrap.fill(part, 20) for part in name.split("\n"))
        fig.text(*at(left + j * cell + _CELL / 2, top - 6), name, fontsize=8, color=colour, ha="center", va="bottom")
    for i, name in enumerate(rows):
        fig.text(*at(8, top + i * cell + _CELL / 2), textwrap.fill(name, 20), fontsize=8.5, ha="left", va="center")
        if any(p is None for p in panels[i]):
            j = [p is None for p in panels[i]].index(True)
            fig.text(*at(left + j * cell + _CELL / 2, top + i * cell + _CELL / 2), "reference", fontsize=7,
                     color="#57606a", ha="center", va="center")
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# -- arrays ---------------------------------------------------------------------------------
def _grid(a: np.ndarray) -> np.ndarray:
    """A 0–3-D array as a 2-D image: a row for 1-D, depth slices side by side for 3-D."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a[None, :]
    if a.ndim == 3:
        gap = np.full((a.shape[1], 1), np.nan)
        return np.concatenate([p for s in a for p in (s, gap)][:-1], axis=1)
    return a


def _small(spec: Any) -> Any:
    """``spec`` with channels and units cut to :data:`PICTURE_CHANNELS` (same spatial layout)."""
    from equivcheck.specs import DenseSpec

    n = PICTURE_CHANNELS
    if isinstance(spec, DenseSpec):
        return spec.replace(channels=min(spec.channels, n), units=min(spec.units, n))
    if spec.groups == 1:
        return spec.replace(in_channels=min(spec.in_channels, n), out_channels=min(spec.out_channels, n))
    return spec


def _has_map(shape: Sequence[int]) -> bool:
    return math.prod(shape[2:]) > 1


def _read_from(source: Any, target: Any, mapping: Any) -> tuple[np.ndarray, np.ndarray]:
    """For each target kernel position (out 0, in 0): the source map position and channel its weight came from."""
    from equivcheck.plan import canonical

    cs = canonical(source)
    shape = cs.out_shape
    spatial = np.arange(math.prod(shape[2:]), dtype=np.float64).reshape(shape[2:])
    channel = np.arange(shape[1], dtype=np.float64).reshape(1, -1, *(1,) * (len(shape) - 2))
    out = []
    for probe in (spatial, channel):
        stored = cs.inverse().apply(np.ascontiguousarray(np.broadcast_to(probe, shape)))
        canon = canonical(target).apply(mapping.apply(stored))
        out.append(_grid(canon[0, 0] if _has_map(canon.shape) else canon[0].reshape(-1)))
    return out[0], out[1]


def _kernel_diff(target: Any, right: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """``|right − wrong|`` summed over channels at each target kernel position."""
    from equivcheck.plan import canonical

    c = canonical(target)
    d = np.abs(c.apply(right).astype(np.float64) - c.apply(wrong).astype(np.float64))
    return _grid(d.sum(axis=(0, 1)) if _has_map(d.shape) else d.sum(axis=0).reshape(-1))


def _output_diff(target: Any, right: np.ndarray, wrong: np.ndarray, x: np.ndarray) -> np.ndarray:
    from equivcheck.backends.numpy import forward, to_channels_first

    d = np.abs(forward(target, right, None, x) - forward(target, wrong, None, x))
    d = to_channels_first(d, target.data_format)
    return _grid(d.max(axis=(0, 1)))


# -- the pictures ---------------------------------------------------------------------------
def pair_picture(record: dict[str, Any], group: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """The mutant figure for one spec pair, or ``None`` when it cannot be drawn small.

    ``group``: every record of that pair (backend pairs, dtypes); a mutant is labelled with its
    worst outcome among them, and framed when it reproduces one of their failures.
    """
    from equivcheck.mutations import mutants
    from equivcheck.plan import plan
    from equivcheck.serialize import spec_from_dict
    from equivcheck.specs import ConvSpec
    from equivcheck.verify import draw

    try:
        full_source, full_target = spec_from_dict(record["source"]), spec_from_dict(record["target"])
        source, target = _small(full_source), _small(full_target)
        if max(math.prod(source.kernel_shape), math.prod(target.kernel_shape)) > 64 * MAX_POSITIONS:
            return None
        right = plan(source, target)
        muts = [m for m in mutants(source, target, right) if not m.ambiguous]
    except EquivcheckError:
        return None
    shrunk = (source, target) != (full_source, full_target)
    rng = np.random.default_rng(int(record.get("seed") or 0))
    kernel, _ = draw(source, "float64", rng)
    right_k = right.apply(kernel)
    group = list(group) or [record]
    outcomes: dict[str, str] = {}
    for m in (m for r in group for m in r.get("mutations") or []):
        if _OUTCOME_RANK.get(m.get("outcome"), 0) > _OUTCOME_RANK.get(outcomes.get(m.get("name")), -1):
            outcomes[m.get("name")] = m.get("outcome")
    blamed = {(r.get("diagnosis") or {}).get("mutant") for r in group} - {None}
    with_output = isinstance(target, ConvSpec) and math.prod(target.output_spatial) > 1
    x = rng.standard_normal((2, *target.input_shape)) if with_output else None
    columns = [("right mapping", right, None)] + [(m.name, m.mapping, m) for m in muts]
    reads = [_read_from(source, target, m) for _, m, _ in columns]
    positions, channels = [r[0] for r in reads], [r[1] for r in reads]
    diffs = [_kernel_diff(target, right_k, m.apply(kernel)) for _, m, _ in columns]
    outs = [_output_diff(target, right_k, m.apply(kernel), x) for _, m, _ in columns] if with_output else []
    vmax = lambda arrays: max((float(np.nanmax(a)) for a in arrays), default=1.0) or 1.0  # noqa: E731
    rows = [("read from: position", positions, "viridis", vmax(positions))]
    if any(np.nanmax(c) > 0 for c in channels):  # some wrong conversion mixes channels: show which
        rows.append(("read from: channel", channels, "cividis", vmax(channels)))
    rows.append(("|right − wrong|, Σ channels", diffs, "magma", vmax(diffs)))
    if with_output:
        rows.append(("output map |Δ|", outs, "magma", vmax(outs)))
    title = f"{record.get('title', '')}: right mapping vs each wrong conversion"
    if shrunk:
        title += f" (channels cut to ≤ {PICTURE_CHANNELS})"
    labels = []
    for name, _, mutant in columns:
        outcome = "right" if mutant is None else outcomes.get(name, "not checked")
        text = name if mutant is None else f"{name}\n({'= a failure here' if name in blamed else outcome})"
        labels.append((text, _OUTCOME_COLOUR.get(outcome, "black")))
    panels = [[None if (mutant is None and images is not positions and images is not channels)
               else _panel(images[j], cmap, hi) for j, (_, _, mutant) in enumerate(columns)]
              for _, images, cmap, hi in rows]
    framed = {j for j, (name, _, _) in enumerate(columns) if name in blamed}
    fig = _mosaic(title, labels, [r[0] for r in rows], panels, framed)
    caption = ("For each target kernel position (out 0, in 0): the map position (row-major) its weight is "
               "applied to — a smooth ramp when right, mirrored under a missing flip — and, where a wrong conversion "
               "mixes channels, the channel it came from (a wrong flatten order gives stripes). Then |right − wrong| "
               "on weights drawn as the check draws them, summed over channels.")
    if with_output:
        caption += " Last row: the output map's |Δ|, max over batch and channels."
    return {"title": title, "caption": caption, "png": _png(fig)}


def failure_picture(record: dict[str, Any]) -> dict[str, Any] | None:
    """A failed case's output error map (from its record's ``error_map``)."""
    emap = record.get("error_map")
    if not emap or not emap.get("values"):
        return None
    values = np.array([[np.nan if v is None else v for v in row] for row in emap["values"]], dtype=np.float64)
    rows, cols = values.shape
    fig = _figure(min(9.0, max(5.5, 2.4 + 0.3 * cols)), min(6.0, max(3.0, 1.4 + 0.3 * rows)))
    fig.subplots_adjust(left=0.14, right=0.86, top=0.86, bottom=0.16)
    ax = fig.subplots()
    im = ax.imshow(values, cmap="magma", interpolation="nearest", aspect="auto")
    fig.colorbar(im, ax=ax, label="|error|", fraction=0.05)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(emap.get("cols", ""), fontsize=8)
    ax.set_ylabel(emap.get("rows", ""), fontsize=8)
    comp = record.get("comparison") or {}
    worst = comp.get("worst_index")
    title = f"{record.get('title', '')} on {record.get('source_backend')}→{record.get('target_backend')} {record.get('dtype')}"
    fig.suptitle(title, fontsize=9)
    caption = f"{emap.get('what', 'output error')}; worst element {worst}"
    diagnosis = record.get("diagnosis")
    if diagnosis:
        caption += f"; reproduced exactly by the mutant {diagnosis['mutant']!r} ({diagnosis['description']})"
    return {"title": title, "caption": caption, "png": _png(fig)}


def overview_picture(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Max |error| against the bound per case, and error/bound of the right conversion vs its mutants."""
    floor = 1e-30
    comps = [r.get("comparison") or {} for r in records]
    idx = [i for i, c in enumerate(comps) if c.get("max_abs_error") is not None and c.get("bound_at_worst")]
    if not idx:
        return None
    fig = _figure(10.0, 3.8)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.14, wspace=0.25)
    left, right = fig.subplots(1, 2)
    verdicts = np.array([records[i].get("verdict") for i in idx])
    bound = np.array([comps[i]["bound_at_worst"] for i in idx], dtype=np.float64)
    error = np.maximum(np.array([comps[i]["max_abs_error"] for i in idx], dtype=np.float64), floor)
    ratio = np.array([comps[i].get("max_error_ratio") or floor for i in idx], dtype=np.float64)
    for verdict, colour in _VERDICT_COLOUR.items():
        sel = verdicts == verdict
        if sel.any():
            left.scatter(bound[sel], error[sel], s=22, color=colour, label=verdict, zorder=3)
            right.scatter(np.array(idx)[sel], np.maximum(ratio[sel], floor), s=26, color=colour, zorder=3)
    lo, hi = min(bound.min(), error.min()) / 3, max(bound.max(), error.max()) * 3
    left.plot([lo, hi], [lo, hi], color="#57606a", linestyle="--", linewidth=1, label="error = bound")
    left.set(xscale="log", yscale="log", xlabel="bound at the worst element", ylabel="max |error|",
             title="error against bound (below the line passes)")
    left.legend(fontsize=7, loc="upper left")
    mx = [(i, m["max_error_ratio"]) for i, r in enumerate(records) for m in r.get("mutations") or []
          if m.get("max_error_ratio")]
    if mx:
        xs, ys = zip(*mx)
        right.scatter(xs, ys, s=14, marker="x", color="#6e7781", zorder=2, label="wrong conversions")
        right.legend(fontsize=7, loc="center right")
    right.axhline(1.0, color="#57606a", linestyle="--", linewidth=1)
    right.set(yscale="log", xlabel="case #", ylabel="max error / bound", xlim=(-0.7, len(records) - 0.3),
              title="the conversion (dot) and its wrong variants (×)")
    caption = ("Left: each case's largest error against the bound at that element (log scales). "
               "Right: error/bound of the conversion under test (dots, ≤ 1 passes) and of every wrong "
               "conversion tried on the same data (crosses, which must exceed 1), by case number.")
    return {"title": "error against bound", "caption": caption, "png": _png(fig)}


def _key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def add_pictures(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Draw the report's pictures; set each record's ``pictures`` (ids) and return ``{id: picture}``.

    The overview; each failed case's error map; one mutant figure per conversion (spec pair
    and seed), pairs with a failure first — up to :data:`MAX_FAILURE_PICTURES` and
    :data:`MAX_PAIR_PICTURES`.
    """
    pictures: dict[str, dict[str, Any]] = {}
    overview = overview_picture(records)
    if overview:
        pictures["overview"] = overview
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        record["pictures"] = []
        if record.get("verdict") in ("pass", "fail", "inconclusive") and record.get("mapping"):
            groups.setdefault("pair-" + _key(record["source"], record["target"], record.get("seed")), []).append(record)
    failures = 0
    for record in records:
        if record.get("verdict") == "fail" and failures < MAX_FAILURE_PICTURES:
            pic = failure_picture(record)
            if pic:
                pictures["failure-" + record["id"]] = pic
                record["pictures"].append("failure-" + record["id"])
                failures += 1
    order = sorted(groups.items(), key=lambda kv: all(r.get("verdict") != "fail" for r in kv[1]))
    for pid, group in order[:MAX_PAIR_PICTURES]:
        pic = pair_picture(group[0], group)
        if pic:
            pictures[pid] = pic
            for record in group:
                record["pictures"].append(pid)
    return pictures
