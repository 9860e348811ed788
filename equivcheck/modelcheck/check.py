"""``check_models``: a converted model against its source, layer by layer.

1. Run the source on designed inputs (:func:`equivcheck.data.sample_inputs`) and the converted
   model on the same inputs in its own layout, capturing every linear layer's input and output.
2. Pair the linear layers (:mod:`equivcheck.modelcheck.pairing`).
3. For each pair, bring the source layer's captured input to the converted layer's layout and
   compare it with what the converted graph actually fed that layer (a mistake in the graph —
   a wrong transpose, a missing activation — shows here); replay the converted layer alone on
   it, so errors do not accumulate, and judge the output against the source layer's
   (:mod:`equivcheck.modelcheck.judge`); diagnose a failing pair from the weights.
4. Compare the final outputs: a difference there is never a silent pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError, SpecError
from equivcheck.modelcheck.adapters import Adapter, ModelError
from equivcheck.modelcheck.judge import canonical_output, diagnose_pair, judge, magnitude, unrejected_mutants
from equivcheck.modelcheck.layers import Layout, Linear, Other, spec_of
from equivcheck.modelcheck.pairing import pair_layers
from equivcheck.modelcheck.result import LayerRow, ModelCheck, Unpaired
from equivcheck.modelcheck.sides import adapter_for
from equivcheck.serialize import spec_to_dict
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec

__all__ = ["DEFAULT_BATCH", "boundary_tolerance", "check_models", "end_to_end_tolerance"]

DEFAULT_BATCH = 2
_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}


def boundary_tolerance(dtype: str) -> float:
    """Largest relative difference at which two activations still count as the same (errors of earlier layers)."""
    return _TOLERANCE[dtype]


def end_to_end_tolerance(dtype: str) -> float:
    return _TOLERANCE[dtype]


#: Elements :func:`_relative` compares at a time.
RELATIVE_BLOCK = 1 << 16


def _relative(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, that relative to max |b|); inf where a holds NaN/Inf."""
    work = np.float64 if np.float64 in (np.asarray(a).dtype, np.asarray(b).dtype) else np.float32
    a, b = np.asarray(a, work), np.asarray(b, work)  # float32 data: its differences are exact enough in float32
    if a.shape != b.shape:
        return math.inf, math.inf
    fa, fb = a.reshape(-1), b.reshape(-1)
    err = top = 0.0
    buf = np.empty(min(fa.size, RELATIVE_BLOCK), work)  # a block at a time, in cache: no map-sized temporaries
    for start in range(0, fa.size, RELATIVE_BLOCK):
        part, diff = fb[start:start + RELATIVE_BLOCK], buf[:min(RELATIVE_BLOCK, fa.size - start)]
        np.subtract(fa[start:start + RELATIVE_BLOCK], part, out=diff)
        np.abs(diff, out=diff)
        err = max(err, float(diff.max()))
        if not math.isfinite(err):  # a NaN or Inf in either (a finite difference everywhere: both finite)
            return math.inf, math.inf
        top = max(top, abs(float(part.max())), abs(float(part.min())))
    return err, (err / top if top > 0 else (0.0 if err == 0 else math.inf))


# -- inputs --------------------------------------------------------------------------------
def _adopt_layout(src: Adapter, dst: Adapter) -> None:
    """A model whose layers fix no channel axis reads its input in its partner's layout."""
    for one, other in ((src, dst), (dst, src)):
        if not one.has_layout and other.has_layout:
            one.data_format = other.data_format


def _batch_shape(input_shape: Any, src: Adapter, dst: Adapter) -> tuple[int, ...]:
    _adopt_layout(src, dst)
    if input_shape is not None:
        if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (tuple, list)):
            raise SpecError(f"input_shape={input_shape!r} is not a shape: expected e.g. (2, 3, 32, 32), batch first")
        shape = tuple(input_shape)
        if len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
            raise SpecError(f"input_shape={shape!r} is not valid: expected positive integers, batch first, e.g. (2, 3, 32, 32)")
        return tuple(int(s) for s in shape)
    own = src.input_shape()
    if own is not None:
        return (DEFAULT_BATCH, *own)
    other = dst.input_shape()
    if other is not None:
        if len(other) > 1 and src.data_format != dst.data_format:
            other = (other[-1], *other[:-1]) if dst.data_format == CHANNELS_LAST else (*other[1:], other[0])
        return (DEFAULT_BATCH, *other)
    raise SpecError(f"input_shape is missing: the source {src.framework} model {src.name} does not record its input size; "
                    "pass input_shape=(N, C, H, W), the source model's input, batch first")


def _to_canonical(x: np.ndarray, data_format: str) -> np.ndarray:
    return np.moveaxis(x, -1, 1) if data_format == CHANNELS_LAST and x.ndim > 2 else x


def _from_canonical(x: np.ndarray, data_format: str) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x, 1, -1) if data_format == CHANNELS_LAST and x.ndim > 2 else x)


def _inputs(shape: tuple[int, ...], src: Adapter, dst: Adapter, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Designed inputs for the source and the same values laid out for the converted model."""
    from equivcheck.data import sample_inputs

    _adopt_layout(src, dst)

    per = shape[1:]
    canon = (per[-1], *per[:-1]) if src.data_format == CHANNELS_LAST and len(per) > 1 else per
    spec = DenseSpec(channels=canon[0], spatial=canon[1:], units=1)
    rng = np.random.default_rng(seed)
    xc = sample_inputs(spec, shape[0], dtype, rng, nonzeros=math.prod(canon))
    x_src = _from_canonical(xc, src.data_format)
    x_dst = _from_canonical(xc, dst.data_format)
    want = dst.input_shape()
    if want is not None and tuple(x_dst.shape[1:]) != want:
        other = CHANNELS_LAST if dst.data_format != CHANNELS_LAST else CHANNELS_FIRST
        bridged = _from_canonical(xc, other)
        if tuple(x_src.shape[1:]) == want:
            x_dst = x_src
        elif xc.ndim > 2 and tuple(bridged.shape[1:]) == want:
            x_dst = bridged
            dst.data_format = other
            dst.notes.append(f"the converted {dst.framework} model {dst.name} reads its input "
                             f"{'channels last (NHWC)' if other == CHANNELS_LAST else 'channels first (NCHW)'}: "
                             "the source's input was bridged to it")
        else:
            raise SpecError(f"the inputs do not fit: the source reads {tuple(x_src.shape[1:])} per sample, the converted "
                            f"{dst.framework} model {dst.name} expects {want}")
    return x_src, x_dst


# -- one pair --------------------------------------------------------------------------------
def _assume_flatten(s: Linear, c: Linear) -> tuple[Linear, Linear, str]:
    """Where one dense layer's map was not captured (an op that is not shape-only ran between the map and the
    flatten, e.g. a functional pooling) and its partner's was: its framework's own flatten order, assumed and said."""
    import dataclasses

    if s.kind != "dense" or c.kind != "dense" or s.layout is None or c.layout is None:
        return s, c, ""
    for flat, other in ((s, c), (c, s)):
        seen = flat.map_before is not None and math.prod(flat.map_before.shape[1:]) == flat.x.shape[-1]
        if flat.layout.is_flat and not other.layout.is_flat and not seen \
                and math.prod(other.layout.map_shape) == flat.layout.map_shape[0]:
            letters = other.layout.canonical_letters
            order = letters if flat.framework in ("torch", "onnxruntime") else letters[1:] + letters[:1]
            assumed = dataclasses.replace(flat, layout=Layout(other.layout.map_shape, flatten=order))
            note = (f"{flat.name}: the map its input is flattened from was not captured (an op between them that "
                    f"is not shape-only): {flat.framework}'s own flatten order {order} assumed")
            return (assumed, c, note) if flat is s else (s, assumed, note)
    return s, c, ""


def _native_flatten(layer: Linear) -> str:
    letters = layer.layout.canonical_letters if layer.layout is not None else ""
    return letters if layer.framework in ("torch", "onnxruntime") else letters[1:] + letters[:1]  # NCHW flattens CHW


def _bring(s: Linear, c: Linear) -> tuple[np.ndarray, np.ndarray]:
    """(the source input in canonical form, the same brought to the converted layer's layout)."""
    xc = s.layout.to_canonical(s.x)
    target = c.layout
    if tuple(xc.shape[1:]) != target.map_shape:
        if math.prod(xc.shape[1:]) != math.prod(target.map_shape):
            raise ModelError(f"{c.name!r} reads {target.describe()} but its partner {s.name!r} reads {s.layout.describe()}")
        if target.is_flat or s.layout.is_flat:
            return xc, target.from_canonical(xc.reshape(len(xc), *target.map_shape))
        raise ModelError(f"{c.name!r} reads a {target.map_shape} map but {s.name!r} a {s.layout.map_shape} one")
    return xc, target.from_canonical(xc)


def _boundary(s: Linear, c: Linear, x_replay: np.ndarray, dtype: str) -> tuple[bool, str]:
    """Whether the converted graph fed ``c`` the source's input (in c's layout), and how it is laid out."""
    layout = c.layout
    if s.layout.flatten and layout.flatten:
        how = f"flattened {s.layout.flatten}" if s.layout.flatten == layout.flatten else \
            f"flattened {s.layout.flatten} → {layout.flatten}"
        if layout.flatten != _native_flatten(c):
            how += f" (the graph permutes the map to {layout.flatten} before flattening)"
    elif layout.letters and s.layout.letters and s.layout.letters != layout.letters:
        how = f"{s.layout.letters} → {layout.letters}"
    else:
        how = "same layout"
    if c.x.shape != x_replay.shape:
        return False, f"shape {tuple(c.x.shape[1:])}, expected {tuple(x_replay.shape[1:])}"
    _, rel = _relative(c.x, x_replay)
    if rel <= boundary_tolerance(dtype):
        return True, how
    which = _which_permutation(c, x_replay, dtype)
    if which:
        return False, f"{which} (max relative difference {rel:.3g} as laid out)"
    return False, f"values differ from the source's (max relative difference {rel:.3g})"


def _which_permutation(c: Linear, x_replay: np.ndarray, dtype: str) -> str:
    """Name the permutation of the source's input that the converted graph delivered, if one fits."""
    import itertools

    tol = boundary_tolerance(dtype)
    layout = c.layout
    if layout.flatten:
        canon = layout.to_canonical(x_replay)
        for order in itertools.permutations(layout.canonical_letters):
            other = Layout(layout.map_shape, flatten="".join(order))
            if other.flatten != layout.flatten and _relative(c.x, other.from_canonical(canon))[1] <= tol:
                return f"the graph flattens the map as {other.flatten}, this layer's neighbours imply {layout.flatten}"
        return ""
    if x_replay.ndim < 3 or x_replay.ndim > 6:
        return ""
    letters = layout.letters or "".join(str(i) for i in range(x_replay.ndim - 1))
    for perm in itertools.permutations(range(x_replay.ndim - 1)):
        if perm == tuple(range(x_replay.ndim - 1)):
            continue
        moved = x_replay.transpose(0, *(1 + p for p in perm))
        if moved.shape == c.x.shape and _relative(c.x, moved)[1] <= tol:
            return f"the graph feeds the map as {''.join(letters[p] for p in perm)}, the layer reads {letters}"
    return ""


# -- pad layers merged into the conv they feed ---------------------------------------------------
def _find_pads(big: np.ndarray, small: np.ndarray, tol: float) -> tuple[tuple[int, int], ...] | None:
    """(before, after) zeros per spatial axis that make ``small`` into ``big`` (both ``(N, C, *spatial)``).

    First by value: the offset at which ``small`` sits in ``big`` with zeros around it. Where no
    offset fits (an earlier layer already differs), from the zeros alone: the leading all-zero
    slices of each axis.
    """
    import itertools

    extra = [b - s for b, s in zip(big.shape[2:], small.shape[2:])]
    if big.shape[:2] != small.shape[:2] or any(e < 0 for e in extra) or math.prod(e + 1 for e in extra) > 4096:
        return None
    scale = float(np.max(np.abs(small.astype(np.float64)), initial=0.0)) or 1.0
    for offset in itertools.product(*(range(e + 1) for e in extra)):
        inner = (slice(None), slice(None), *(slice(o, o + n) for o, n in zip(offset, small.shape[2:])))
        crop = big[inner]
        if float(np.max(np.abs(crop.astype(np.float64) - small), initial=0.0)) > tol * scale:
            continue
        border = big.copy()
        border[inner] = 0
        if not np.any(border):
            return tuple((o, e - o) for o, e in zip(offset, extra))
    pads = []
    for axis, e in enumerate(extra):
        moved = np.moveaxis(big, 2 + axis, 0).reshape(big.shape[2 + axis], -1)
        zero = ~np.any(moved, axis=1)
        lead = int(np.argmin(zero)) if not zero.all() else e
        pads.append((min(lead, e), e - min(lead, e)))
    return tuple(pads)


def _crop(rec: Linear, pads: tuple[tuple[int, int], ...], own: tuple[tuple[int, int], ...]) -> Linear:
    """``rec`` as a conv reading the map before a pad layer added ``pads``: that padding merged into its own."""
    import dataclasses

    xc = rec.layout.to_canonical(rec.x)
    inner = (slice(None), slice(None), *(slice(b, n - a) for (b, a), n in zip(pads, xc.shape[2:])))
    cropped = np.ascontiguousarray(xc[inner])
    layout = Layout(tuple(int(n) for n in cropped.shape[1:]), letters=rec.layout.letters)
    merged = tuple((b + ob, a + oa) for (b, a), (ob, oa) in zip(pads, own))
    config = {**rec.config, "padding": merged if any(b != a for b, a in merged) else tuple(b for b, _ in merged),
              "pad_layer": pads}
    return dataclasses.replace(rec, x=layout.from_canonical(cropped), layout=layout, config=config)


def _pad_native(x: np.ndarray, layout: Layout, pads: tuple[tuple[int, int], ...]) -> np.ndarray:
    xc = np.pad(layout.to_canonical(x), [(0, 0), (0, 0), *pads])
    return Layout(tuple(int(n) for n in xc.shape[1:]), letters=layout.letters).from_canonical(xc)


def _merge_pads(s: Linear, c: Linear, dtype: str) -> tuple[Linear, Linear, tuple | None, str]:
    """A pad layer before one side's conv merged into that conv, so the two convs read the same map.

    Returns (source, converted, the pads to apply before replaying the converted layer, a note).
    """
    if s.kind not in ("conv", "depthwise") or c.kind not in ("conv", "depthwise"):
        return s, c, None, ""
    a, b = s.layout, c.layout
    if a is None or b is None or a.is_flat or b.is_flat or len(a.map_shape) != len(b.map_shape) \
            or a.map_shape[0] != b.map_shape[0] or a.map_shape == b.map_shape:
        return s, c, None, ""
    tol = boundary_tolerance(dtype)
    xs, xc = a.to_canonical(s.x), b.to_canonical(c.x)
    if all(m >= n for m, n in zip(b.map_shape[1:], a.map_shape[1:])):  # the converted graph pads before its conv
        pads = _find_pads(xc, xs, tol)
        if pads is None:
            return s, c, None, ""
        own = spec_of(c, "converted layer").pads()
        return s, _crop(c, pads, own), pads, f"converted graph pads {pads} (before, after) before {c.name}: merged into it"
    if all(m <= n for m, n in zip(b.map_shape[1:], a.map_shape[1:])):  # the source graph does
        pads = _find_pads(xs, xc, tol)
        if pads is None:
            return s, c, None, ""
        own = spec_of(s, "source layer").pads()
        return _crop(s, pads, own), c, None, f"source graph pads {pads} (before, after) before {s.name}: merged into it"
    return s, c, None, ""


def _padding_mistake(s_spec: LayerSpec, c_spec: LayerSpec) -> tuple[str, str]:
    """(mistake, detail) where two convs pad differently, else ("", "")."""
    if not isinstance(s_spec, ConvSpec) or not isinstance(c_spec, ConvSpec) or s_spec.pads() == c_spec.pads():
        return "", ""
    sp, cp = s_spec.pads(), c_spec.pads()
    same_total = all(x + y == u + v for (x, y), (u, v) in zip(sp, cp))
    name = "pad on the wrong side" if same_total else "padding differs"
    return name, (f"the source pads {sp} (before, after) per spatial axis, the converted layer (with any pad layer "
                  f"before it) pads {cp}")


def _replay_inputs(s: Linear, c: Linear, row: LayerRow, dtype: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(the source's input canonical, that input as the converted layer reads it), the row recording how the
    converted graph's own input compares; None where the input cannot be brought over (the row says why)."""
    try:
        xc, x_replay = _bring(s, c)
    except EquivcheckError as exc:
        row.diagnosis, row.mistake = str(exc), "input shape"
        return None
    row.boundary_ok, row.boundary = _boundary(s, c, x_replay, dtype)
    return xc, x_replay


def _kind(s: Linear, c: Linear) -> str:
    return s.kind if s.kind == c.kind else f"{s.kind} → {c.kind}"


def _accumulations(s_spec: LayerSpec, c_spec: LayerSpec, src: Adapter, dst: Adapter, dtype: str) -> tuple[str, str]:
    """How each side sums, from the probe (float32: the comparator's own default, widened where TF32 is on)."""
    if dtype == "float32":
        return "", ""
    from equivcheck.backends.probe import probe

    out = []
    for adapter, spec in ((src, s_spec), (dst, c_spec)):
        facts = probe(adapter.backend, spec, dtype)
        out.append(facts.accumulate if facts.runs and facts.accumulate else dtype)
    return out[0], out[1]


def _check_norm(s: Linear, c: Linear, dst: Adapter, dtype: str, failed_before: bool, seed: int) -> LayerRow:
    """A norm layer pair: the converted layer alone on the source's input and on designed data, against the
    float64 reference from the source's parameters (:mod:`equivcheck.modelcheck.norms`)."""
    from equivcheck.modelcheck.norms import designed_input, diagnose_norm, judge_norm, momentum_note, reference

    row = LayerRow(s.name, c.name, _kind(s, c), dtype, "fail")
    inputs = _replay_inputs(s, c, row, dtype)
    if inputs is None:
        return row
    xc, x_replay = inputs
    designed = designed_input(xc, seed)
    try:
        y_c = c.layout.to_canonical(dst.replay(c, x_replay)).reshape(xc.shape)
        y_d = c.layout.to_canonical(dst.replay(c, c.layout.from_canonical(designed))).reshape(xc.shape)
    except (EquivcheckError, ValueError) as exc:
        row.diagnosis, row.mistake = str(exc), "replay"
        return row
    exact, mag, n = reference(s.kind, xc, s.kernel, s.bias, s.config)
    row.comparison = judge_norm(y_c, exact, mag, n, dtype)
    exact_d, mag_d, _ = reference(s.kind, designed, s.kernel, s.bias, s.config)
    on_designed = judge_norm(y_d, exact_d, mag_d, n, dtype)
    mistake, detail = diagnose_norm(s.kind, s.kernel, s.bias, s.config, c.kernel, c.bias, c.config, dtype)
    if not row.comparison.passed or not on_designed.passed:
        if row.comparison.passed:
            row.comparison = on_designed
            row.notes.append("fails on designed data only: the captured activations leave channels unexercised")
        row.mistake, row.diagnosis = mistake, f"{mistake}: {detail}"
        if not row.boundary_ok and not failed_before:
            row.notes.append(f"input: {row.boundary}")
        return row
    own = judge_norm(s.layout.to_canonical(s.y).reshape(xc.shape), exact, mag, n, dtype) if s.y.size else None
    if own is not None and not own.passed:
        row.verdict = "inconclusive"
        row.notes.append(f"the source layer's own output is not the {s.kind} its parameters describe (error/bound "
                         f"{own.max_error_ratio:.3g}): the reference cannot be trusted")
        return row
    if row.settle_input(failed_before):
        return row
    row.verdict = "pass"
    if mistake != "weights right, output differs":
        row.notes.append(f"{mistake} ({detail}), but the outputs agree within rounding")
    note = momentum_note(s.config, c.config)
    if note:
        row.notes.append(note)
    return row


def _check_pair(s: Linear, c: Linear, src: Adapter, dst: Adapter, dtype: str, failed_before: bool,
                mutants: bool, seed: int = 0) -> LayerRow:
    from equivcheck.modelcheck.norms import NORMS
    from equivcheck.modelcheck.sequence_pairs import SEQUENCE_KINDS, check_sequence_pair

    if s.kind in NORMS:
        return _check_norm(s, c, dst, dtype, failed_before, seed)
    if s.kind in SEQUENCE_KINDS:
        return check_sequence_pair(s, c, dtype, failed_before, mutants, seed, boundary=boundary_tolerance(dtype))
    row = LayerRow(s.name, c.name, _kind(s, c), dtype, "fail")
    try:
        s, c, c_pads, pad_note = _merge_pads(s, c, dtype)
    except EquivcheckError as exc:
        row.diagnosis = str(exc)
        return row
    if pad_note:
        row.notes.append(pad_note)
    s, c, assumed = _assume_flatten(s, c)
    if assumed:
        row.notes.append(assumed)
    try:
        s_spec = spec_of(s, "source layer")
        c_spec = spec_of(c, "converted layer")
    except EquivcheckError as exc:
        row.diagnosis = str(exc)
        return row
    row.source_spec, row.converted_spec = spec_to_dict(s_spec), spec_to_dict(c_spec)
    try:
        from equivcheck.planning import plan

        row.mapping = plan(s_spec, c_spec).simplify().code("numpy")
    except EquivcheckError:
        pass
    inputs = _replay_inputs(s, c, row, dtype)
    if inputs is None:
        return row
    xc, x_replay = inputs
    pad_mistake = _padding_mistake(s_spec, c_spec)
    try:
        y_c = canonical_output(dst.replay(c, x_replay if c_pads is None else _pad_native(x_replay, c.layout, c_pads)),
                               c_spec)
    except EquivcheckError as exc:
        row.diagnosis, row.mistake = str(exc), "replay"
        return row
    if pad_mistake[0] and y_c.shape != canonical_output(s.y, s_spec).shape:
        row.mistake, row.diagnosis = pad_mistake[0], f"{pad_mistake[0]}: {pad_mistake[1]}"
        return row
    y_s = canonical_output(s.y, s_spec)
    if y_c.shape != y_s.shape and y_c.size == y_s.size:
        y_c, y_s = y_c.reshape(len(y_c), -1), y_s.reshape(len(y_s), -1)
    mag = canonical_output(magnitude(s_spec, s.kernel, s.bias, s.x, src.magnitude_backend()), s_spec)
    mag = mag.reshape(y_s.shape)
    fan = max(1, min(_fan_in(s_spec), int(np.count_nonzero(s.x.reshape(len(s.x), -1), axis=1).max(initial=1))))
    sums = _accumulations(s_spec, c_spec, src, dst, dtype)
    try:
        row.comparison = judge(y_c, y_s, mag, s.bias, dtype=dtype, fan=fan, accumulate=sums)
    except EquivcheckError as exc:
        row.diagnosis, row.mistake = str(exc), "output shape"
        return row
    if not row.comparison.passed and pad_mistake[0]:
        row.mistake, row.diagnosis = pad_mistake[0], f"{pad_mistake[0]}: {pad_mistake[1]}"
        return row
    if not row.comparison.passed:
        found = diagnose_pair(s_spec, c_spec, s.kernel, s.bias, c.kernel, c.bias)
        row.mistake = found["mistake"]
        row.diagnosis = f"{found['mistake']}: {found['detail']}" if found["detail"] else found["mistake"]
        row.mapping = found.get("code") or row.mapping
        if row.mapping:
            why = _mapping_fails(s, s_spec, c_spec, xc, y_s, mag, fan, dtype, src)
            if why:
                row.notes.append(f"no right mapping offered: {why}")
                row.mapping = ""
        from equivcheck.modelcheck.readout import kernel_readout  # a picture's data: numpy only, bounded in size

        row.readout = kernel_readout(s_spec, c_spec, s.kernel, c.kernel)
        if not row.boundary_ok and not failed_before:
            row.notes.append(f"input: {row.boundary}")
        return row
    if row.settle_input(failed_before):
        return row
    row.verdict = "pass"
    if mutants:
        missed, skipped = unrejected_mutants(s_spec, c_spec, s.kernel, s.bias, xc, y_s, dtype, fan, accumulate=sums)
        if missed and c_pads is None and "pad_layer" not in s.config:
            designed = _on_designed_data(s, c, s_spec, c_spec, src, dst, dtype)
            if designed is not None:
                missed = [m for m in missed if m in designed]
                row.notes.append("the captured input leaves weights unexercised (sparse or dead activations): the "
                                 "layer was also replayed on designed data")
        if missed:
            row.verdict = "inconclusive"
            why = f"these wrong conversions would also pass on this data: {', '.join(missed)}"
            if not np.any(xc):
                why += (" (its captured input is all zero, a dead map: no weight of it is exercised, and the order "
                        "the map is flattened in cannot be read off)")
            row.notes.append(why)
        if skipped:  # a pass is a proof: a mutant that was not judged leaves the row open
            row.verdict = "inconclusive"
            row.notes.extend(skipped)
    return row


def _run_spec(spec: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray, dtype: str,
              backend: str) -> np.ndarray:
    """A fresh ``spec`` layer of ``backend`` with these weights on ``x`` (native layout), its output canonical."""
    from equivcheck import backends

    layer = backends.get(backend).build(spec, dtype)
    layer.set_weights(kernel, bias)
    return canonical_output(np.asarray(layer(x)), spec)


def _replay_backend(src: Adapter) -> str:
    return "torch" if src.magnitude_backend() in ("torch", "onnxruntime") and _has_torch() else "numpy"


def _has_torch() -> bool:
    import sys

    return "torch" in sys.modules


def _spec_input(xc: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """What a backend layer of ``spec`` reads, from the canonical ``(N, C, *spatial)`` (or ``(N, F)``) input."""
    if isinstance(spec, DenseSpec) and not spec.spatial:
        return np.ascontiguousarray(xc.reshape(len(xc), -1))
    return _from_canonical(xc, spec.data_format)


def _flat_input(xc: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """The input :func:`magnitude` reads: a dense layer's features in its flatten order, a conv's native map."""
    if isinstance(spec, DenseSpec):
        if not spec.spatial:
            return xc.reshape(len(xc), -1)
        return Layout((spec.channels, *spec.spatial), flatten=spec.flatten or spec.map_letters).from_canonical(xc)
    return _from_canonical(xc, spec.data_format)


def _mapping_fails(s: Linear, s_spec: LayerSpec, c_spec: LayerSpec, xc: np.ndarray, y_s: np.ndarray,
                   mag: np.ndarray, fan: int, dtype: str, src: Adapter) -> str:
    """Why the planned mapping would not fix the converted layer ("" where it would): it is re-run, as the
    converted layer, on the captured input and on designed data that exercises every weight."""
    from equivcheck.data import sample_inputs
    from equivcheck.planning import plan

    backend = _replay_backend(src)
    try:
        kernel = plan(s_spec, c_spec).apply(np.ascontiguousarray(s.kernel))
        y = _run_spec(c_spec, kernel, s.bias, _spec_input(xc, c_spec), dtype, backend).reshape(y_s.shape)
        if not judge(y, y_s, mag, s.bias, dtype=dtype, fan=fan).passed:
            return "the planned mapping does not pass either when the layer is re-run with it"
        xd = sample_inputs(s_spec, 2, dtype, np.random.default_rng(1), layout="canonical")
        ref = _run_spec(s_spec, s.kernel, s.bias, _spec_input(xd, s_spec), dtype, backend)
        got = _run_spec(c_spec, kernel, s.bias, _spec_input(xd, c_spec), dtype, backend).reshape(ref.shape)
        mag_d = canonical_output(magnitude(s_spec, s.kernel, s.bias, _flat_input(xd, s_spec), backend), s_spec)
        if not judge(got, ref, mag_d.reshape(ref.shape), s.bias, dtype=dtype, fan=_fan_in(s_spec)).passed:
            return "the planned mapping fails on designed data that exercises every weight"
    except (EquivcheckError, ValueError, TypeError) as exc:
        return f"it could not be re-run ({str(exc).splitlines()[0][:120]})"
    return ""


def _on_designed_data(s: Linear, c: Linear, s_spec: LayerSpec, c_spec: LayerSpec, src: Adapter, dst: Adapter,
                      dtype: str) -> list[str] | None:
    """Both layers replayed on designed data (every weight exercised): the mutants that pass there too, or None
    where the converted layer does not pass on it (the captured data stays the evidence)."""
    from equivcheck.data import sample_inputs

    try:
        xd = sample_inputs(s_spec, 2, dtype, np.random.default_rng(2), layout="canonical")
        xd = xd.reshape(len(xd), *s.layout.map_shape)
        y_s = canonical_output(src.replay(s, s.layout.from_canonical(xd)), s_spec)
        y_c = canonical_output(dst.replay(c, c.layout.from_canonical(xd)), c_spec).reshape(y_s.shape)
        mag = canonical_output(magnitude(s_spec, s.kernel, s.bias, s.layout.from_canonical(xd),
                                         src.magnitude_backend()), s_spec).reshape(y_s.shape)
        fan = max(1, min(_fan_in(s_spec), int(np.count_nonzero(xd.reshape(len(xd), -1), axis=1).max(initial=1))))
        if not judge(y_c, y_s, mag, s.bias, dtype=dtype, fan=fan).passed:
            return None
        missed, _ = unrejected_mutants(s_spec, c_spec, s.kernel, s.bias, xd, y_s, dtype, fan)
    except (EquivcheckError, ValueError):
        return None
    return missed


def _fan_in(spec: LayerSpec) -> int:
    from equivcheck.specs import fan_in

    return fan_in(spec)


# -- the check ---------------------------------------------------------------------------------
def _cast(adapter: Adapter, model: Any, dtype: str, role: str) -> Adapter:
    if adapter.dtype == dtype:
        return adapter
    recast = adapter.cast(dtype)
    if recast is not None:
        adapter.close()
        return adapter_for(recast, role)
    raise ModelError(f"the {role} {adapter.label} model {adapter.name!r} computes in {adapter.dtype}: dtypes={dtype!r} "
                     f"needs {adapter.recast.format(dtype)} ({adapter.label} models are checked in their own dtype)")


def check_models(source: Any, converted: Any, *, input_shape: Sequence[int] | None = None,
                 dtypes: Sequence[str] = ("float32",), seed: int = 0, mutants: bool = True) -> ModelCheck:
    """Check ``converted`` against ``source`` layer by layer; see :mod:`equivcheck.modelcheck`.

    ``input_shape`` is the *source* model's input, batch first (``(N, C, H, W)`` for torch,
    ``(N, H, W, C)`` for a channels-last Keras model); it defaults to the size a model records
    (Keras models, or a torch module's ``input_shape`` attribute), batch 2. ``dtypes`` are run one
    after the other (torch models are cast to each; Keras models must compute in it).
    ``mutants=False`` skips showing that the data would reject each plausible wrong conversion.
    Raises :class:`~equivcheck.errors.EquivcheckError` (one line) for models that cannot be
    checked; a wrong conversion is a ``fail`` verdict, never an exception.
    """
    from equivcheck.backends.base import np_dtype

    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    dtypes = tuple(dtypes)
    if not dtypes:
        raise SpecError("dtypes=() is empty: expected e.g. ('float32',)")
    for d in dtypes:
        np_dtype(d)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(f"seed={seed!r} is not valid: expected a non-negative integer")
    base_src, base_dst = adapter_for(source, "source"), adapter_for(converted, "converted")
    result = ModelCheck(f"{base_src.framework} {base_src.name}", f"{base_dst.framework} {base_dst.name}", "pass",
                        dtypes=dtypes, seed=seed)
    result._models = {"source": source, "converted": converted, "mutants": mutants, "recheck": check_models}
    try:
        shape = _batch_shape(input_shape, base_src, base_dst)
        for side in (base_src, base_dst):
            fixed = side.fixed_batch()
            if fixed is not None and fixed != shape[0]:
                shape = (fixed, *shape[1:])
                result.notes.append(f"the {side.role} {side.label} model {side.name} fixes its batch at {fixed}: "
                                    f"checked with batch {fixed}")
        result.input_shape = shape
        for dtype in dtypes:
            src, dst = _cast(base_src, source, dtype, "source"), _cast(base_dst, converted, dtype, "converted")
            try:
                _check_dtype(result, src, dst, shape, dtype, seed, mutants)
            finally:
                if src is not base_src:
                    src.close()
                if dst is not base_dst:
                    dst.close()
        result.notes = list(dict.fromkeys([*base_src.notes, *base_dst.notes, *result.notes]))
    finally:
        base_src.close()
        base_dst.close()
    _decide(result)
    from equivcheck.modelcheck.listen import notify

    notify(result)
    return result


def _check_dtype(result: ModelCheck, src: Adapter, dst: Adapter, shape: tuple[int, ...], dtype: str, seed: int,
                 mutants: bool) -> None:
    x_src, x_dst = _inputs(shape, src, dst, dtype, seed)
    y_src, recs_s = src.run(x_src)
    y_dst, recs_c = dst.run(x_dst, outputs=False)
    if not recs_s:
        raise ModelError(f"the source model {src.name} ran no linear layer (Linear/Dense/Conv*/ConvTranspose*/Depthwise): "
                         "nothing to check layer by layer")
    pairs, lone_s, lone_c = pair_layers(recs_s, recs_c)
    if not pairs:
        raise ModelError(
            f"no linear layer of the converted model pairs with one of the source's (same kind and weight count): source "
            f"{', '.join(f'{r.name} ({r.kind}, {r.weights})' for r in recs_s[:6])}; converted "
            f"{', '.join(f'{r.name} ({r.kind}, {r.weights})' for r in recs_c[:6]) or 'none'}")
    if dtype == result.dtypes[0]:
        result.unpaired = [_lone("source", r) for r in lone_s] + [_lone("converted", r) for r in lone_c] + \
                          [_unchecked("source", o) for o in src.others] + [_unchecked("converted", o) for o in dst.others]
    failed = False
    prev: tuple[int, int] = (-1, -1)
    lone_bn = {r.index: r for r in lone_s if r.kind == "batchnorm"}
    lone_bn_c = {r.index: r for r in lone_c if r.kind == "batchnorm"}
    folded: set[str] = set()
    folded_c: set[str] = set()
    for s, c in pairs:
        row = _check_pair(s, c, src, dst, dtype, failed, mutants, seed)
        bn = lone_bn.get(s.index + 1)
        if row.verdict == "fail" and bn is not None and (fused := _fold(s, bn)) is not None:
            alt = _check_pair(fused, c, src, dst, dtype, failed, mutants, seed)
            if alt.verdict != "fail":
                row = alt
                row.notes.insert(0, f"the converter folded source batch norm {bn.name} into {c.name}: checked as "
                                    f"{s.name} + {bn.name} ↔ {c.name}")
                folded.add(bn.name)
            else:
                row.notes.append(f"source batch norm {bn.name} right after {s.name} has no partner: dropped by the "
                                 "converter, or folded into this layer wrongly")
        cbn = lone_bn_c.get(c.index + 1)
        if row.verdict == "fail" and bn is None and cbn is not None \
                and (fused := _fold(c, cbn, checked=False)) is not None:
            alt = _check_pair(s, fused, src, _Then(dst, fused.name, c, cbn), dtype, failed, mutants, seed)
            if alt.verdict != "fail":
                row = alt
                row.notes.insert(0, f"the source's {s.name} is the converted {c.name} with batch norm {cbn.name} "
                                    f"folded in: checked as {s.name} ↔ {c.name} + {cbn.name}")
                folded_c.add(cbn.name)
        row.position = (s.index, c.index)
        between = [f"source {r.name}" for r in lone_s if prev[0] < r.index < s.index] + \
                  [f"converted {r.name}" for r in lone_c if prev[1] < r.index < c.index]
        if between and row.mistake == "graph":
            row.diagnosis += f" (unpaired layers run before it: {', '.join(between)})"
        prev = (s.index, c.index)
        result.layers.append(row)
        failed = failed or row.verdict == "fail"
    if (folded or folded_c) and dtype == result.dtypes[0]:
        result.unpaired = [u for u in result.unpaired if not (u.model == "source" and u.name in folded)
                           and not (u.model == "converted" and u.name in folded_c)]
    y_dst_src = _output_to_source(y_dst, y_src, src, dst)
    err, rel = _relative(y_dst_src, y_src)
    tol = end_to_end_tolerance(dtype)
    result.end_to_end[dtype] = {"max_abs_error": err, "max_rel_error": rel, "tolerance": tol, "passed": rel <= tol}


class _Then:
    """An adapter whose layer ``name`` replays as ``layer`` then ``bn`` (a conv and the batch norm after it)."""

    def __init__(self, adapter: Adapter, name: str, layer: Linear, bn: Linear) -> None:
        self._adapter, self._name, self._layer, self._bn = adapter, name, layer, bn

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._adapter, attr)

    def replay(self, layer: Linear, x: np.ndarray) -> np.ndarray:
        if layer.name != self._name:
            return self._adapter.replay(layer, x)
        return self._adapter.replay(self._bn, self._adapter.replay(self._layer, x))


def _fold(layer: Linear, bn: Linear, *, checked: bool = True) -> Linear | None:
    """``layer`` followed by batch norm ``bn`` as one layer (the norm folded into its kernel and bias), or None
    where ``bn`` does not read exactly what ``layer`` computed (``checked``: from the captured values) or the
    kernel has no output axis to scale."""
    import dataclasses

    layout = layer.config.get("kernel_layout", "")
    if layer.kind not in ("dense", "conv", "depthwise") or "O" not in layout:
        return None
    if checked and (not layer.y.size or layer.y.shape != bn.x.shape or not np.array_equal(layer.y, bn.x)):
        return None
    if not checked and bn.x.shape != (len(bn.x), *_output_shape(layer)):
        return None
    cfg = bn.config
    f64 = np.float64
    scale = np.asarray(bn.kernel, f64).reshape(-1) / np.sqrt(np.asarray(cfg["var"], f64).reshape(-1) + cfg["eps"])
    axis = layout.index("O")
    if layer.kernel.shape[axis] != scale.size:
        return None
    shape = [1] * layer.kernel.ndim
    shape[axis] = -1
    kernel = (np.asarray(layer.kernel, f64) * scale.reshape(shape)).astype(layer.kernel.dtype)
    bias = np.zeros(scale.size) if layer.bias is None else np.asarray(layer.bias, f64)
    beta = np.zeros(scale.size) if bn.bias is None else np.asarray(bn.bias, f64)
    bias = ((bias - np.asarray(cfg["mean"], f64).reshape(-1)) * scale + beta).astype(layer.kernel.dtype)
    return dataclasses.replace(layer, name=f"{layer.name}+{bn.name}", kernel=kernel, bias=bias, y=bn.y)


def _output_shape(layer: Linear) -> tuple[int, ...]:
    """The shape (after the batch) of ``layer``'s output, in its own layout, from its spec."""
    spec = spec_of(layer)
    if isinstance(spec, DenseSpec):
        return (spec.units,)
    out = (spec.out_channels, *spec.output_spatial)
    return out if spec.data_format != CHANNELS_LAST else (*out[1:], out[0])


def _lone(model: str, r: Linear) -> Unpaired:
    """A captured layer without a partner; a recurrent or attention layer by its class and all its parameters."""
    return Unpaired(model, r.name, r.config.get("class", r.kind), r.config.get("params", r.weights), after=r.index)


def _unchecked(model: str, other: Other) -> Unpaired:
    if other.why:
        return Unpaired(model, other.name, other.kind, other.weights, other.why, after=other.after)
    why = f"no pairing rule checks a {other.kind}"
    if other.after < 0 and other.kind != "module":
        why += " (it did not run on the check's input)"
    return Unpaired(model, other.name, other.kind, other.weights, why, after=other.after)


def _before(result: ModelCheck, row: LayerRow | None) -> list[Unpaired]:
    """Unchecked layers that ran before ``row`` (every one that ran, for ``None``: the end of the models)."""
    out = []
    for u in result.unchecked:
        if u.after < 0:
            continue
        at = None if row is None else row.position[0 if u.model == "source" else 1]
        if at is None or u.after <= at:
            out.append(u)
    return out


def _output_to_source(y_dst: np.ndarray, y_src: np.ndarray, src: Adapter, dst: Adapter) -> np.ndarray:
    if y_dst.shape == y_src.shape and (y_dst.ndim <= 2 or src.data_format == dst.data_format):
        return y_dst
    if y_dst.ndim > 2 and src.data_format != dst.data_format:
        moved = _from_canonical(_to_canonical(y_dst, dst.data_format), src.data_format)
        if moved.shape == y_src.shape:
            return moved
    if y_dst.size == y_src.size:
        return y_dst.reshape(y_src.shape)
    return y_dst


def _decide(result: ModelCheck) -> None:
    first = result.first_divergence
    if first is not None:
        result.verdict = "fail"
        result.reason = f"first divergence: {first.headline()}"
        suspects = _before(result, first) if first.mistake in ("graph", "input shape") else []
        if suspects:
            result.likely_cause = _suspects(suspects, f"{first.converted} is right on its partner's input but the "
                                                      "converted graph feeds it another")
            result.reason += f"; likely cause: {result.likely_cause}"
        return
    bad = [d for d, e in result.end_to_end.items() if not e["passed"]]
    if bad:
        e = result.end_to_end[bad[0]]
        result.verdict = "fail"
        result.reason = (f"the final outputs differ ({bad[0]}: max relative error {e['max_rel_error']:.3g} > "
                         f"{e['tolerance']:.3g}) though every paired layer passed: the difference is outside the "
                         "paired linear layers (activations, pooling, normalisation, unpaired layers)")
        suspects = _before(result, None) or result.unchecked
        if suspects:
            result.likely_cause = _suspects(suspects, "every checked pair passed")
            result.reason += f"; likely cause: {result.likely_cause}"
        return
    if result.unchecked:
        result.verdict = "inconclusive"
        result.reason = (f"not every parameter was checked: {len(result.unchecked)} layer(s) with parameters are in no "
                         "checked pair: " + "; ".join(str(u) for u in result.unchecked))
        return
    weak = [row for row in result.layers if row.verdict == "inconclusive"]
    if weak:
        result.verdict = "inconclusive"
        result.reason = f"{weak[0].label}: {weak[0].notes[-1]}"
        return
    result.verdict = "pass"
    result.reason = f"{len(result.layers)} layer pair(s) and the final outputs agree within their bounds; " \
                    "every layer with parameters was checked"


def _suspects(suspects: list[Unpaired], why: str) -> str:
    """The unchecked layer(s) nearest before a divergence, named first."""
    near = sorted(reversed(suspects), key=lambda u: -u.after)  # the nearest before the divergence first
    names = ", ".join(f"{u.model} {u.name} ({u.kind})" for u in near[:3])
    return f"the unchecked layer {names} ({why})" if len(near) == 1 else f"the unchecked layers {names} ({why})"
