"""Check a probed mapping on random data at the real shape, and size up a wrong one.

Random float32 weights go through the source as they are and through the target after the
mapping; both outputs are judged against the exact result (float64, from the source's
probed canonical kernel) by the judge's :class:`equivcheck.judge.Reference` — the one exact
reference and ``|W|·|x|`` bound every check uses. The batch holds ``x``, ``y`` and ``-x``, so the
same call also tells whether the target is affine (``f(x) + f(-x) = 2 f(0)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from equivcheck._arrays import aligned_empty
from equivcheck.compare import Comparison
from equivcheck.exploration.atoms import stored_index
from equivcheck.exploration.conventions import Candidate
from equivcheck.exploration.probe import Probed
from equivcheck.judge import Reference
from equivcheck.mapping import Mapping
from equivcheck.specs import fan_in

__all__ = ["Verification", "nearest_candidate", "verify_mapping"]


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
    # The judge's exact reference, each side judged in its own dtype (the bias rounded with the sum, as a black box
    # may add it); a kernel that covers the map is read from the stored array a block at a time.
    ref_src, ref_dst = (Reference(geo, geo, x, dtype=d, fan=fan_in(geo), roundings=1) for d in (s.dtype, t.dtype))
    if dst.canonical is not None and dst.canonical.is_reshape:  # rows of the canonical kernel are contiguous
        exact, mag, nb = ref_src.outputs(w_dst, b_src, stored=dst.canonical)
    else:
        exact, mag, nb = ref_src.outputs(w, b_src, stored=canon_src)
    cmp_src = ref_src.compare(y_src, exact, mag, nb)
    cmp_dst = ref_dst.compare(y_dst, exact, mag, nb)
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
