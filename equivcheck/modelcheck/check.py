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

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError, SpecError
from equivcheck.modelcheck.adapters import Adapter, ModelError, adapter_for
from equivcheck.modelcheck.judge import canonical_output, diagnose_pair, judge, magnitude, unrejected_mutants
from equivcheck.modelcheck.layers import Layout, Linear, spec_of
from equivcheck.modelcheck.pairing import pair_layers
from equivcheck.modelcheck.result import LayerRow, ModelCheck, Unpaired
from equivcheck.serialize import spec_to_dict
from equivcheck.specs import CHANNELS_LAST, DenseSpec, LayerSpec

__all__ = ["DEFAULT_BATCH", "boundary_tolerance", "check_models", "end_to_end_tolerance"]

DEFAULT_BATCH = 2
_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}


def boundary_tolerance(dtype: str) -> float:
    """Largest relative difference at which two activations still count as the same (errors of earlier layers)."""
    return _TOLERANCE[dtype]


def end_to_end_tolerance(dtype: str) -> float:
    return _TOLERANCE[dtype]


def _relative(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, that relative to max |b|); inf where a holds NaN/Inf."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        return math.inf, math.inf
    if not np.all(np.isfinite(a64)):
        return math.inf, math.inf
    err = float(np.max(np.abs(a64 - b64), initial=0.0))
    scale = float(np.max(np.abs(b64), initial=0.0))
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else math.inf))


# -- inputs --------------------------------------------------------------------------------
def _batch_shape(input_shape: Any, src: Adapter, dst: Adapter) -> tuple[int, ...]:
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

    per = shape[1:]
    canon = (per[-1], *per[:-1]) if src.data_format == CHANNELS_LAST and len(per) > 1 else per
    spec = DenseSpec(channels=canon[0], spatial=canon[1:], units=1)
    rng = np.random.default_rng(seed)
    xc = sample_inputs(spec, shape[0], dtype, rng, nonzeros=math.prod(canon))
    x_src = _from_canonical(xc, src.data_format)
    x_dst = _from_canonical(xc, dst.data_format)
    want = dst.input_shape()
    if want is not None and tuple(x_dst.shape[1:]) != want:
        if tuple(x_src.shape[1:]) == want:
            x_dst = x_src
        else:
            raise SpecError(f"the inputs do not fit: the source reads {tuple(x_src.shape[1:])} per sample, the converted "
                            f"{dst.framework} model {dst.name} expects {want}")
    return x_src, x_dst


# -- one pair --------------------------------------------------------------------------------
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


def _check_pair(s: Linear, c: Linear, src: Adapter, dst: Adapter, dtype: str, failed_before: bool,
                mutants: bool) -> LayerRow:
    row = LayerRow(s.name, c.name, _kind(s, c), dtype, "fail")
    try:
        s_spec = spec_of(s, "source layer")
        c_spec = spec_of(c, "converted layer")
    except EquivcheckError as exc:
        row.diagnosis = str(exc)
        return row
    row.source_spec, row.converted_spec = spec_to_dict(s_spec), spec_to_dict(c_spec)
    try:
        from equivcheck.plan import plan

        row.mapping = plan(s_spec, c_spec).simplify().code("numpy")
    except EquivcheckError:
        pass
    try:
        xc, x_replay = _bring(s, c)
    except EquivcheckError as exc:
        row.diagnosis, row.mistake = str(exc), "input shape"
        return row
    row.boundary_ok, row.boundary = _boundary(s, c, x_replay, dtype)
    try:
        y_c = canonical_output(dst.replay(c, x_replay), c_spec)
    except EquivcheckError as exc:
        row.diagnosis, row.mistake = str(exc), "replay"
        return row
    y_s = canonical_output(s.y, s_spec)
    if y_c.shape != y_s.shape and y_c.size == y_s.size:
        y_c, y_s = y_c.reshape(len(y_c), -1), y_s.reshape(len(y_s), -1)
    mag = canonical_output(magnitude(s_spec, s.kernel, s.bias, s.x, src.magnitude_backend()), s_spec)
    mag = mag.reshape(y_s.shape)
    fan = max(1, min(_fan_in(s_spec), int(np.count_nonzero(s.x.reshape(len(s.x), -1), axis=1).max(initial=1))))
    try:
        row.comparison = judge(y_c, y_s, mag, s.bias, dtype=dtype, fan=fan,
                               accumulate=_accumulations(s_spec, c_spec, src, dst, dtype))
    except EquivcheckError as exc:
        row.diagnosis, row.mistake = str(exc), "output shape"
        return row
    if not row.comparison.passed:
        found = diagnose_pair(s_spec, c_spec, s.kernel, s.bias, c.kernel, c.bias)
        row.mistake = found["mistake"]
        row.diagnosis = f"{found['mistake']}: {found['detail']}" if found["detail"] else found["mistake"]
        row.mapping = found.get("code") or row.mapping
        from equivcheck.report.readout import kernel_readout  # a picture's data: numpy only, bounded in size

        row.readout = kernel_readout(s_spec, c_spec, s.kernel, c.kernel)
        if not row.boundary_ok and not failed_before:
            row.notes.append(f"input: {row.boundary}")
        return row
    if not row.boundary_ok:
        if failed_before:
            row.verdict = "pass"
            row.notes.append(f"input differs from the source's after an earlier failure: {row.boundary}")
            return row
        row.mistake = "graph"
        row.diagnosis = (f"the converted graph feeds {c.name} a different input than the source feeds {s.name}: "
                         f"{row.boundary}; the layer itself is right on the source's input")
        return row
    row.verdict = "pass"
    if mutants:
        missed, skipped = unrejected_mutants(s_spec, c_spec, s.kernel, s.bias, xc, y_s, dtype, fan)
        if missed:
            row.verdict = "inconclusive"
            row.notes.append(f"these wrong conversions would also pass on this data: {', '.join(missed)}")
        if skipped:
            row.notes.append(f"not replayed: {', '.join(skipped)}")
    return row


def _fan_in(spec: LayerSpec) -> int:
    from equivcheck.specs import fan_in

    return fan_in(spec)


# -- the check ---------------------------------------------------------------------------------
def _cast(adapter: Adapter, model: Any, dtype: str, role: str) -> Adapter:
    if adapter.dtype == dtype:
        return adapter
    if adapter.framework == "torch":
        import torch

        adapter.close()
        return adapter_for(copy.deepcopy(model).to(getattr(torch, dtype)), role)
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
    try:
        shape = _batch_shape(input_shape, base_src, base_dst)
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
        result.unpaired = [Unpaired("source", r.name, r.kind, r.weights) for r in lone_s] + \
                          [Unpaired("converted", r.name, r.kind, r.weights) for r in lone_c]
    failed = False
    prev: tuple[int, int] = (-1, -1)
    for s, c in pairs:
        row = _check_pair(s, c, src, dst, dtype, failed, mutants)
        between = [f"source {r.name}" for r in lone_s if prev[0] < r.index < s.index] + \
                  [f"converted {r.name}" for r in lone_c if prev[1] < r.index < c.index]
        if between and row.mistake == "graph":
            row.diagnosis += f" (unpaired layers run before it: {', '.join(between)})"
        prev = (s.index, c.index)
        result.layers.append(row)
        failed = failed or row.verdict == "fail"
    y_dst_src = _output_to_source(y_dst, y_src, src, dst)
    err, rel = _relative(y_dst_src, y_src)
    tol = end_to_end_tolerance(dtype)
    result.end_to_end[dtype] = {"max_abs_error": err, "max_rel_error": rel, "tolerance": tol, "passed": rel <= tol}


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
        return
    bad = [d for d, e in result.end_to_end.items() if not e["passed"]]
    if bad:
        e = result.end_to_end[bad[0]]
        result.verdict = "fail"
        result.reason = (f"the final outputs differ ({bad[0]}: max relative error {e['max_rel_error']:.3g} > "
                         f"{e['tolerance']:.3g}) though every paired layer passed: the difference is outside the "
                         "paired linear layers (activations, pooling, normalisation, unpaired layers)")
        return
    if result.unpaired:
        result.verdict = "inconclusive"
        result.reason = f"{len(result.unpaired)} layer(s) found no partner, so they were not checked: " + \
            "; ".join(str(u) for u in result.unpaired)
        return
    weak = [row for row in result.layers if row.verdict == "inconclusive"]
    if weak:
        result.verdict = "inconclusive"
        result.reason = f"{weak[0].label}: {weak[0].notes[-1]}"
        return
    result.verdict = "pass"
    result.reason = f"{len(result.layers)} layer pair(s) and the final outputs agree within their bounds"
