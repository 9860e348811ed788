"""A classifier head in framework-neutral form, run exactly with an error bound.

A model's *head* is what follows its Flatten: Dense layers, elementwise activations,
softmax, inference-mode batch normalisation and dropout. :class:`Head` holds it as numpy
steps, evaluates it in float64 on the very same (rounded) weights and features, and carries
alongside the exact value ``v`` an upper bound ``d`` on how far a framework computing in
``dtype`` may be from it:

* Dense ``z = W·a + b`` with fan-in ``n``: the incoming error ``d`` goes through ``W``
  (at most ``|W|·d``; its parts are rounding errors with independent signs and each ``d_i``
  is already a 4σ bound — the assumption behind compare's ``√n`` term — so
  ``sqrt(W²·d²)`` is a 4σ bound of the sum; the smaller of the two is used), then one dot
  product adds the bound of :mod:`equivcheck.compare` on the inputs the framework sees,
  ``u_out·|z| + 4·√n·u_acc·(|W|·|a| + |b|)``.
* ReLU passes the error on where ``v + d > 0`` and makes it exactly 0 elsewhere (both the
  exact and the computed value are negative there); other activations pass ``L·d`` for their
  Lipschitz constant ``L``, smooth ones adding ``4·u_out·|y|`` for their own rounding.
* Softmax: with logits off by at most ``d_j`` (``D = max d``), ``s'_j / s_j`` lies within
  ``exp(±(d_j + D))``, so ``|s'_j − s_j| ≤ s_j·(exp(d_j + D) − 1)``; it is also ½-Lipschitz
  in the max norm (``≤ D/2``); the smaller bound is used, plus
  ``u_out·s_j·(|z_j − max z| + 4√n + 4)`` for the subtraction, ``exp``, the sum and the division.

The final bound becomes a :func:`equivcheck.compare.compare` verdict (:meth:`Head.judge`),
so NaN never passes and the worst element is located the same way as for one layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.compare import ACCUMULATION_FACTOR, Comparison, accumulation_dtype, compare, unit_roundoff
from equivcheck.errors import HeadError
from equivcheck.specs import DenseSpec

__all__ = ["ACTIVATIONS", "Activation", "Affine", "Dense", "Head", "HeadError", "Propagated"]

# Rows of W (output units) per float64 block: bounds peak memory for a 25088×4096 kernel.
_BLOCK_BYTES = 1 << 27


@dataclass
class Propagated:
    """Exact value ``v`` (float64, one row per sample or window) and error bound ``d``."""

    v: np.ndarray
    d: np.ndarray


@dataclass
class Dense:
    """``z = a @ W.T + b`` where ``W`` is (units, in) in the canonical (channels-first) input order."""

    name: str
    spec: DenseSpec  # the framework's own convention, used to plan its conv
    kernel: np.ndarray  # as stored by the framework
    bias: np.ndarray | None
    activation: str = "linear"  # a fused activation (Keras Dense(activation=...))
    matrix: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from equivcheck.planning import canonical

        canon = canonical(self.spec).apply(np.asarray(self.kernel))  # (units, C, *spatial)
        self.matrix = np.ascontiguousarray(canon.reshape(self.spec.units, -1))

    @property
    def fan_in(self) -> int:
        return self.matrix.shape[1] + (self.bias is not None)

    def propagate(self, x: Propagated, dtype: str) -> Propagated:
        u_out = unit_roundoff(dtype)
        u_acc = unit_roundoff(accumulation_dtype(dtype))
        n = self.matrix.shape[1]
        m = x.v.shape[0]
        carry = bool(np.any(x.d))
        absolute = np.concatenate([np.abs(x.v) + x.d, x.d]) if carry else np.abs(x.v)
        squared = x.d**2
        rows = max(1, _BLOCK_BYTES // (8 * n))
        z = np.empty((m, self.matrix.shape[0]))
        mag = np.empty_like(z)
        worst = np.zeros_like(z)
        spread = np.zeros_like(z)
        for start in range(0, self.matrix.shape[0], rows):
            w = self.matrix[start : start + rows].astype(np.float64)
            sl = slice(start, start + w.shape[0])
            z[:, sl] = x.v @ w.T
            np.abs(w, out=w)
            both = absolute @ w.T
            mag[:, sl] = both[:m]
            if carry:
                worst[:, sl] = both[m:]
                np.square(w, out=w)
                spread[:, sl] = squared @ w.T
        if self.bias is not None:
            b = np.asarray(self.bias, dtype=np.float64)
            z += b
            mag += np.abs(b)
        # The incoming error through W: at most |W|·d. Its parts are rounding errors with
        # independent signs and d is already a 4σ bound of each (compare's assumption), so
        # sqrt(W²·d²) is a 4σ bound of the sum.
        carried = np.minimum(worst, np.sqrt(spread))
        d = carried + u_out * (np.abs(z) + carried) + ACCUMULATION_FACTOR * math.sqrt(n) * u_acc * mag + _tiny(dtype)
        out = Propagated(z, d)
        return ACTIVATIONS[self.activation](out, dtype) if self.activation != "linear" else out


@dataclass
class Activation:
    """An activation: elementwise, or softmax over the units."""

    name: str
    kind: str

    def propagate(self, x: Propagated, dtype: str) -> Propagated:
        return ACTIVATIONS[self.kind](x, dtype)


@dataclass
class Affine:
    """Inference-mode batch normalisation, ``y = a·x + c`` per unit."""

    name: str
    scale: np.ndarray
    shift: np.ndarray

    def propagate(self, x: Propagated, dtype: str) -> Propagated:
        a, c = self.scale.astype(np.float64), self.shift.astype(np.float64)
        y = x.v * a + c
        carried = np.abs(a) * x.d
        d = carried + 4 * unit_roundoff(dtype) * (np.abs(a) * (np.abs(x.v) + x.d) + np.abs(c) + np.abs(y) + carried)
        return Propagated(y, d + _tiny(dtype))


Step = Dense | Activation | Affine


def _tiny(dtype: str) -> float:
    return 64 * float(np.finfo(np.float64 if dtype == "float64" else np.float32).tiny)


def _elementwise(fn: Callable[[np.ndarray], np.ndarray], lipschitz: float, rounding: float) -> Callable:
    def run(x: Propagated, dtype: str) -> Propagated:
        y = fn(x.v)
        carried = lipschitz * x.d
        return Propagated(y, carried + rounding * unit_roundoff(dtype) * (np.abs(y) + carried) + _tiny(dtype))

    return run


def _softmax(x: Propagated, dtype: str) -> Propagated:
    m = x.v.max(axis=1, keepdims=True)
    e = np.exp(x.v - m)
    s = e / e.sum(axis=1, keepdims=True)
    n = x.v.shape[1]
    top = x.d.max(axis=1, keepdims=True)
    carried = np.minimum(0.5 * top, s * np.expm1(np.minimum(x.d + top, 700.0)))
    d = carried + unit_roundoff(dtype) * s * (np.abs(x.v - m) + 4 * math.sqrt(n) + 4)
    return Propagated(s, np.minimum(d + _tiny(dtype), 1.0))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * v))


def _gelu(v: np.ndarray) -> np.ndarray:
    from math import erf

    return 0.5 * v * (1 + np.vectorize(erf)(v / math.sqrt(2)))


def _relu(x: Propagated, dtype: str) -> Propagated:
    return Propagated(np.maximum(x.v, 0.0), np.where(x.v + x.d > 0, x.d, 0.0))


# name -> propagation; Lipschitz constants: gelu 1.13, silu 1.1, sigmoid 1/4, tanh, elu(α=1) 1.
ACTIVATIONS: dict[str, Callable[[Propagated, str], Propagated]] = {
    "linear": lambda x, dtype: x,
    "relu": _relu,
    "relu6": _elementwise(lambda v: np.clip(v, 0.0, 6.0), 1.0, 0.0),
    "tanh": _elementwise(np.tanh, 1.0, 4.0),
    "sigmoid": _elementwise(_sigmoid, 0.25, 4.0),
    "elu": _elementwise(lambda v: np.where(v > 0, v, np.expm1(np.minimum(v, 0.0))), 1.0, 4.0),
    "gelu": _elementwise(_gelu, 1.13, 8.0),
    "silu": _elementwise(lambda v: v * _sigmoid(v), 1.1, 8.0),
    "softmax": _softmax,
}


def leaky_relu(slope: float) -> str:
    """Register a leaky ReLU of ``slope`` (0 ≤ slope ≤ 1) and return its activation name."""
    if not 0 <= slope <= 1:
        raise HeadError(f"negative_slope={slope} is outside [0, 1]: equivcheck bounds only 1-Lipschitz leaky ReLUs")
    name = f"leaky_relu({slope!r})"
    ACTIVATIONS.setdefault(name, _elementwise(lambda v: np.where(v >= 0, v, slope * v), 1.0, 1.0))
    return name


def check_activation(kind: str, layer: str) -> str:
    if kind not in ACTIVATIONS:
        raise HeadError(
            f"activation={kind!r} of layer {layer!r} has no error bound in equivcheck: "
            f"expected one of {', '.join(sorted(ACTIVATIONS))}"
        )
    return kind


@dataclass
class Head:
    """The steps after the Flatten, reading a map of ``map_shape`` = (channels, *spatial)."""

    map_shape: tuple[int, ...]
    steps: list[Step]
    dtype: str = "float32"

    @property
    def denses(self) -> list[Dense]:
        return [s for s in self.steps if isinstance(s, Dense)]

    @property
    def units(self) -> int:
        return self.denses[-1].spec.units

    def run(self, maps: np.ndarray) -> Propagated:
        """Exact outputs and their bound for canonical maps of shape (m, channels, *spatial)."""
        maps = np.asarray(maps)
        if tuple(maps.shape[1:]) != self.map_shape:
            raise HeadError(f"feature map shape={tuple(maps.shape[1:])}: the head reads {self.map_shape}")
        x = Propagated(maps.reshape(maps.shape[0], -1).astype(np.float64), np.zeros((maps.shape[0], math.prod(self.map_shape))))
        for step in self.steps:
            x = step.propagate(x, self.dtype)
        return x

    @property
    def fan_in(self) -> int:
        return self.denses[0].fan_in

    def describe(self, preset: str, rank: int) -> list[dict[str, Any]]:
        """One entry per Dense: its spec, the conv spec it becomes and the kernel mapping's code."""
        from equivcheck.planning import plan
        from equivcheck.presets import spec

        rows = []
        for d in self.denses:
            sp = d.spec.spatial or (1,) * rank
            target = spec(f"{preset}:conv", channels=d.spec.channels, kernel_size=sp, units=d.spec.units, bias=d.spec.bias)
            m = plan(d.spec, target)
            rows.append({"layer": d.name, "dense": d.spec.describe(), "conv": target.describe(),
                         "kernel": [list(d.spec.kernel_shape), list(target.kernel_shape)], "numpy": m.code("numpy"),
                         "activation": d.activation})
        return rows

    def judge(self, actual: Any, exact: Propagated) -> Comparison:
        """:func:`~equivcheck.compare.compare` with the propagated bound carried in its magnitude term.

        compare's bound is affine in the magnitude ``m``: ``base + slope·m``; ``m`` is chosen
        so that the bound is the larger of ``d`` and ``base`` (its bound for an exact input).
        """
        from equivcheck import compare as _compare

        acc = accumulation_dtype(self.dtype)
        if hasattr(_compare, "error_bound"):
            zeros = np.zeros_like(exact.v)
            base = _compare.error_bound(exact.v, zeros, dtype=self.dtype, fan_in=self.fan_in, accumulate=acc)
            slope = _compare.error_bound(exact.v, zeros + 1.0, dtype=self.dtype, fan_in=self.fan_in, accumulate=acc) - base
        else:  # the original formula: u_out·|e| + 4·√n·u_acc·m + 64·tiny
            base = unit_roundoff(self.dtype) * np.abs(exact.v) + _tiny(self.dtype)
            slope = ACCUMULATION_FACTOR * math.sqrt(self.fan_in) * unit_roundoff(acc)
        magnitude = np.maximum(exact.d - base, 0.0) / slope
        return compare(actual, exact.v, magnitude, dtype=self.dtype, fan_in=self.fan_in, accumulate=acc)
