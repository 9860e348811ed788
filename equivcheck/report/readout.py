"""Pictures of a whole-model check's first wrong layer: where its weights are read from, right and wrong.

A model check's layer row (:meth:`equivcheck.modelcheck.ModelCheck.to_dict`) may carry
``source_spec`` and ``converted_spec`` (:func:`equivcheck.serialize.spec_to_dict`) and, for a
failing pair, ``readout``: :func:`kernel_readout` of the two layers' real kernels. With the
read-out, the picture sets the right mapping's read-out beside the converter's and marks the
weights it reads from the wrong place; with the specs alone it is the layer cases' figure
(:func:`equivcheck.report.pictures.pair_picture`): the right mapping against every wrong
conversion, the one the diagnosis names framed. Without specs no picture is drawn.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError
from equivcheck.modelcheck.readout import MAX_READOUT, kernel_readout

__all__ = ["MAX_READOUT", "add_model_pictures", "kernel_readout", "layer_picture"]


def _right_readout(source: Any, target: Any) -> dict[str, Any] | None:
    """The right mapping's read-out, on specs with channels cut (map positions do not depend on them)."""
    from equivcheck.planning import plan
    from equivcheck.report.pictures import small

    s, t = small(source), small(target)
    kernel = np.arange(math.prod(s.kernel_shape), dtype=np.float64).reshape(s.kernel_shape)
    return kernel_readout(s, t, kernel, plan(s, t).apply(kernel))


def _array(cells: Any) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=np.float64)


def layer_picture(row: dict[str, Any], check: dict[str, Any]) -> dict[str, Any] | None:
    """The picture of one model check's layer row, or ``None`` when the row carries no specs."""
    from equivcheck.serialize import spec_from_dict

    try:
        source, target = spec_from_dict(row["source_spec"]), spec_from_dict(row["converted_spec"])
    except (KeyError, TypeError, EquivcheckError):
        return None
    label = f"{row.get('source')} ↔ {row.get('converted')}"
    readout = row.get("readout")
    if not isinstance(readout, dict) or not readout.get("position"):
        from equivcheck.report.pictures import pair_picture

        mistake = str(row.get("mistake") or "").split(" (")[0]
        record = {"source": row["source_spec"], "target": row["converted_spec"], "title": label,
                  "seed": check.get("seed") or 0, "mutations": [],
                  **({"diagnosis": {"mutant": mistake}} if mistake else {})}
        return pair_picture(record)
    try:
        right = _right_readout(source, target)
    except EquivcheckError:
        return None
    if right is None:
        return None
    step = int(readout.get("step") or 1)
    right_pos = _array(right["position"])[::step, ::step]
    right_ch = _array(right["channel"])[::step, ::step]
    pos, ch = _array(readout["position"]), _array(readout.get("channel") or readout["position"])
    if pos.shape != right_pos.shape:
        return None
    wrong = ((pos != right_pos) | (ch != right_ch) | np.isnan(pos)).astype(np.float64)
    wrong[np.isnan(right_pos)] = np.nan  # the gaps between depth slices
    return _readout_figure(label, row, (right_pos, right_ch), (pos, ch), wrong)


def _readout_figure(label: str, row: dict[str, Any], right: tuple[np.ndarray, np.ndarray],
                    got: tuple[np.ndarray, np.ndarray], wrong: np.ndarray) -> dict[str, Any]:
    from equivcheck.report.pictures import OUTCOME_COLOUR, mosaic, panel, png

    hi_pos = float(np.nanmax([np.nanmax(right[0]), np.nanmax(got[0]) if np.isfinite(got[0]).any() else 0])) or 1.0
    hi_ch = float(np.nanmax([np.nanmax(right[1]), np.nanmax(got[1]) if np.isfinite(got[1]).any() else 0])) or 1.0
    mistake = str(row.get("mistake") or "this converter")
    columns = [("right mapping", OUTCOME_COLOUR["right"]), (f"converted\n({mistake})", OUTCOME_COLOUR["not rejected"])]
    panels = [[panel(right[0], "viridis", hi_pos), panel(got[0], "viridis", hi_pos)],
              [panel(right[1], "cividis", hi_ch), panel(got[1], "cividis", hi_ch)],
              [None, panel(wrong, "Reds", 1.0)]]
    title = f"{label}: where the converted kernel reads its weights from"
    fig = mosaic(title, columns, ["read from: position", "read from: channel", "reads a wrong weight"], panels, {1})
    share = float(wrong.mean()) if wrong.size else 0.0
    caption = (f"For each converted kernel position (output 0, input channel 0): the source map position (row-major) "
               f"and input channel of the weight it holds — the right mapping's (left, a smooth ramp) and the converted "
               f"model's, found by value in the source kernel (right). Bottom: the {100 * share:.3g}% of positions "
               f"holding a weight from the wrong place (white: a weight found nowhere in the source).")
    return {"title": title, "caption": caption, "png": png(fig)}


def add_model_pictures(extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Draw each model check's first-divergence picture; set its ``pictures`` (ids) and return ``{id: picture}``."""
    from equivcheck.report.describe import is_model_checks

    pictures: dict[str, dict[str, Any]] = {}
    for value in extra.values():
        if not is_model_checks(value):
            continue
        for check in value:
            first = check.get("first_divergence") or {}
            row = next((r for r in check.get("layers") or [] if isinstance(r, dict) and first
                        and (r.get("source"), r.get("converted")) == (first.get("source"), first.get("converted"))), None)
            pic = layer_picture(row, check) if row is not None else None
            if pic is None:
                continue
            text = json.dumps([check.get("source"), check.get("converted"), row.get("source"), row.get("converted"),
                               check.get("seed")], default=str)
            pid = "layer-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
            pictures[pid] = pic
            check["pictures"] = [*check.get("pictures", []), pid]
    return pictures
