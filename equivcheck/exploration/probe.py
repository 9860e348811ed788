"""Probe one layer: which stored weight acts at each point of its canonical kernel.

Two strategies, each a fixed handful of forward calls whatever the kernel size:

``lines``
    Every weight is set to (a digit of) its own flat index + 1 — exact in the float type —
    and the bias to ``o + 1``. One batched call runs a zero map (which reads the bias) and
    one-hot maps, one per point on the canonical axis lines through the origin; each output
    channel then reads back the index of the single weight joining that input to it. The
    batch grows with the *sum* of the axis sizes (``1 + groups + in/groups + Σ(k - 1)``).
    A kernel whose indices need more digits than the float type holds exactly takes one call
    per digit (float32: 2 calls up to 2⁴⁴ weights; float64: always 1).

``selectors``
    For wide layers (VGG fc6 reads 25088 features): call A is ``lines`` for the output axis
    only (batch ``1 + groups``). It tells which stored weights belong to which output
    channel. Call B sets the weights to a *selector*: output ``o`` keeps weight ``ρ`` (the
    rest of the stored index once the output-channel digits are removed) for
    ``ρ ≡ o (mod out)``, scaled by ``S^(ρ // out)``, and zeroes all others; the input holds,
    at every kernel position, the digits of that position's own code. Each output then
    spells out the codes of the positions its kept weights act on, so a batch of a few
    digit-maps reads the whole input-side arrangement in one call.

Either way the result is the stored flat index at points on every axis line through the
origin, which :func:`equivcheck.exploration.atoms.mapping_from_lines` turns into the mapping, and
more observed points that the mapping must reproduce exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.errors import NotAPermutation, ProbeFailure, SpecError
from equivcheck.exploration.atoms import line_atoms, mapping_from_lines, stored_index
from equivcheck.exploration.sides import Side
from equivcheck.mapping import Mapping
from equivcheck.memory import require_memory
from equivcheck.specs import ConvSpec

__all__ = ["Probed", "probe_side"]

# Largest integer a probe value may reach, per float type (margin below 2^24 / 2^53 for
# frameworks that compute a one-hot product through FFT or Winograd transforms).
CAPS = {"float32": 1 << 22, "float64": 1 << 48}
# Use the selector strategy when the lines batch would be larger than this.
LINES_MAX_BATCH = 48
STRATEGIES = ("auto", "lines", "selectors")


@dataclass
class Probed:
    """What probing one side found."""

    side: Side
    canonical: Mapping | None  # stored kernel -> canonical (out, in, *k) tensor
    strategy: str
    calls: int
    bias: str  # "per output channel" | "none" | "fixed offset" | "not a plain bias"
    failure: str | None = None
    coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64), repr=False)
    raw: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # first-digit responses
    digit0: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.canonical is not None


# -- index digits ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Digit:
    """One probe call's share of the stored index: a group of trailing axes, or a digit of one long axis."""

    axes: tuple[int, ...]
    base: int = 0  # > 0: digit ``power`` of the coordinate of ``axes[0]`` in this base
    power: int = 0

    def size(self, shape: tuple[int, ...]) -> int:
        return self.base if self.base else math.prod(shape[a] for a in self.axes)

    def fill(self, buf: np.ndarray) -> None:
        """Write this digit of every weight's stored index, plus one, into ``buf``."""
        shape, view = buf.shape, [1] * buf.ndim
        if self.base:
            a = self.axes[0]
            values = (np.arange(shape[a]) // self.base**self.power) % self.base + 1
            view[a] = shape[a]
        else:
            values = np.arange(1, self.size(shape) + 1)
            for a in self.axes:
                view[a] = shape[a]
        buf[...] = values.reshape(view)

    def of(self, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """This digit of stored flat indices ``t``."""
        coords = np.unravel_index(t, shape)
        if self.base:
            return (coords[self.axes[0]] // self.base**self.power) % self.base
        return np.ravel_multi_index(tuple(coords[a] for a in self.axes), tuple(shape[a] for a in self.axes))


def index_digits(shape: tuple[int, ...], cap: int, first: tuple[int, ...] = ()) -> list[Digit]:
    """Split stored indices into digits no larger than ``cap``: trailing axes grouped while they fit.

    ``first``: axes to give a digit of their own, probed first (where the output channels
    probably are: a call that finds them all makes the other digits unnecessary).
    """
    digits: list[Digit] = []
    if first and math.prod(shape[a] for a in first) <= cap:
        digits.append(Digit(tuple(sorted(first))))
    else:
        first = ()
    group: list[int] = []
    prod = 1
    for axis in (a for a in reversed(range(len(shape))) if a not in first):
        d = shape[axis]
        if d > cap:
            if group:
                digits.append(Digit(tuple(sorted(group))))
                group, prod = [], 1
            power = 0
            while cap**power < d:
                digits.append(Digit((axis,), cap, power))
                power += 1
        elif prod * d <= cap:
            group.append(axis)
            prod *= d
        else:
            digits.append(Digit(tuple(sorted(group))))
            group, prod = [axis], d
    if group:
        digits.append(Digit(tuple(sorted(group))))
    return digits


def decode_digits(digits: list[Digit], values: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Stored flat indices from their digits."""
    n = len(values[0]) if values else 0
    coords = np.zeros((len(shape), n), dtype=np.int64)
    for d, v in zip(digits, values):
        if np.any(v < 0) or np.any(v >= d.size(shape)):
            raise ProbeFailure("a response is not the index of any weight: the layer scales or mixes its weights")
        if d.base:
            coords[d.axes[0]] += v * d.base**d.power
        else:
            sub = np.unravel_index(v, tuple(shape[a] for a in d.axes))
            for a, c in zip(d.axes, sub):
                coords[a] = c
    if any(np.any(coords[a] >= shape[a]) for a in range(len(shape))):
        raise ProbeFailure("a response is not the index of any weight: the layer scales or mixes its weights")
    return np.ravel_multi_index(tuple(coords), shape)


# -- where to put a one-hot and where to read it ---------------------------------------------
def _pair(geo: ConvSpec, axis: int, k: int) -> tuple[int, int] | None:
    """(input position, output position) joined by kernel position ``k`` on ``axis``."""
    n, out = geo.spatial[axis], geo.output_spatial[axis]
    s, d, lo = geo.stride[axis], geo.dilation[axis], geo.pads()[axis][0]
    if geo.transposed:
        for q in range(n):
            p = q * s - lo + k * d
            if 0 <= p < out:
                return q, p
        return None
    for p in range(out):
        q = p * s - lo + k * d
        if 0 <= q < n:
            return q, p
    return None


def _window(geo: ConvSpec) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """An output position whose whole kernel window lies inside the unpadded map: (q0, p0)."""
    if geo.transposed:
        return None
    q0, p0 = [], []
    for n, out, k, s, d, (lo, _) in zip(geo.spatial, geo.output_spatial, geo.kernel_size, geo.stride, geo.dilation, geo.pads()):
        for p in range(out):
            q = p * s - lo
            if q >= 0 and q + (k - 1) * d < n:
                q0.append(q)
                p0.append(p)
                break
        else:
            return None
    return tuple(q0), tuple(p0)


@dataclass
class _Element:
    """One probe input: a one-hot at input channel ``ci``, position ``q``; read at (``co``, ``p``)."""

    ci: int
    q: tuple[int, ...]
    co: np.ndarray
    p: tuple[int, ...]
    coords: np.ndarray  # (len(co), ndim): the canonical point each read observes


def _pairs(geo: ConvSpec) -> list[list[tuple[int, int]]]:
    out = []
    for axis, k in enumerate(geo.kernel_size):
        row = []
        for kk in range(k):
            pair = _pair(geo, axis, kk)
            if pair is None:
                raise SpecError(
                    f"kernel position {kk} on spatial axis {axis} of {geo.describe()} never touches the map: "
                    "its weights cannot be observed (check padding and kernel size)"
                )
            row.append(pair)
        out.append(row)
    return out


def _coords(n: int, ndim: int, **fixed: Any) -> np.ndarray:
    c = np.zeros((n, ndim), dtype=np.int64)
    for axis, value in fixed.items():
        c[:, int(axis[1:])] = value
    return c


def _line_elements(geo: ConvSpec, base: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                   output_axis_only: bool = False) -> list[_Element]:
    """One-hots covering every axis line through the canonical origin."""
    pairs = _pairs(geo)
    q0 = base[0] if base else tuple(row[0][0] for row in pairs)
    p0 = base[1] if base else tuple(row[0][1] for row in pairs)
    g, ndim = geo.groups, 2 + geo.rank
    ig, og = geo.in_channels // g, geo.out_channels // g
    els: list[_Element] = []
    if not geo.transposed:
        for gi in range(g):
            co = np.arange(gi * og, (gi + 1) * og)
            els.append(_Element(gi * ig, q0, co, p0, _coords(og, ndim, a0=co)))
        if output_axis_only:
            return els
        for i in range(1, ig):
            els.append(_Element(i, q0, np.arange(og), p0, _coords(og, ndim, a0=np.arange(og), a1=i)))
        a_read = "a0"
    else:
        for i in range(geo.in_channels):
            co = (i // ig) * og + np.arange(og)
            els.append(_Element(i, q0, co, p0, _coords(og, ndim, a0=i, a1=np.arange(og))))
        a_read = "a1"
    for axis, row in enumerate(pairs):
        for k in range(1, len(row)):
            q, p = list(q0), list(p0)
            q[axis], p[axis] = row[k]
            fixed = {a_read: np.arange(og), f"a{2 + axis}": k}
            els.append(_Element(0, tuple(q), np.arange(og), tuple(p), _coords(og, ndim, **fixed)))
    return els


# -- running index-coded probes ------------------------------------------------------------
def _batch(side: Side, elements: list[_Element]) -> np.ndarray:
    geo = side.geometry
    shape = (1 + len(elements), geo.in_channels, *geo.spatial)
    require_memory(f"a probe batch of shape {shape}", 2 * math.prod(shape) * side.np_dtype.itemsize)  # in and out
    x = np.zeros(shape, dtype=side.np_dtype)
    for b, e in enumerate(elements, 1):
        x[(b, e.ci, *e.q)] = 1
    return x


def _reads(elements: list[_Element]) -> tuple[np.ndarray, ...]:
    b = np.concatenate([np.full(len(e.co), i, dtype=np.int64) for i, e in enumerate(elements, 1)])
    co = np.concatenate([e.co for e in elements])
    ps = [np.concatenate([np.full(len(e.co), e.p[a], dtype=np.int64) for e in elements]) for a in range(len(elements[0].p))]
    return (b, co, *ps)


def _integers(v: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(v)):
        raise ProbeFailure(f"{what} contains NaN or Inf")
    r = np.rint(v)
    dev = float(np.max(np.abs(v - r))) if v.size else 0.0
    if dev > 0.25:
        raise ProbeFailure(
            f"{what} is not an exact copy of single weights (off by up to {dev:.3g}): "
            "the layer scales, normalises or mixes its weights, or is not linear"
        )
    return r.astype(np.int64)


def _bias_status(side: Side, y0: np.ndarray) -> str:
    o = side.geometry.out_channels
    expected = np.arange(1, o + 1, dtype=np.float64) if side.has_bias else np.zeros(o)
    expected = expected.reshape(o, *(1,) * (y0.ndim - 1))
    if np.all(np.isfinite(y0)) and np.all(np.abs(y0 - expected) <= 0.25):
        return "per output channel" if side.has_bias else "none"
    return "not a plain bias" if side.has_bias else "fixed offset"


def _index_calls(side: Side, elements: list[_Element], digits: list[Digit],
                 enough: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Run one call per digit; the observed canonical points, their stored indices and first raw responses.

    ``enough(partial)``, given the indices decoded so far (missing digits zero), may end the
    calls early by returning True; the indices returned are then partial.
    """
    x = _batch(side, elements)
    reads = _reads(elements)
    coords = np.concatenate([e.coords for e in elements])
    buf = side.scratch()
    bias = np.arange(1, side.geometry.out_channels + 1, dtype=side.np_dtype) if side.has_bias else None
    values: list[np.ndarray] = []
    raw0, status = np.zeros(0), "none"
    try:
        for i, digit in enumerate(digits):
            digit.fill(buf)
            y = side.run(buf, bias, x)
            y0 = y[0]
            v = y[reads] - y0[reads[1:]]
            if i == 0:
                status, raw0 = _bias_status(side, y0), v
            values.append(_integers(v, "the response to index-coded weights") - 1)
            if enough is not None and i + 1 < len(digits):
                zeros = [np.zeros_like(values[0])] * (len(digits) - i - 1)
                partial = decode_digits(digits, values + zeros, side.kernel_shape)
                if enough(partial):
                    return coords, partial, raw0, status
        return coords, decode_digits(digits, values, side.kernel_shape), raw0, status
    except ProbeFailure as exc:
        exc.observed = (coords, raw0, status)  # kept for naming the nearest convention
        raise


def _lines_from(coords: np.ndarray, t: np.ndarray, shape: tuple[int, ...]) -> tuple[list[np.ndarray], int]:
    """The stored index at the origin and on each axis line through it, from observed points."""
    origin_rows = np.flatnonzero(~coords.any(axis=1))
    if not origin_rows.size:
        raise ProbeFailure("the origin of the canonical kernel was not observed")
    origin = int(t[origin_rows[0]])
    lines = []
    for axis, n in enumerate(shape):
        others = np.delete(coords, axis, axis=1)
        rows = np.flatnonzero(~others.any(axis=1))
        line = np.full(n, -1, dtype=np.int64)
        line[coords[rows, axis]] = t[rows]
        if np.any(line < 0):
            raise ProbeFailure(f"axis {axis} of the canonical kernel was not fully observed")
        lines.append(line)
    return lines, origin


def _finish(side: Side, coords: np.ndarray, t: np.ndarray) -> Mapping:
    lines, origin = _lines_from(coords, t, side.canonical_shape)
    mapping = mapping_from_lines(lines, origin, side.kernel_shape, side.canonical_shape)
    predicted = stored_index(mapping, coords)
    if not np.array_equal(predicted, t):
        bad = int(np.flatnonzero(predicted != t)[0])
        raise ProbeFailure(
            f"the weight at canonical point {tuple(int(c) for c in coords[bad])} does not follow the axis lines: "
            "the kernel is not a reshape/transpose/flip of the canonical one"
        )
    return mapping


# -- the selector strategy -----------------------------------------------------------------
@dataclass(frozen=True)
class _OutputDigits:
    """Where the output-channel digits sit in the stored index (from the output axis line)."""

    atoms: tuple  # Atom, outer first
    stored: int  # total weights

    def offsets(self, n: int) -> np.ndarray:
        """Stored-index part contributed by each output channel 0..n-1."""
        t = np.zeros(n, dtype=np.int64)
        rest = np.arange(n, dtype=np.int64)
        for a in reversed(self.atoms):
            d = rest % a.size
            rest //= a.size
            t += a.stride * d if a.stride > 0 else -a.stride * (a.size - 1 - d)
        return t

    def expand(self, rho: np.ndarray) -> np.ndarray:
        """Insert zero output-channel digits into compressed indices ``rho``."""
        t = np.asarray(rho, dtype=np.int64).copy()
        for a in sorted(self.atoms, key=lambda a: abs(a.stride)):
            s = abs(a.stride)
            t = (t // s) * (s * a.size) + t % s
        return t

    def compress(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.int64).copy()
        for a in sorted(self.atoms, key=lambda a: -abs(a.stride)):
            s = abs(a.stride)
            t = (t // (s * a.size)) * s + t % s
        return t


def _output_digits(line: np.ndarray, stored: int) -> _OutputDigits:
    atoms = line_atoms(line - line[0], 0)
    ordered = sorted(atoms, key=lambda a: abs(a.stride))
    for lo, hi in itertools.pairwise(ordered):
        if abs(hi.stride) < abs(lo.stride) * lo.size:
            raise NotAPermutation("output channels overlap in the stored kernel")
    if ordered and abs(ordered[-1].stride) * ordered[-1].size > stored:
        raise NotAPermutation("output channels reach past the end of the stored kernel")
    return _OutputDigits(tuple(atoms), stored)


def _selector_plan(geo: ConvSpec, cap: int) -> tuple[int, int, int] | None:
    """(R slots per output, digit base, number of digit maps), or None when selectors do not apply."""
    if geo.transposed or _window(geo) is None:
        return None
    select = (geo.in_channels // geo.groups) * math.prod(geo.kernel_size)
    slots = -(-select // geo.out_channels)
    base = round(cap ** (1 / slots)) - 1
    while base >= 2 and (base + 1) ** slots > cap:
        base -= 1
    if base < 2:
        return None
    maps = 1
    while base**maps < select:
        maps += 1
    return slots, base, maps


def _selectors(side: Side, digits: list[Digit], plan: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    geo = side.geometry
    window = _window(geo)
    assert window is not None
    # Call A: the output-channel line.
    elements = _line_elements(geo, base=window, output_axis_only=True)
    found: list[_OutputDigits] = []

    def enough(partial: np.ndarray) -> bool:
        line = np.empty(geo.out_channels, dtype=np.int64)
        line[np.concatenate([e.coords[:, 0] for e in elements])] = partial
        try:
            out = _output_digits(line, side.weights)
        except NotAPermutation:
            return False
        if math.prod(a.size for a in out.atoms) != geo.out_channels:
            return False
        found.append(out)
        return True

    coords_a, t_a, raw0, status = _index_calls(side, elements, digits, enough)
    if found:  # call A stopped early: its indices lack the digits that do not vary along the output axis
        t_a = None
    try:
        return _selector_call_b(side, plan, window, coords_a, t_a, raw0, status, found[0] if found else None)
    except (ProbeFailure, NotAPermutation) as exc:
        exc.observed = (coords_a, raw0, status)  # type: ignore[attr-defined]
        raise


def _selector_call_b(side: Side, plan: tuple[int, int, int], window: tuple, coords_a: np.ndarray,
                     t_a: np.ndarray | None, raw0: np.ndarray, status: str,
                     out_digits: _OutputDigits | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    geo = side.geometry
    _slots, base, maps = plan
    q0, p0 = window
    o_count = geo.out_channels
    rest_origin = None
    if t_a is not None:
        line = np.empty(o_count, dtype=np.int64)
        line[coords_a[:, 0]] = t_a
        out_digits = _output_digits(line, side.weights)
        rest_origin = line[0] - out_digits.offsets(1)[0]
        if rest_origin < 0 or out_digits.expand(out_digits.compress(np.array([rest_origin])))[0] != rest_origin:
            raise ProbeFailure("the output channels' weights are not laid out the same way for every channel")
    assert out_digits is not None
    offsets = out_digits.offsets(o_count)
    # Call B: selector weights, digit-coded positions.
    ig = geo.in_channels // geo.groups
    select_shape = (ig, *geo.kernel_size)
    select = math.prod(select_shape)
    rho = np.arange(select, dtype=np.int64)
    owner, slot = rho % o_count, rho // o_count
    scale = base + 1
    buf = side.scratch()
    buf[...] = 0
    buf.reshape(-1)[out_digits.expand(rho) + offsets[owner]] = scale ** slot.astype(np.float64)
    code = np.arange(select, dtype=np.int64).reshape(select_shape)
    x = np.zeros((maps, geo.in_channels, *geo.spatial), dtype=side.np_dtype)
    win = tuple(slice(q, q + (k - 1) * d + 1, d) for q, k, d in zip(q0, geo.kernel_size, geo.dilation))
    for m in range(maps):
        digit = (code // base**m) % base + 1
        x[(m, slice(None), *win)] = np.tile(digit, (geo.groups, *(1,) * geo.rank))
    bias = np.zeros(o_count, dtype=side.np_dtype) if side.has_bias else None
    y = side.run(buf, bias, x)[(slice(None), slice(None), *p0)]  # (maps, O)
    y = _integers(y, "the response to selector weights")
    decoded = np.zeros(select, dtype=np.int64)
    for m in range(maps):
        d = (y[m, owner] // scale**slot) % scale - 1
        if np.any(d < 0) or np.any(d >= base):
            raise ProbeFailure("the response to selector weights does not spell kernel positions: the layer mixes its weights")
        decoded += d * base**m
    if not np.array_equal(np.sort(decoded), rho):
        raise ProbeFailure("two weights of one output act on the same input: the kernel is not a rearrangement")
    rho_at = np.empty(select, dtype=np.int64)
    rho_at[decoded] = rho
    t_rest = out_digits.expand(rho_at)  # stored index (output digits zero) at each input-side point
    if rest_origin is not None and t_rest[0] != rest_origin:
        raise ProbeFailure("calls A and B disagree on the weight at the canonical origin")
    if t_a is None:
        t_a = offsets[coords_a[:, 0]] + t_rest[0]
    ndim = 2 + geo.rank
    coords_b = np.zeros((select, ndim), dtype=np.int64)
    coords_b[:, 1:] = np.stack(np.unravel_index(np.arange(select), select_shape), axis=1)
    coords = np.concatenate([coords_a, coords_b])
    t = np.concatenate([t_a, offsets[0] + t_rest])
    return coords, t, raw0, status


def lines_batch_size(geo: ConvSpec) -> int:
    """Inputs in one ``lines`` call: the zero map and one one-hot per axis-line point."""
    first = geo.in_channels if geo.transposed else geo.groups + geo.in_channels // geo.groups - 1
    return 1 + first + sum(k - 1 for k in geo.kernel_size)


# -- entry point ---------------------------------------------------------------------------
def probe_side(side: Side, strategy: str = "auto") -> Probed:
    """Find ``side``'s stored → canonical mapping with a fixed handful of forward calls."""
    if strategy not in STRATEGIES:
        raise SpecError(f"probe={strategy!r} is not valid: expected one of {', '.join(STRATEGIES)}")
    geo = side.geometry
    cap = CAPS[side.dtype]
    plan = _selector_plan(geo, cap)
    use = "lines"
    if strategy == "selectors":
        if plan is None:
            raise SpecError(f"probe='selectors' does not apply to {geo.describe()}: use 'lines'")
        use = "selectors"
    elif strategy == "auto" and plan is not None and lines_batch_size(geo) > LINES_MAX_BATCH:
        use = "selectors"
    out_axes = tuple(a for a, d in enumerate(side.kernel_shape) if d == geo.out_channels)
    digits = index_digits(side.kernel_shape, cap, first=out_axes if use == "selectors" else ())
    start = side.calls
    coords, raw, status = np.zeros((0, 2 + geo.rank), np.int64), np.zeros(0), "unknown"
    try:
        if use == "selectors":
            coords, t, raw, status = _selectors(side, digits, plan)
        else:
            coords, t, raw, status = _index_calls(side, _line_elements(geo), digits)
        mapping = _finish(side, coords, t)
        failure = None
    except (ProbeFailure, NotAPermutation) as exc:
        mapping, failure = None, str(exc)
        coords, raw, status = getattr(exc, "observed", (coords, raw, status))
    return Probed(side, mapping, use, side.calls - start, status, failure, coords, raw, digits[0])
