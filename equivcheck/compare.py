"""The verdict: do two outputs agree, given the dtype they were computed in?

One fixed rtol/atol is wrong at both ends: too loose to catch a swapped pair of weights at
small fan-in, too tight for bfloat16 at fan-in 25088. The bound here is per output
element ``j``, from how the output was computed:

    |y_j - ŷ_j| ≤ u_out·(|ŷ_j| + |ŷ⁰_j|) + 2·u_prod·m_j + k·√n·u_acc·m_j + floor

- ``ŷ`` is the exact result (float64 on the very same rounded weights and inputs) and
  ``ŷ⁰`` the same without the bias: the output is rounded to its dtype at most twice, once
  after the sum and once after the bias is added (Keras and torch's float16 paths add the
  bias in a separate rounded step; a fused path rounds once and stays within the bound).
- ``m = |W|·|x|`` is the same layer run on absolute values, ``n`` the fan-in.
- ``u_acc`` is the unit roundoff of the precision the sums run in, as the backend's probe
  measured it on this machine (:mod:`equivcheck.backends.probe`): float32, the dtype, or a
  measured ``"2^-k"`` in between; ``k·√n`` (``k`` = 4) is the probabilistic growth of
  rounding errors that do not all align (Higham & Mary, 2019).
- ``u_prod`` is non-zero only when float32 products are formed from rounded inputs: TF32
  (``u = 2⁻¹¹``) or bfloat16 passes (``u = 2⁻⁸``). Each product then carries its own
  relative error, summed without cancellation: ``2·u_prod·m``.
- ``floor`` is two subnormal steps of the output dtype (rounding near zero is absolute).

NaN or Inf in the result never passes. Reduced-precision float32 matmul is detected from
frameworks that are already imported (never importing one) and recorded in the result.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "Comparison",
    "accumulation_dtype",
    "compare",
    "error_bound",
    "growth_factor",
    "output_floor",
    "reduced_precision_matmul",
    "unit_roundoff",
]

_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "tf32": 2.0**-11, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Smallest positive (subnormal) number of each output dtype.
_SUBNORMAL = {"float64": 5e-324, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}
# float32 matmul modes whose products are formed from inputs rounded to fewer bits.
_PRODUCT_ROUNDOFF = {"tf32": 2.0**-11, "bf16x": 2.0**-8}
# Safety factor on the accumulation term: the √n estimate is probabilistic.
ACCUMULATION_FACTOR = 4.0


@functools.lru_cache(maxsize=64)
def unit_roundoff(dtype: str) -> float:
    """Unit roundoff (half an ulp at 1) of a dtype name, or of a measured precision ``"2^-k"``.

    ``"2^-k"`` is what a probe measured for sums that are neither float32 nor the dtype
    throughout (blocked sums rounded to the dtype between blocks): see
    :mod:`equivcheck.backends.probe`.
    """
    from equivcheck.errors import SpecError

    if isinstance(dtype, str) and dtype.startswith("2^-") and dtype[3:].isdigit():
        return 2.0 ** -int(dtype[3:])
    if dtype not in _UNIT_ROUNDOFF:
        raise SpecError(f"dtype={dtype!r} has no known rounding: expected one of {', '.join(_UNIT_ROUNDOFF)} or '2^-k'")
    return _UNIT_ROUNDOFF[dtype]


def reduced_precision_matmul() -> dict[str, str]:
    """float32 matmul modes that round inputs, per framework already imported: ``{"torch": "tf32"}``.

    Checks torch's ``allow_tf32`` flags and float32 matmul precision and TensorFlow's
    TensorFloat-32 switch (which only acts where a GPU is visible). Never imports a framework.
    """
    found: dict[str, str] = {}
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            precision = torch.get_float32_matmul_precision()
            if precision == "medium":
                found["torch"] = "bf16x"
            elif precision != "highest" or torch.backends.cuda.matmul.allow_tf32 or (
                torch.cuda.is_available() and torch.backends.cudnn.allow_tf32
            ):
                found["torch"] = "tf32"
        except (AttributeError, RuntimeError):
            pass
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        try:
            if tf.config.experimental.tensor_float_32_execution_enabled() and tf.config.list_physical_devices("GPU"):
                found["tensorflow"] = "tf32"
        except (AttributeError, RuntimeError):
            pass
    return found


def accumulation_dtype(dtype: str, *, tf32: bool = False) -> str:
    """The precision CPU frameworks accumulate ``dtype`` products in (``"tf32"`` when asked for)."""
    if dtype == "float64":
        return "float64"
    return "tf32" if tf32 and dtype == "float32" else "float32"


def _split_accumulate(accumulate: str) -> tuple[float, float]:
    """(u_prod, u_acc) for an accumulation name."""
    if accumulate in _PRODUCT_ROUNDOFF:
        return _PRODUCT_ROUNDOFF[accumulate], _UNIT_ROUNDOFF["float32"]
    return 0.0, unit_roundoff(accumulate)


@functools.lru_cache(maxsize=1024)
def growth_factor(accumulate: str, fan_in: int) -> float:
    """The bound's factor on ``|W|·|x|``: ``2·u_prod + c·√n·u_acc`` for an accumulation name and fan-in."""
    u_prod, u_acc = _split_accumulate(accumulate)
    return 2 * u_prod + ACCUMULATION_FACTOR * math.sqrt(max(int(fan_in), 1)) * u_acc


def output_floor(dtype: str) -> float:
    """The bound's absolute term: two subnormal steps of the output dtype (and of float32, the sums')."""
    return 2 * _SUBNORMAL[dtype] + (0.0 if dtype == "float64" else 2 * _SUBNORMAL["float32"])


def error_bound(
    exact: Any,
    magnitude: Any,
    *,
    dtype: str,
    fan_in: int,
    accumulate: str | None = None,
    exact_without_bias: Any = None,
) -> np.ndarray:
    """The per-element bound of the module docstring, as a float64 array."""
    e = np.abs(np.asarray(exact, dtype=np.float64))
    e0 = e if exact_without_bias is None else np.abs(np.asarray(exact_without_bias, dtype=np.float64))
    return _bound(e, e0, np.asarray(magnitude, dtype=np.float64), dtype, fan_in, accumulate)


def _bound(abs_exact: np.ndarray, abs_exact0: np.ndarray, mag: np.ndarray, dtype: str, fan_in: int,
           accumulate: str | None) -> np.ndarray:
    """:func:`error_bound` from ``|ŷ|``, ``|ŷ⁰|`` and ``m`` (float64): the same operations, in place."""
    bound = np.add(abs_exact, abs_exact0)
    bound *= unit_roundoff(dtype)
    bound += growth_factor(accumulate or accumulation_dtype(dtype), fan_in) * mag
    bound += output_floor(dtype)
    return bound


@dataclass(frozen=True)
class Comparison:
    """How far ``actual`` is from the exact result, against the bound."""

    passed: bool
    dtype: str
    accumulate: str
    fan_in: int
    max_abs_error: float
    max_rel_error: float
    max_error_ratio: float  # max over elements of error / bound; ≤ 1 passes
    bound_at_worst: float
    worst_index: tuple[int, ...]
    fraction_out_of_bound: float
    nonfinite: int
    elements: int
    reduced_precision: str = ""  # e.g. "torch: tf32" when a framework rounds float32 matmul inputs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["worst_index"] = list(self.worst_index)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def summary(self) -> str:
        if self.nonfinite:
            return f"{self.nonfinite} NaN/Inf of {self.elements} outputs"
        return (
            f"max |err| {self.max_abs_error:.3g} (bound {self.bound_at_worst:.3g} at {self.worst_index}), "
            f"{self.fraction_out_of_bound:.1%} out of bound"
        )


def compare(
    actual: Any,
    exact: Any,
    magnitude: Any,
    *,
    dtype: str,
    fan_in: int,
    accumulate: str | None = None,
    exact_without_bias: Any = None,
) -> Comparison:
    """Compare ``actual`` with ``exact`` (float64), where ``magnitude`` is ``|W|·|x|`` per element.

    All arrays have one shape. ``dtype`` is what the layer computed in; ``accumulate``
    defaults to :func:`accumulation_dtype` of it; a plain ``"float32"`` becomes the reduced
    float32 matmul mode an imported framework has switched on (:func:`reduced_precision_matmul`).
    ``exact_without_bias`` is the exact output before the bias is added; without it the
    bound assumes the bias is added in the same rounding as the sum.
    """
    from equivcheck.errors import VerificationError

    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(exact, dtype=np.float64)
    mag = np.asarray(magnitude, dtype=np.float64)
    shapes = {a.shape, e.shape, mag.shape}
    if exact_without_bias is not None:
        shapes.add(np.shape(exact_without_bias))
    if len(shapes) != 1:
        raise VerificationError(f"output shape={a.shape} does not match the expected shape={e.shape}")
    reduced = reduced_precision_matmul() if dtype == "float32" else {}
    if accumulate is None:
        accumulate = accumulation_dtype(dtype)
    if reduced and accumulate == "float32":  # a framework rounds float32 matmul inputs: widen the bound
        accumulate = "bf16x" if "bf16x" in reduced.values() else "tf32"
    note = ", ".join(f"{k}: {v}" for k, v in sorted(reduced.items()))
    if a.size == 0:
        return Comparison(True, dtype, accumulate, int(fan_in), 0.0, 0.0, 0.0, 0.0, (), 0.0, 0, 0, note)
    abs_e = np.abs(e)
    abs_e0 = abs_e if exact_without_bias is None else np.abs(np.asarray(exact_without_bias, dtype=np.float64))
    bound = _bound(abs_e, abs_e0, mag, dtype, fan_in, accumulate)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.subtract(a, e)
        np.abs(err, out=err)
        # A finite largest error: every output and exact value is finite (the common case, checked in one pass)
        everywhere_finite = math.isfinite(err.max())
        nonfinite = 0
        if not everywhere_finite:
            finite = np.isfinite(a)
            nonfinite = int(a.size - np.count_nonzero(finite))
            if nonfinite:
                err[~finite] = np.inf
        ratio = err / bound
        if not everywhere_finite:
            nan_exact = np.isnan(e)
            if nan_exact.any():
                ratio[nan_exact] = np.inf
        worst = np.unravel_index(int(ratio.argmax()), a.shape)
        rel = err / np.maximum(abs_e, np.finfo(np.float64).tiny)
        nonzero = abs_e > 0
        if not nonzero.all():  # a zero exact value: any error there is infinitely large relative to it
            rel = np.where(nonzero, rel, np.where(err > 0, np.inf, 0.0))
    # all finite and the bound positive: no NaN ratio, so none over 1 where the largest is not
    out = 0 if everywhere_finite and ratio[worst] <= 1.0 else int(a.size - np.count_nonzero(ratio <= 1.0))
    return Comparison(
        passed=nonfinite == 0 and out == 0,
        dtype=dtype,
        accumulate=accumulate,
        fan_in=int(fan_in),
        max_abs_error=float(err.max()),
        max_rel_error=float(rel.max()),
        max_error_ratio=float(ratio[worst]),
        bound_at_worst=float(bound[worst]),
        worst_index=tuple(int(i) for i in worst),
        fraction_out_of_bound=out / a.size,
        nonfinite=nonfinite,
        elements=int(a.size),
        reduced_precision=note,
    )
