"""Judge one replayed layer against its source partner; diagnose a failing pair from weights alone.

The reference is the source layer's own output on the same input (no float64 pass over a whole
model: that would cost more than the models). Both outputs are within :mod:`equivcheck.compare`'s
bound of the exact result, so they may differ by the sum of the two bounds; ``|W|·|x|`` comes
from one pass of the source layer on absolute values, through :mod:`equivcheck.backends`.
A failing pair is diagnosed without forward passes: the planned mapping, then each mutant of
:mod:`equivcheck.mutations`, then other flatten orders and kernel layouts, are applied to the
source kernel and compared exactly with the converted kernel. The mutants of a pair that passed are
judged by the judge's own engine (:func:`equivcheck.judge.replayed_mutants`).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

from equivcheck._copy import cores, on_cores
from equivcheck.compare import (
    Comparison,
    accumulation_dtype,
    growth_factor,
    output_floor,
    reduced_precision_matmul,
    unit_roundoff,
)
from equivcheck.errors import EquivcheckError
from equivcheck.planning import plan
from equivcheck.specs import CHANNELS_LAST, ConvSpec, DenseSpec, LayerSpec, fan_in

try:  # optional: built at install where a C compiler is there
    from equivcheck import _fastjudge
except ImportError:
    _fastjudge = None

__all__ = ["canonical_output", "diagnose_pair", "judge", "magnitude", "unrejected_mutants"]

#: Outputs judged at a time (a block that stays in cache through the dozen passes of the bound).
JUDGE_BLOCK = 1 << 15
#: Outputs one thread judges at a time (and the fewest worth a second thread).
JUDGE_TASK = 1 << 19
#: Elements a channels-last output is moved to channels first at a time (a tile that stays in cache).
TRANSPOSE_TILE = 1 << 14
#: Kernel elements |W| is taken of at a time for a dense layer's |W|·|x| (a buffer that stays in cache; larger
#: blocks cost several times more: fc6's |W|·|x| took 0.9 s in blocks of 4M, 0.15 s in blocks of 256K).
MAGNITUDE_BLOCK = 1 << 18
#: The longest sum a dense |W|·|x| leaves to one matmul. A sum of n non-negative float32 terms, in any order, is
#: within (n - 1)·u of the exact one: inputs taken this many at a time, the blocks then added, keep every sum's
#: rounding (CHAIN + n / CHAIN)·u below the judge's 1e-3 headroom on |W|·|x| for any fan-in up to 10^7.
MAGNITUDE_CHAIN = 8192
#: Dense kernels from this many elements up take |W|·|x| on every lent core.
MAGNITUDE_THREADED = 1 << 22
#: Kernels larger than this are not searched over every layout when diagnosing.
SEARCH_MAX = 1 << 22


def canonical_output(y: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """``(N, out, *spatial)`` for a conv, ``(N, units)`` for a dense layer."""
    if isinstance(spec, ConvSpec) and spec.data_format == CHANNELS_LAST and y.ndim > 2:
        return np.moveaxis(y, -1, 1)
    return y


def magnitude(spec: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray, backend: str) -> np.ndarray:
    """``|W|·|x| + |b|`` per output element, in float32, in the spec's output layout."""
    from equivcheck import backends

    f32 = np.float32

    def absolute(a: np.ndarray) -> np.ndarray:  # an input after a ReLU is its own |x|: no copy
        if a.dtype != f32:
            return np.abs(a.astype(f32))
        return a if a.size and a.min() >= 0 else np.abs(a)

    ax = absolute(x)
    b = None if bias is None else absolute(bias)
    if isinstance(spec, DenseSpec):  # a matmul, |W| taken a cache-sized block at a time (fc6: 400 MB at once)
        y = _dense_magnitude(kernel, spec.kernel_layout == "IO", ax.reshape(len(ax), -1))
        return y if b is None else y + b
    k = absolute(kernel)
    layer = backends.get(backend).build(spec, "float32")
    layer.set_weights(k, b, copy=False)
    return np.asarray(layer(ax))


def _dense_magnitude(kernel: np.ndarray, io: bool, flat: np.ndarray) -> np.ndarray:
    """``|x|·|W|`` for a dense kernel (``io``: ``(in, out)``, else ``(out, in)``) and ``|x|`` ``(N, in)``, float32,
    |W| taken a contiguous block of rows at a time into one reused buffer, no sum longer than
    :data:`MAGNITUDE_CHAIN` (plus the blocks added) left to one matmul."""
    f32 = np.float32
    n_in, n_out = kernel.shape if io else kernel.shape[::-1]
    chunks = -(-n_in // MAGNITUDE_CHAIN)
    if io:  # blocks of inputs (rows), every output at once: each output sums its inputs block after block
        step = max(MAGNITUDE_BLOCK // max(n_out, 1), chunks, 1)
        buf = np.empty((min(step, n_in), n_out), f32)
        y = np.zeros((len(flat), n_out), f32)
        for start in range(0, n_in, step):
            part = kernel[start:start + step]
            block = buf[:len(part)]
            np.abs(part, out=block, casting="unsafe")
            y += flat[:, start:start + step] @ block
        return y
    # (out, in): blocks of outputs (rows, contiguous), their inputs split into at most CHAIN-long runs; the
    # blocks shared out among the lent cores (the same blocks, so the same sums, on any number of them)
    width = -(-n_in // chunks)
    rows = max(1, MAGNITUDE_BLOCK // width)
    xt = np.ascontiguousarray(flat.T, dtype=f32)
    yt = np.zeros((n_out, len(flat)), f32)
    starts = range(0, n_out, rows)

    def run(share: range) -> None:
        buf = np.empty((min(rows, n_out), width), f32)
        part_out = np.empty((len(buf), len(flat)), f32)
        for r0 in share:
            for c0 in range(0, n_in, width):
                part = kernel[r0:r0 + rows, c0:c0 + width]
                block = buf[:part.shape[0], :part.shape[1]]
                np.abs(part, out=block, casting="unsafe")
                if chunks == 1:
                    np.matmul(block, xt, out=yt[r0:r0 + rows])
                else:
                    out = part_out[:len(block)]
                    np.matmul(block, xt[c0:c0 + width], out=out)
                    yt[r0:r0 + rows] += out

    threads = min(cores(), len(starts)) if kernel.size >= MAGNITUDE_THREADED else 1
    if threads > 1:
        on_cores(run, [starts[k::threads] for k in range(threads)])
    else:
        run(starts)
    return np.ascontiguousarray(yt.T)


def _products(x: np.ndarray, spec: LayerSpec) -> int:
    """Non-zero products per output, at most: the fan-in, or fewer where the input is sparse."""
    nonzero = int(np.count_nonzero(x.reshape(len(x), -1), axis=1).max(initial=1))
    return max(1, min(fan_in(spec), nonzero))


def judge(actual: np.ndarray, reference: np.ndarray, mag: np.ndarray, bias: np.ndarray | None, *, dtype: str,
          fan: int, accumulate: tuple[str, str] = ("", "")) -> Comparison:
    """Compare ``actual`` with ``reference`` (both computed in ``dtype``) under the sum of their two bounds."""
    r = np.asarray(reference)
    reduced = reduced_precision_matmul() if dtype == "float32" else {}
    accs = []
    for acc in accumulate:
        acc = acc or accumulation_dtype(dtype)
        if reduced and acc == "float32":
            acc = "bf16x" if "bf16x" in reduced.values() else "tf32"
        accs.append(acc)
    if np.shape(actual) != r.shape:
        raise EquivcheckError(f"output shape={np.shape(actual)} does not match the source's {r.shape}")
    note = ", ".join(f"{k}: {v}" for k, v in sorted(reduced.items()))
    if r.size == 0:
        return Comparison(True, dtype, accs[0], fan, 0.0, 0.0, 0.0, 0.0, (), 0.0, 0, 0, note)
    # The sum of the two bounds (compare.error_bound), in float32 below float64 (a few float32 roundings off
    # a bound change nothing: the headroom on |W|·|x| is 1e-3), a cache-sized block of outputs at a time.
    work = np.float64 if dtype == "float64" else np.float32
    shape4 = r.shape if r.ndim > 1 else (1, *r.shape)
    n, c = shape4[0], shape4[1]
    r3, a3, m3 = (np.asarray(v).reshape(shape4) for v in (np.asarray(r, work), actual, mag))
    inner = math.prod(shape4[2:])
    b2 = None if bias is None else np.asarray(bias, work).reshape((-1, 1) if len(shape4) > 2 else (-1,))
    two_u = 2 * unit_roundoff(dtype)
    growth = (1 + 1e-3) * sum(growth_factor(acc, fan) for acc in accs)  # |W|·|x| summed in float32: headroom
    floor = 2 * output_floor(dtype)
    step = max(1, JUDGE_BLOCK // max(inner, 1))
    # (sample, channels) tasks of whole blocks: the compiled pass runs them on the cores the machine lends (it lets
    # go of the GIL); numpy's fifteen short passes a block run on one (two threads fought over the GIL: 0.17 s
    # against 0.09 s for VGG16's outputs). numpy makes a task's share contiguous once: a channels-last output
    # moved to channels first, read a channel at a time, would cost a cache line per element
    per_task = step * max(1, JUDGE_TASK // max(step * inner, 1))
    tasks = [(i, c0, min(c, c0 + per_task)) for i in range(n) for c0 in range(0, c, per_task)]

    fast = fastjudge() if work is np.float32 and a3.dtype == m3.dtype == np.float32 else None

    def run(task: tuple[int, int, int]) -> list[tuple[float, int, float, int, int, float, float]]:
        i, c0, c1 = task
        if fast is not None:  # one pass, the arrays read as they lie; a non-finite value: the numpy path below
            got = fast.judge_float32(*(v[i, c0:c1].reshape(c1 - c0, -1) if v.ndim > 2 else v[i, c0:c1, None]
                                       for v in (r3, a3, m3)), None if b2 is None else np.ascontiguousarray(b2[c0:c1].reshape(-1)),
                                     two_u, growth, floor, max(16, TRANSPOSE_TILE // (c1 - c0)))
            if got is not None:
                worst, at, bound_there, count, top, rel = got
                return [(worst, (i * c + c0) * inner + at, bound_there, count, 0, top, rel)]
        # (channels, positions) blocks: the bias broadcast along one long row per channel
        rs, as_, ms = (_contiguous(v[i, c0:c1]).reshape(c1 - c0, -1) if v.ndim > 2 else v[i, c0:c1] for v in (r3, a3, m3))
        found = []
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            for b0 in range(0, c1 - c0, step):
                rb, ab, mb = rs[b0:b0 + step], as_[b0:b0 + step], ms[b0:b0 + step]
                absr = np.abs(rb)
                bound = np.abs(rb - b2[c0 + b0:c0 + b0 + step]) if b2 is not None else absr.copy()
                bound += absr
                bound *= two_u
                bound += np.multiply(mb, growth, dtype=work)
                bound += floor
                err = np.subtract(ab, rb, dtype=work)
                np.abs(err, out=err)
                top = float(err.max())  # NaN wherever the reference or the output holds one
                bad_count = 0
                if not np.isfinite(top):  # NaN or Inf (rare): never passes
                    bad = ~np.isfinite(ab)
                    bad_count = int(np.count_nonzero(bad))
                    err[bad | np.isnan(rb)] = np.inf
                    top = math.inf
                ratio = err / bound
                k = int(np.argmax(ratio))
                worst = float(ratio.flat[k])
                count = 0 if worst <= 1.0 else int(np.count_nonzero(ratio > 1.0))  # argmax: the largest, or a NaN
                np.divide(err, absr, out=absr)  # the relative error, 0/0 read as 0
                rel = float(np.fmax.reduce(absr, axis=None))  # nanmax, without its warning on a block of 0/0
                found.append((worst, ((i * c + c0 + b0) * inner + k), float(bound.flat[k]), count, bad_count, top, rel))
        return found

    threaded = r.size >= JUDGE_TASK and fast is not None and cores() > 1 and len(tasks) > 1
    results = on_cores(run, tasks) if threaded else [run(t) for t in tasks]
    best = (-1.0, 0, 0.0)  # ratio, flat index, bound there
    out = nonfinite = 0
    max_err = max_rel = 0.0
    for worst, index, bound_there, count, bad_count, top, rel in itertools.chain.from_iterable(results):
        if worst > best[0] or best[0] < 0:
            best = (worst, index, bound_there)
        out += count
        nonfinite += bad_count
        max_err = max(max_err, top)
        max_rel = max_rel if math.isnan(rel) else max(max_rel, rel)
    worst_at = np.unravel_index(best[1], r.shape)
    return Comparison(nonfinite == 0 and out == 0, dtype, accs[-1], int(fan), max_err, max_rel, best[0], best[2],
                      tuple(int(i) for i in worst_at), out / r.size, nonfinite, int(r.size), note)


def fastjudge() -> Any:
    """The compiled judgement (``_fastjudge.c``), or None where it was not built or ``EQUIVCHECK_NO_FASTJUDGE`` is
    set (a fallback, never an error: the numpy path gives the same bits)."""
    return None if os.environ.get("EQUIVCHECK_NO_FASTJUDGE") else _fastjudge


def _contiguous(v: np.ndarray) -> np.ndarray:
    """``v`` ``(C, *spatial)`` C-contiguous; a channels-last map moved to channels first is transposed a tile at a
    time (numpy's own copy writes it an element per cache line: 6x slower for a 64-channel 224x224 map)."""
    if v.flags.c_contiguous or v.ndim < 2 or v.strides[0] != v.itemsize or v.shape[0] < 2:
        return np.ascontiguousarray(v)
    channels, positions = v.shape[0], math.prod(v.shape[1:])
    rows = np.moveaxis(v, 0, -1).reshape(positions, channels)  # (positions, C): channels adjacent in memory
    out = np.empty((channels, positions), v.dtype)
    tile = max(8, TRANSPOSE_TILE // channels)
    for p0 in range(0, positions, tile):
        out[:, p0:p0 + tile] = rows[p0:p0 + tile].T
    return out.reshape(v.shape)


# -- diagnosis -------------------------------------------------------------------------------
def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def diagnose_pair(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None,
                  new_kernel: np.ndarray, new_bias: np.ndarray | None) -> dict[str, str]:
    """What a converted layer's weights get wrong, from the weights alone.

    Keys: ``mistake`` (a short name), ``detail`` (one sentence), ``code`` (the right mapping of
    the source kernel, numpy), ``convention`` where a mutant matched.
    """
    try:
        right = plan(source, target)
    except EquivcheckError as exc:
        return {"mistake": "layer configuration differs", "detail": str(exc).split(": ", 1)[-1], "code": ""}
    code = right.simplify().code("numpy")
    kernel = np.asarray(kernel)
    new_kernel = np.asarray(new_kernel)
    if new_kernel.shape != target.kernel_shape:
        return {"mistake": "kernel shape", "detail": f"kernel shape {new_kernel.shape}, expected {target.kernel_shape}",
                "code": code}
    from equivcheck.identification import identify

    found = identify(source, target, new_kernel, new_bias, source_kernel=kernel, source_bias=bias)
    if found.exact:
        return {"mistake": "weights right, output differs",
                "detail": "the weights are the right mapping of the source's: the layer itself computes differently "
                          "(padding, stride, dtype or an op the framework adds)", "code": code}
    kernel_right = np.array_equal(right.apply(kernel).astype(new_kernel.dtype), new_kernel)
    if kernel_right:
        if found.mistakes:  # a bias in another order
            m = found.mistakes[0]
            return {"mistake": m.name, "detail": m.description, "code": code, "convention": str(m.convention)}
        if bias is None and new_bias is not None:
            return {"mistake": "bias added", "detail": "the source layer has no bias; the converted one adds a non-zero bias",
                    "code": code}
        return {"mistake": "wrong bias", "detail": "the kernel is right; the bias is not the source's", "code": code}
    if len(found.mistakes) == 1:
        m = found.mistakes[0]
        name, detail = _named(m, target)
        if str(m.convention) == "flatten order" and isinstance(target, DenseSpec) and target.rank:
            order = _read_as(source, target, kernel, new_kernel)
            if order:
                name, detail = f"wrong flatten order ({order} read as {target.flatten})", _flatten_detail(order, target)
        if found.problem:
            detail += f"; {found.problem}"
        return {"mistake": name, "detail": detail, "code": code, "convention": str(m.convention)}
    other = _search(source, target, kernel, new_kernel)
    if other:
        return {"mistake": other[0], "detail": other[1], "code": code}
    if new_kernel.size == kernel.size and np.array_equal(np.sort(kernel.astype(np.float64), axis=None),
                                                         np.sort(new_kernel.astype(np.float64), axis=None)):
        return {"mistake": "kernel rearranged wrongly", "detail": "the converted kernel holds the source's weights in an "
                "order no known convention or single mistake explains", "code": code}
    return {"mistake": "different weights", "detail": "the converted kernel is not a rearrangement of the source's "
            "(scaled, cast, fused with another layer or not loaded)", "code": code}


def _named(m: Any, target: LayerSpec) -> tuple[str, str]:
    """(the mistake's name, one sentence); a flatten order is named as what the kernel reads and the graph gives."""
    name = m.name.replace(" (target)", "").replace(" (source)", "")
    if str(m.convention) == "flatten order" and isinstance(target, DenseSpec) and "(source)" not in m.name:
        wrong = m.description.split("flattened as ")[-1].split(" instead")[0]
        return f"{name} ({wrong} read as {target.flatten})", _flatten_detail(wrong, target)
    return name, m.description


def _read_as(source: LayerSpec, target: DenseSpec, kernel: np.ndarray, new_kernel: np.ndarray) -> str:
    """The flatten order the converted dense kernel was made for (it reads the map in that order)."""
    letters = target.map_letters
    for order in sorted(("".join(p) for p in itertools.permutations(letters)),
                        key=lambda o: o not in (letters, letters[1:] + "C")):
        if order == target.flatten:
            continue
        try:
            got = plan(source, target.replace(flatten=order)).apply(kernel)
        except EquivcheckError:
            continue
        if np.array_equal(got.astype(new_kernel.dtype), new_kernel):
            return order
    return ""


def _flatten_detail(wrong: str, target: DenseSpec) -> str:
    text = f"the kernel reads the map as {wrong}, the graph flattens it as {target.flatten}"
    native = {"CHW", "HWC"} if target.rank == 2 else {target.map_letters, target.map_letters[1:] + "C"}
    if target.flatten not in native:
        text += f" (a permutation in the graph: permute the map to {wrong} before flattening, or map the kernel as below)"
    return text


def _search(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, new_kernel: np.ndarray) -> tuple[str, str] | None:
    """Another flatten order / kernel layout / flip of the target that the converted kernel follows exactly."""
    if kernel.size > SEARCH_MAX:
        return None
    if isinstance(target, DenseSpec):
        candidates = []
        letters = target.map_letters if target.rank else ""
        for order in itertools.permutations(letters) if letters else [""]:
            for layout in ("IO", "OI"):
                alt = target.replace(flatten="".join(order) or None, kernel_layout=layout)
                if alt == target:
                    continue
                candidates.append((alt, f"flatten {alt.flatten}, kernel {layout}"))
    else:
        candidates = []
        for layout in itertools.permutations(target.kernel_layout):
            for op in ("correlate", "convolve"):
                try:
                    alt = target.replace(kernel_layout="".join(layout), op=op)
                except EquivcheckError:
                    continue
                if alt != target:
                    candidates.append((alt, f"kernel {alt.kernel_layout}" + (", flipped" if op == "convolve" else "")))
    for alt, label in candidates:
        try:
            got = plan(source, alt).apply(kernel)
        except EquivcheckError:
            continue
        if got.size == new_kernel.size and np.array_equal(got.reshape(new_kernel.shape).astype(new_kernel.dtype), new_kernel):
            if isinstance(target, DenseSpec) and alt.flatten != target.flatten and alt.kernel_layout == target.kernel_layout:
                return (f"wrong flatten order ({alt.flatten} read as {target.flatten})",
                        _flatten_detail(alt.flatten, target))
            expected = target.flatten if isinstance(target, DenseSpec) else target.kernel_layout
            return ("other convention", f"the kernel follows {label}; this layer needs {expected}")
    return None


# -- mutants on the captured data ------------------------------------------------------------
def unrejected_mutants(source: LayerSpec, target: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None,
                       x_canonical: np.ndarray, y_source: np.ndarray | None, dtype: str, fan: int, *,
                       accumulate: tuple[str, str] = ("", "")) -> tuple[list[str], list[str]]:
    """(mutants that would pass on this data, why some were not judged), for a pair that passed: the judge's
    mutant engine (:func:`equivcheck.judge.replayed_mutants`) against both layers' bounds."""
    from equivcheck.judge import replayed_mutants

    try:
        plan(source, target)
    except EquivcheckError:
        return [], []
    outcomes, unjudged = replayed_mutants(source, target, kernel, bias, x_canonical, dtype=dtype, fan=fan,
                                          accumulate=accumulate)
    return [o.name for o in outcomes if o.outcome == "not rejected"], [unjudged] if unjudged else []
