"""Check a probed mapping on random data at the real shape, and size up a wrong one.

Random float32 weights go through the source as they are and through the target after the
mapping; both outputs are judged against the exact result (float64, from the source's
probed canonical kernel) with :func:`equivcheck.compare.compare`'s ``|W|·|x|`` bound, as
:mod:`equivcheck.verify` does. The batch holds ``x``, ``y`` and ``-x``, so the same call also
tells whether the target is affine (``f(x) + f(-x) = 2 f(0)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from equivcheck._arrays import aligned_empty
from equivcheck.compare import Comparison, compare
from equivcheck.exploration.atoms import stored_index
from equivcheck.exploration.conventions import Candidate
from equivcheck.exploration.probe import Probed
from equivcheck.mapping import Mapping, Reshape, Transpose
from equivcheck.specs import ConvSpec, fan_in

__all__ = ["Verification", "nearest_candidate", "reference", "verify_mapping"]


# Float64 copies of the kernel are made this many weights at a time.
CHUNK_WEIGHTS = 1 << 19


@dataclass(frozen=True)
class Verification:
    passed: bool
    source: Comparison
    target: Comparison
    relative_error: float  # ‖y_target − y_source‖ / ‖y_source‖ on the same random data
    scale: float  # least-squares factor from the source's output to the target's
    affine: bool  # target(x) + target(−x) == 2·target(0), within the bound
    calls: int
    scaled_residual: float = math.inf  # ‖y_target − scale·y_source‖ / ‖y_source‖: ≈ 0 for a scaled copy

    @property
    def is_scaled_copy(self) -> bool:
        return self.scaled_residual < 1e-3 and abs(self.scale - 1) > 1e-3

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "relative_error": _finite(self.relative_error),
            "scale": _finite(self.scale),
            "target_is_affine": self.affine,
            "target_is_scaled_copy": self.is_scaled_copy,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "forward_calls": self.calls,
        }

    def summary(self) -> str:
        if self.passed:
            return f"pass — {self.target.summary()}"
        if not self.source.passed:
            return f"the source disagrees with its own probed kernel — {self.source.summary()}"
        return f"fail — relative error {self.relative_error:.3g}; {self.target.summary()}"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _rows_view(m: Mapping, a: np.ndarray) -> np.ndarray | None:
    """``m.apply(a)`` as a view whose leading axes make up the canonical output channels; None if no view exists.

    The final reshape (atoms → canonical axes) is left out: it is the one step that would copy.
    """
    ops = list(m.simplify().ops)
    if ops and isinstance(ops[-1], Reshape):
        ops.pop()
    view = a
    for op in ops:
        if isinstance(op, Reshape):
            try:
                view = view.reshape(op.shape, copy=False)
            except (ValueError, TypeError):
                return None
        elif isinstance(op, Transpose):
            view = view.transpose(op.perm)
        else:
            view = view[tuple(slice(None, None, -1) if i in op.axes else slice(None) for i in range(view.ndim))]
    return view


def _kernel_rows(m: Mapping, a: np.ndarray, rows: int):
    """Yield ``(o0, o1, block)``: rows ``o0:o1`` of the canonical kernel ``m(a)`` as a float64 (rows, in) block."""
    o = m.out_shape[0]
    view = _rows_view(m, a)
    lead = next((k for k in range(1, view.ndim + 1) if math.prod(view.shape[:k]) == o), None) if view is not None else None
    if view is None or lead is None or view.ndim == 0:
        k2 = m.apply(a).reshape(o, -1)
        for o0 in range(0, o, rows):
            yield o0, min(o, o0 + rows), k2[o0 : o0 + rows].astype(np.float64)
        return
    inner = math.prod(view.shape[1:lead])
    step = max(1, rows // inner)
    for i0 in range(0, view.shape[0], step):
        block = np.array(view[i0 : i0 + step], dtype=np.float64)
        yield i0 * inner, min(o, (i0 + step) * inner), block.reshape(-1, a.size // o)


def reference(geo: ConvSpec, canonical: Mapping, kernel: np.ndarray, bias: np.ndarray | None,
              x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact output and ``|W|·|x|`` of the layer whose canonical kernel is ``canonical(kernel)``, in float64.

    A kernel covering the map is read a block of output channels at a time, straight from the
    stored kernel: no full-size copy.
    """
    x64 = x.astype(np.float64)
    b64 = None if bias is None else bias.astype(np.float64)
    n, o = x.shape[0], geo.out_channels
    if not geo.transposed and geo.groups == 1 and geo.covers_map:
        flat = x64.reshape(n, -1)
        aflat = np.abs(flat)
        y, mag = np.empty((n, o)), np.empty((n, o))
        for o0, o1, part in _kernel_rows(canonical, kernel, max(1, CHUNK_WEIGHTS // flat.shape[1])):
            # einsum's own loop, not BLAS: no thread pool to contend with on a busy machine
            y[:, o0:o1] = np.einsum("nk,ok->no", flat, part)
            np.abs(part, out=part)
            mag[:, o0:o1] = np.einsum("nk,ok->no", aflat, part)
        if b64 is not None:
            y += b64
            mag += np.abs(b64)
        shape = (n, o, *(1,) * geo.rank)
        return y.reshape(shape), mag.reshape(shape)
    from equivcheck.backends.numpy import forward

    k64 = canonical.apply(kernel).astype(np.float64)
    y = forward(geo, k64, b64, x64)
    mag = forward(geo, np.abs(k64), None if b64 is None else np.abs(b64), np.abs(x64))
    return y, mag


def verify_mapping(src: Probed, dst: Probed, mapping: Mapping, *, seed: int = 0,
                   source_canonical: Mapping | None = None) -> Verification:
    """Run random weights through both sides (the target's through ``mapping``) and judge them."""
    s, t = src.side, dst.side
    geo = s.geometry
    rng = np.random.default_rng(seed)
    w = s.scratch() if s.dtype == "float32" else aligned_empty(s.kernel_shape, np.float32)
    rng.random(out=w.reshape(-1), dtype=np.float32)
    w *= 2
    w -= 1
    bias = rng.standard_normal(geo.out_channels).astype(np.float32) if s.has_bias else None
    x = rng.standard_normal((2, geo.in_channels, *geo.spatial)).astype(np.float32)
    x = np.concatenate([x, -x[:1]])
    if mapping.is_reshape:  # same memory order: the target reads a view, no copy
        w_dst = w.reshape(mapping.out_shape)
    else:  # aligned, so that a Keras target adopts it without a copy
        w_dst = mapping.apply(w, out=aligned_empty(mapping.out_shape, w.dtype))
    b_src = bias if s.has_bias else None
    b_dst = (bias if bias is not None else np.zeros(geo.out_channels, np.float32)) if t.has_bias else None
    if not t.has_bias:
        b_src = None if bias is None else np.zeros_like(bias)
    calls0 = s.calls + t.calls
    y_src = s.run(w, b_src, x)
    y_dst = t.run(w_dst, b_dst, x)
    canon_src = source_canonical or src.canonical
    assert canon_src is not None
    if dst.canonical is not None and dst.canonical.is_reshape:
        exact, mag = reference(geo, dst.canonical, w_dst, b_src, x)  # rows of the canonical kernel are contiguous
    else:
        exact, mag = reference(geo, canon_src, w, b_src, x)
    cmp_src = compare(y_src, exact, mag, dtype=s.dtype, fan_in=fan_in(geo))
    cmp_dst = compare(y_dst, exact, mag, dtype=t.dtype, fan_in=fan_in(geo))
    # How far the target is from the source itself (not from the reference: a side that did not
    # probe cleanly is only approximated by the canonical kernel used for the reference).
    norm = float(np.linalg.norm(y_src))
    rel = float(np.linalg.norm(y_dst - y_src)) / norm if norm else float(np.linalg.norm(y_dst))
    den = float(np.vdot(y_src, y_src))
    scale = float(np.vdot(y_src, y_dst)) / den if den else float("nan")
    zero = 2 * (b_dst.astype(np.float64) if b_dst is not None else np.zeros(geo.out_channels))
    odd = y_dst[0] + y_dst[2] - zero.reshape(-1, *(1,) * (y_dst.ndim - 2))
    affine = bool(np.all(np.abs(odd) <= 2 * cmp_dst.bound_at_worst + 1e-6 * (np.abs(y_dst[0]) + 1)))
    scaled = float(np.linalg.norm(y_dst - scale * y_src)) / norm if norm and math.isfinite(scale) else math.inf
    return Verification(cmp_src.passed and cmp_dst.passed, cmp_src, cmp_dst, rel, scale, affine,
                        s.calls + t.calls - calls0, scaled)


def nearest_candidate(probed: Probed, cands: list[Candidate]) -> tuple[Candidate, float, float] | None:
    """The named convention whose index pattern best explains a failed probe: (candidate, scale, residual)."""
    raw = np.asarray(probed.raw, dtype=np.float64)
    if raw.size == 0 or probed.digit0 is None or not np.all(np.isfinite(raw)):
        return None
    best: tuple[Candidate, float, float] | None = None
    shape = probed.side.kernel_shape
    for c in cands:
        if c.mapping is None:
            continue
        predicted = probed.digit0.of(stored_index(c.mapping, probed.coords), shape) + 1.0
        design = np.stack([predicted, np.ones_like(predicted)], axis=1)
        coef, *_ = np.linalg.lstsq(design, raw, rcond=None)
        residual = float(np.linalg.norm(design @ coef - raw)) / max(float(np.linalg.norm(raw)), 1e-300)
        if best is None or residual < best[2] - 1e-12:
            best = (c, float(coef[0]), residual)
    return best
