"""Pictures for a report, as base64 PNG, drawn from the case records alone.

Nothing here plans, draws data or runs a check: every picture is made of what the judge
(:mod:`equivcheck.judge`) stored in the record. For each conversion (spec pair), one figure
with a column for the record's right ``mapping`` and one per mutation whose record carries
its ``mapping`` (the wrong conversion of the source kernel; :meth:`equivcheck.mapping.Mapping.from_dict`):

- **read from**: for each target kernel position (output 0, input 0), the map position
  (row-major) and input channel where the right mapping puts the weight read there — a
  smooth ramp when right, mirrored under a missing flip, stripes under a wrong flatten order.
- **|right − wrong|**: on a kernel holding 0, 1, 2, … (each weight its own row-major index:
  all distinct, no random draw), summed over the first :data:`PICTURE_CHANNELS` output and
  input channels.

Only the pictured kernel elements are gathered (:meth:`equivcheck.mapping.Mapping.source_indices`),
so a large kernel costs no more than a small one. A record without mutation mappings (an older
report) gets no pair figure. A failed case adds its own output error map (its record's
``error_map``); one overview plots each case's max error against its bound, and the error/bound
ratio of the right conversion next to its mutants'. matplotlib's Agg canvas is used without
pyplot, imported on first use.
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
from equivcheck.mapping import Mapping

__all__ = ["MAX_PAIR_PICTURES", "add_pictures", "overview_picture", "pair_arrays", "pair_picture"]

MAX_PAIR_PICTURES = 8  # conversions pictured per report
MAX_FAILURE_PICTURES = 8  # failed cases pictured per report
PICTURE_CHANNELS = 3  # output and input channels |right − wrong| sums over (and small() keeps)
MAX_POSITIONS = 4096  # kernel positions (product of the spatial sizes) a picture may show
_DPI = 80
_CELL = 112  # pixels per panel of a mosaic
OUTCOME_COLOUR = {"rejected": "#1a7f37", "not rejected": "#cf222e", "ambiguous": "#9a6700", "right": "#0969da"}
_OUTCOME_RANK = {"rejected": 0, "ambiguous": 1, "not rejected": 2}
_VERDICT_COLOUR = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700", "error": "#8250df", "skip": "#6e7781"}


# -- matplotlib, lazily -------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def panel(img: np.ndarray, cmap: str, hi: float) -> np.ndarray:
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


def mosaic(title: str, columns: list[tuple[str, str]], rows: list[str],
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


def png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# -- arrays ---------------------------------------------------------------------------------
def grid(a: np.ndarray) -> np.ndarray:
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


def small(spec: Any) -> Any:
    """``spec`` with channels and units cut to :data:`PICTURE_CHANNELS` (same spatial layout)."""
    from equivcheck.specs import DenseSpec

    n = PICTURE_CHANNELS
    if isinstance(spec, DenseSpec):
        return spec.replace(channels=min(spec.channels, n), units=min(spec.units, n))
    if spec.groups == 1:
        return spec.replace(in_channels=min(spec.in_channels, n), out_channels=min(spec.out_channels, n))
    return spec


# -- the kernel layout of a target spec --------------------------------------------------------
def _map_letters(target: Any) -> tuple[str, dict[str, int]]:
    """The letters of ``target``'s kernel map (``"HW"``) and the size of every layout letter."""
    from equivcheck.specs import DenseSpec

    if isinstance(target, DenseSpec):
        return target.map_letters[1:], dict(zip(target.map_letters, (target.channels, *target.spatial)))
    return target.letters, target.axis_sizes()


def _channel_counts(target: Any) -> tuple[int, int]:
    """How many output and input channels index the kernel (per group: a depthwise kernel reads one)."""
    from equivcheck.specs import DenseSpec

    if isinstance(target, DenseSpec):
        return target.units, target.channels
    sizes = target.axis_sizes()
    if target.is_depthwise_layout:
        return sizes["I"] * sizes["M"], 1
    return (sizes["I"], sizes["O"]) if target.transposed else (sizes["O"], sizes["I"])


def _kernel_coords(target: Any, outs: int, ins: int) -> tuple[np.ndarray, ...]:
    """Coordinates in ``target``'s stored kernel of its first ``outs`` output and ``ins`` input channels
    at every map position: one index array per kernel axis, broadcasting to ``(outs, ins, *map)``."""
    from equivcheck.specs import DenseSpec

    letters, sizes = _map_letters(target)
    ndim = 2 + len(letters)

    def along(values: np.ndarray, axis: int) -> np.ndarray:
        return values.reshape([-1 if k == axis else 1 for k in range(ndim)])

    at = {a: along(np.arange(sizes[a]), 2 + j) for j, a in enumerate(letters)}
    o, i = along(np.arange(outs), 0), along(np.arange(ins), 1)
    if isinstance(target, DenseSpec):  # the input features are the map flattened in target.flatten order
        at["C"] = i
        at = {"O": o, "I": np.ravel_multi_index(tuple(at[a] for a in target.flatten),
                                                tuple(sizes[a] for a in target.flatten))}
    elif target.is_depthwise_layout:  # output channel c·M + m
        at.update(I=o // sizes["M"], M=o % sizes["M"])
    else:
        at.update({"I": o, "O": i} if target.transposed else {"O": o, "I": i})
    return tuple(at[a] for a in target.kernel_layout)


def _channel_and_position(target: Any, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The input channel and row-major map position of ``target``'s kernel elements at ``flat`` indices."""
    from equivcheck.specs import DenseSpec

    letters, sizes = _map_letters(target)
    at = dict(zip(target.kernel_layout, np.unravel_index(flat, target.kernel_shape)))
    if isinstance(target, DenseSpec):
        at.update(zip(target.flatten, np.unravel_index(at["I"], tuple(sizes[a] for a in target.flatten))))
        channel = at["C"]
    elif target.is_depthwise_layout:
        channel = np.zeros_like(flat)
    else:
        channel = at["O" if target.transposed else "I"]
    position = (np.ravel_multi_index(tuple(at[a] for a in letters), tuple(sizes[a] for a in letters))
                if letters else np.zeros_like(flat))
    return channel, position


# -- the pair figure's data, from the record alone ----------------------------------------------
def _pictured(record: dict[str, Any]) -> tuple[Any, Mapping, list[tuple[str, Mapping]]] | None:
    """``(target spec, right mapping, [(name, wrong mapping)])`` as the record stores them, or None.

    A mutation is pictured when its record carries its mapping of the source kernel onto the
    target's shape and it could be told apart (not ambiguous); older records carry none.
    """
    from equivcheck.serialize import spec_from_dict

    try:
        source, target = spec_from_dict(record["source"]), spec_from_dict(record["target"])
        right = Mapping.from_dict(record["mapping"])
    except (KeyError, TypeError, EquivcheckError):
        return None
    shapes = (source.kernel_shape, target.kernel_shape)
    if (right.in_shape, right.out_shape) != shapes:
        return None
    wrong: dict[str, Mapping] = {}
    for m in record.get("mutations") or []:
        if (not isinstance(m, dict) or not m.get("mapping") or m.get("outcome") == "ambiguous"
                or m.get("name") in wrong or m.get("name") == "right mapping"):
            continue
        try:
            mapping = Mapping.from_dict(m["mapping"])
        except (TypeError, EquivcheckError):
            continue
        if (mapping.in_shape, mapping.out_shape) == shapes:
            wrong[str(m.get("name"))] = mapping
    return (target, right, list(wrong.items())) if wrong else None


def pair_arrays(record: dict[str, Any]) -> dict[str, dict[str, np.ndarray]] | None:
    """The pair figure's images, computed from the record's mappings alone; None where it stores none.

    Per column (``"right mapping"``, then each pictured mutation by name): ``position`` and
    ``channel``, for each target kernel position of output 0 and input 0 (input channels along
    a row where the kernel has no map), the row-major map position and input channel where the
    right mapping puts the weight read there; and ``diff``, ``|right − wrong|`` on a kernel
    holding its own row-major indices (all distinct), summed over the first
    :data:`PICTURE_CHANNELS` output and (where the kernel has a map) input channels. Only those kernel elements are gathered
    (:meth:`equivcheck.mapping.Mapping.source_indices`): a large kernel costs no more.
    """
    pictured = _pictured(record)
    if pictured is None:
        return None
    target, right, wrong = pictured
    outs, ins = _channel_counts(target)
    letters, sizes = _map_letters(target)
    positions = math.prod(sizes[a] for a in letters)
    if positions > MAX_POSITIONS:
        return None
    with_map = positions > 1
    shown = (1, 1) if with_map else (1, min(ins, MAX_POSITIONS))
    n = (min(outs, PICTURE_CHANNELS), min(ins, PICTURE_CHANNELS) if with_map else shown[1])
    coords, summed = _kernel_coords(target, *shown), _kernel_coords(target, *n)
    back = right.inverse()
    right_read = right.source_indices(summed)

    def image(a: np.ndarray) -> np.ndarray:  # (outs, ins, *map) → the picture's 2-D grid
        return grid(a[0, 0] if with_map else a.reshape(a.shape[0], -1)[0])

    def diff_image(a: np.ndarray) -> np.ndarray:
        return grid(a.sum(axis=(0, 1)) if with_map else a.reshape(a.shape[0], -1).sum(axis=0))

    out: dict[str, dict[str, np.ndarray]] = {}
    for name, mapping in [("right mapping", right), *wrong]:
        read = mapping.source_indices(coords)  # source elements this conversion puts there
        home = back.source_indices(np.unravel_index(read, right.in_shape))  # where the right mapping puts them
        channel, position = _channel_and_position(target, home)
        diff = np.abs(right_read.astype(np.float64) - mapping.source_indices(summed))
        out[name] = {"position": image(position.astype(np.float64)), "channel": image(channel.astype(np.float64)),
                     "diff": diff_image(diff)}
    return out


# -- the pictures ---------------------------------------------------------------------------
def pair_picture(record: dict[str, Any], group: Sequence[dict[str, Any]] = ()) -> dict[str, Any] | None:
    """The mutant figure for one spec pair, from :func:`pair_arrays`; ``None`` where the record cannot give it.

    ``group``: every record of that pair (backend pairs, dtypes); a mutant is labelled with its
    worst outcome among them, and framed when it reproduces one of their failures.
    """
    arrays = pair_arrays(record)
    if arrays is None:
        return None
    names = list(arrays)
    group = list(group) or [record]
    outcomes: dict[str, str] = {}
    for m in (m for r in group for m in r.get("mutations") or []):
        if _OUTCOME_RANK.get(m.get("outcome"), 0) > _OUTCOME_RANK.get(outcomes.get(m.get("name")), -1):
            outcomes[m.get("name")] = m.get("outcome")
    blamed = {(r.get("diagnosis") or {}).get("mutant") for r in group} - {None}
    positions, channels, diffs = ([arrays[c][key] for c in names] for key in ("position", "channel", "diff"))
    with_map = np.nanmax(positions[0]) > 0  # the right mapping's ramp: the kernel has a map
    vmax = lambda images: max((float(np.nanmax(a)) for a in images), default=1.0) or 1.0  # noqa: E731
    rows = []  # (label, images, colour map, top of the scale, the right mapping's own image shown)
    if with_map:
        rows.append(("read from: position", positions, "viridis", vmax(positions), True))
    if any(np.nanmax(c) > 0 for c in channels):  # some wrong conversion mixes channels: show which
        rows.append(("read from: channel", channels, "cividis", vmax(channels), True))
    rows.append(("|right − wrong|, Σ channels", diffs, "magma", vmax(diffs), False))
    title = f"{record.get('title', '')}: right mapping vs each wrong conversion"
    labels = [("right mapping", OUTCOME_COLOUR["right"])]
    for name in names[1:]:
        outcome = outcomes.get(name, "not checked")
        labels.append((f"{name}\n({'= a failure here' if name in blamed else outcome})",
                       OUTCOME_COLOUR.get(outcome, "black")))
    panels = [[panel(images[j], cmap, hi) if j or own else None for j in range(len(names))]
              for _, images, cmap, hi, own in rows]
    framed = {j for j, name in enumerate(names) if name in blamed}
    fig = mosaic(title, labels, [r[0] for r in rows], panels, framed)
    where = "each target kernel position (output 0, input 0)" if with_map else "each input channel of output 0"
    caption = (f"Drawn from the mappings the check recorded. For {where}: the map position (row-major) and input "
               "channel where the right mapping puts the weight read there — a smooth ramp when right, mirrored "
               "under a missing flip, stripes under a wrong flatten order. Last row: |right − wrong| on a kernel "
               "holding 0, 1, 2, … (each weight its own row-major index: all distinct, no random draw), summed over "
               f"the first {PICTURE_CHANNELS} output{' and input' if with_map else ''} channels.")
    return {"title": title, "caption": caption, "png": png(fig)}


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
    return {"title": title, "caption": caption, "png": png(fig)}


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
    return {"title": "error against bound", "caption": caption, "png": png(fig)}


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
