"""Whole-model verification: same outputs at the training size, sliding-window equivalence above it.

Three checks, each judged by :meth:`equivcheck.fcn.head.Head.judge` — the exact float64
head on the very same float32 features, with a rounding bound propagated layer by layer:

``training size``
    The converted model's output equals the original's classifier applied to the original's
    features (and the original itself passes the same bound, which shows the bound honest).
``sliding window``
    On a larger input, output position ``p`` equals the original classifier applied to the
    window of the feature map starting at ``p`` — the equivalence FCNs rely on. The features
    come from equivcheck's own any-size copy of the original's body, not from the model under
    test.
``mutants``
    Plausible wrong conversions of the first Dense (the other flatten order, a spatial flip,
    swapped spatial axes, a dropped bias) must fail the training-size comparison on the same
    data; if one passes, the data cannot tell right from wrong and the check fails.
``crop``
    Output position ``p`` equals the *original model* on the input crop at offset ``p × S``
    (``S`` the network's total stride). This holds only when no body layer pads: with
    ``padding="same"`` (VGG16) a crop's border features see zeros where the whole input has
    pixels. For such bodies the check still runs and reports its numbers, marked not
    applicable.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.compare import Comparison
from equivcheck.fcn.head import HeadError, Propagated
from equivcheck.memory import require_memory

__all__ = ["Check", "ModelVerification", "verify_split"]


@dataclass
class Check:
    """One claim about the converted model and its verdict."""

    name: str
    passed: bool
    applicable: bool = True
    detail: str = ""
    comparison: Comparison | None = None
    positions: list[tuple[int, ...]] = field(default_factory=list)
    max_abs_difference: float | None = None  # crop: |original(crop) - converted| at those positions

    @property
    def verdict(self) -> str:
        if not self.applicable:
            return "n/a"
        return "pass" if self.passed else "fail"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "passed": self.passed, "applicable": self.applicable,
                "detail": self.detail, "comparison": None if self.comparison is None else self.comparison.to_dict(),
                "positions": [list(p) for p in self.positions], "max_abs_difference": self.max_abs_difference}


@dataclass
class ModelVerification:
    """The verdict on a convolutionalized model."""

    framework: str
    model: str
    dtype: str
    input_shape: tuple[int, ...]
    larger_shape: tuple[int, ...] | None
    total_stride: tuple[int, ...] | None
    output_positions: tuple[int, ...]
    layers: list[dict[str, Any]]
    checks: list[Check]
    seed: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.applicable)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        """Flat fields first (report tables show the first twelve), then the per-layer and per-check detail."""
        return {
            "framework": self.framework, "model": self.model, "dtype": self.dtype, "verdict": self.verdict,
            "input_shape": list(self.input_shape),
            "larger_shape": None if self.larger_shape is None else list(self.larger_shape),
            "total_stride": None if self.total_stride is None else list(self.total_stride),
            "output_positions": list(self.output_positions), "summary": self.checks_line(),
            "seconds": round(self.seconds, 3), "seed": self.seed, "passed": self.passed,
            "layers": self.layers, "checks": [c.to_dict() for c in self.checks],
        }

    def checks_line(self) -> str:
        """``training size: pass (err/bound 0.0006); …`` in one line."""
        parts = []
        for c in self.checks:
            ratio = "" if c.comparison is None or not c.applicable else f" (err/bound {c.comparison.max_error_ratio:.2g})"
            parts.append(f"{c.name}: {c.verdict}{ratio}")
        return "; ".join(parts)

    def summary(self) -> str:
        parts = [f"{c.name}: {c.verdict}" for c in self.checks]
        return f"{self.framework} {self.model}: {self.verdict} ({', '.join(parts)})"


def _dtype(name: str) -> np.dtype:
    from equivcheck.backends.base import np_dtype

    return np_dtype(name)


def _spatial(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[a - 1] for a in axes)


def _with_spatial(shape: tuple[int, ...], axes: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int, ...]:
    out = list(shape)
    for a, s in zip(axes, sizes):
        out[a - 1] = s
    return tuple(out)


def _pick(grid: tuple[int, ...], limit: int | None) -> list[tuple[int, ...]]:
    """All positions, or the corners and the centre when there are more than ``limit``."""
    every = list(itertools.product(*(range(n) for n in grid)))
    if limit is None or len(every) <= limit:
        return every
    corners = list(itertools.product(*((0, n - 1) for n in grid)))
    chosen = list(dict.fromkeys([*corners, tuple(n // 2 for n in grid)]))
    return chosen[: max(limit, 1)]


def mutant_matrices(head: Any) -> dict[str, np.ndarray]:
    """Plausible wrong conversions of the first Dense, as canonical (units, in) matrices."""
    first = head.denses[0]
    units, (channels, *spatial) = first.spec.units, head.map_shape
    w = first.matrix.reshape(units, channels, *spatial)
    rank = len(spatial)
    out: dict[str, np.ndarray] = {}
    if rank and math.prod(spatial) > 1 and channels > 1:
        # the kernel read as if the map were flattened channels-last (or first) instead
        other = w.reshape(units, *spatial, channels)
        out["flatten order"] = np.moveaxis(other, -1, 1)
    if rank and math.prod(spatial) > 1:
        out["spatial flip"] = np.flip(w, axis=tuple(range(2, 2 + rank)))
    if rank >= 2 and spatial[-1] == spatial[-2] and spatial[-1] > 1:
        out["spatial axes swapped"] = np.swapaxes(w, -1, -2)
    if first.bias is not None and np.any(first.bias):
        out["bias dropped"] = w  # the same kernel, evaluated without the bias below
    return {k: np.ascontiguousarray(v.reshape(units, -1)) for k, v in out.items()}


def _mutants(head: Any, features: np.ndarray, exact: Propagated) -> Check:
    """Each wrong conversion of the first Dense must fail the same comparison, or the data cannot tell them apart."""
    import copy

    outcomes = []
    for name, matrix in mutant_matrices(head).items():
        mutant = copy.copy(head)
        first = copy.copy(head.denses[0])
        first.matrix = matrix
        if name == "bias dropped":
            first.bias = None
        mutant.steps = [first if s is head.denses[0] else s for s in head.steps]
        comp = head.judge(mutant.run(features).v, exact)
        outcomes.append(f"{name}: {'rejected' if not comp.passed else 'NOT rejected'} (err/bound {comp.max_error_ratio:.3g})")
        if comp.passed:
            return Check("mutants", False, detail="a wrong conversion also passes on this data: " + "; ".join(outcomes))
    if not outcomes:
        return Check("mutants", True, applicable=False, detail="the first Dense has no plausible wrong conversion to try")
    return Check("mutants", True, detail="; ".join(outcomes))


def verify_split(sp: Any, converted: Any, *, larger: tuple[int, ...] | None = None, crops: int | None = 4,
                 seed: int = 0, batch: int = 1) -> ModelVerification:
    """Run the three checks; ``sp`` is a Keras or torch split of the original model."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    head, dt = sp.head, _dtype(sp.dtype)
    axes = sp.spatial_axes()
    train = _spatial(sp.input_shape, axes)
    map_train = head.map_shape[1:]
    units = head.units
    checks: list[Check] = []

    # Framework forwards first; then one exact pass of the head over every map (one read of W).
    x = rng.standard_normal((batch, *sp.input_shape)).astype(dt)
    y_orig, f = sp.run_and_features(x)
    y_orig = np.asarray(y_orig)
    if y_orig.shape != (batch, units):
        raise HeadError(f"the original model outputs shape={y_orig.shape}: expected {(batch, units)} from its last Dense")
    y_conv = np.asarray(sp.run_converted(converted, x))
    product = sp.stride_product()
    big = tuple(larger) if larger is not None else tuple(t + k for t, k in zip(train, product))
    if len(big) == 1 < len(train):  # one size for every spatial axis
        big = big * len(train)
    if len(big) != len(train) or any(b < t for b, t in zip(big, train)):
        raise HeadError(f"larger={big} must have {len(train)} sizes, each at least the training size {train}")
    big_shape = (batch, *_with_spatial(sp.input_shape, axes, big))
    # The larger input in float64 and dt, its features, the windows cut from them and the outputs: a few copies.
    require_memory(f"verify-model at larger={big}", 8 * 8 * math.prod(big_shape))
    X = rng.standard_normal(big_shape).astype(dt)
    F = sp.body_features(X)
    probe = tuple(t + k for t, k in zip(train, product))
    grown = F.shape[2:] if probe == big else sp.body_features(
        np.zeros((1, *_with_spatial(sp.input_shape, axes, probe)), dt)).shape[2:]
    steps = [g - m for g, m in zip(grown, map_train)]
    stride = None if any(s == 0 for s in steps) else tuple(k // s for k, s in zip(product, steps))
    grid = tuple(n - m + 1 for n, m in zip(F.shape[2:], map_train))
    if any(g < 1 for g in grid):
        raise HeadError(f"the feature map at larger={big} is {F.shape[2:]}, smaller than the head's window {map_train}")
    every = list(itertools.product(*(range(n) for n in grid)))
    windows = [F[(slice(None), slice(None), *(slice(p, p + m) for p, m in zip(pos, map_train)))] for pos in every]
    y_big = np.asarray(sp.run_converted(converted, X))
    result = head.run(np.concatenate([f, *windows]))
    exact = Propagated(result.v[:batch], result.d[:batch])

    # 1. the training size
    source = head.judge(y_orig, exact)
    if y_conv.shape[:2] != (batch, units) or any(s != 1 for s in y_conv.shape[2:]):
        checks.append(Check("training size", False, detail=f"the converted model outputs shape={y_conv.shape} at the training "
                            f"size: expected {(batch, units)} followed by ones"))
    else:
        comp = head.judge(y_conv.reshape(batch, units), exact)
        detail = comp.summary()
        if not source.passed:
            detail = f"the original itself is outside the bound ({source.summary()}): its features or head were misread"
        checks.append(Check("training size", comp.passed and source.passed, detail=detail, comparison=comp,
                            positions=[(0,) * len(map_train)]))

    checks.append(_mutants(head, f, exact))

    # 2. a larger input: every output position against the classifier on its feature window
    # rows are (position, sample) -> (batch, units, *grid)
    v = np.moveaxis(result.v[batch:].reshape(len(every), batch, units), 0, -1).reshape(batch, units, *grid)
    d = np.moveaxis(result.d[batch:].reshape(len(every), batch, units), 0, -1).reshape(batch, units, *grid)
    if y_big.shape != v.shape:
        checks.append(Check("sliding window", False, detail=f"the converted model outputs shape={y_big.shape} at {big}: "
                            f"expected {v.shape} (one output per feature-map window)"))
        y_big = None
    else:
        comp = head.judge(y_big, Propagated(v, d))
        checks.append(Check("sliding window", comp.passed, detail=comp.summary(), comparison=comp, positions=every))

    # 3. the original model on input crops at offset position × total stride
    if stride is None:
        checks.append(Check("crop", True, applicable=False, detail="the body ends in global pooling: outputs have no positions"))
    else:
        fits = tuple(min(n, (b - t) // s + 1) for n, b, t, s in zip(grid, big, train, stride))  # crops inside X
        chosen = _pick(fits, crops)
        ys = []
        for pos in chosen:
            index = [slice(None)] * X.ndim
            for a, p, s, t in zip(axes, pos, stride, train):
                index[a] = slice(p * s, p * s + t)
            ys.append(np.asarray(sp.run(X[tuple(index)])))
        y_crop = np.stack(ys, axis=-1)  # (batch, units, k)
        pick = (slice(None), slice(None), *(np.array(c) for c in zip(*chosen)))
        comp = head.judge(y_crop, Propagated(v[pick], d[pick]))
        diff = None if y_big is None else float(np.max(np.abs(y_crop.astype(np.float64) - y_big[pick])))
        if sp.padding_free():
            checks.append(Check("crop", comp.passed, detail=comp.summary(), comparison=comp, positions=chosen,
                                max_abs_difference=diff))
        else:
            checks.append(Check("crop", comp.passed, applicable=False, comparison=comp, positions=chosen, max_abs_difference=diff,
                                detail=f"not expected to match: the body pads, so a crop's border features differ from the "
                                       f"whole input's (max |original(crop) - converted| = {'-' if diff is None else f'{diff:.3g}'}); the sliding-window "
                                       "check compares with the classifier on the feature window instead"))
    return ModelVerification(
        framework=sp.framework, model=sp.name, dtype=sp.dtype, input_shape=tuple(sp.input_shape),
        larger_shape=_with_spatial(sp.input_shape, axes, big), total_stride=stride, output_positions=grid,
        layers=sp.describe_conversion(), checks=checks, seed=seed, seconds=time.perf_counter() - start,
    )

