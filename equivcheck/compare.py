"""The verdict: do two outputs agree, given the dtype they were computed in?

One fixed rtol/atol is wrong at both ends: too loose to catch a swapped pair of weights at
small fan-in, too tight for bfloat16 at fan-in 25088. The bound here is per output
element ``j``, from how the output was computed:

    |y_j - ŷ_j| ≤ u_out·|ŷ_j| + k·√n·u_acc·(|W|·|x|)_j + tiny

where ``ŷ`` is the exact result (float64 on the very same rounded weights and inputs),
``u_out`` the unit roundoff of the output dtype (one final rounding), ``u_acc`` that of
the accumulation (float32 for float16/bfloat16 on CPUs; 2⁻¹¹ when TF32 matmul is active),
``n`` the fan-in, and ``(|W|·|x|)_j`` the same layer run on absolute values — the classic
forward error bound of a dot product, with √n for rounding errors that do not all align.
NaN or Inf in the result never passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Comparison", "compare", "unit_roundoff"]

_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "tf32": 2.0**-11, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Safety factor on the accumulation term: the √n estimate is probabilistic.
ACCUMULATION_FACTOR = 4.0


def unit_roundoff(dtype: str) -> float:
    """Unit roundoff (half an ulp at 1) of a dtype name."""
    from equivcheck.errors import SpecError

    if dtype not in _UNIT_ROUNDOFF:
        raise SpecError(f"dtype={dtype!r} has no known rounding: expected one of {', '.join(_UNIT_ROUNDOFF)}")
    return _UNIT_ROUNDOFF[dtype]


def accumulation_dtype(dtype: str, *, tf32: bool = False) -> str:
    """The precision CPU frameworks accumulate ``dtype`` products in."""
    if dtype == "float64":
        return "float64"
    return "tf32" if tf32 and dtype == "float32" else "float32"


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
) -> Comparison:
    """Compare ``actual`` with ``exact`` (float64), where ``magnitude`` is ``|W|·|x|`` per element.

    All three have one shape. ``dtype`` is what the layer computed in; ``accumulate``
    defaults to :func:`accumulation_dtype` of it.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(exact, dtype=np.float64)
    mag = np.asarray(magnitude, dtype=np.float64)
    if a.shape != e.shape or mag.shape != e.shape:
        from equivcheck.errors import VerificationError

        raise VerificationError(f"output shape={a.shape} does not match the expected shape={e.shape}")
    accumulate = accumulate or accumulation_dtype(dtype)
    u_out, u_acc = unit_roundoff(dtype), unit_roundoff(accumulate)
    tiny = np.finfo(np.float32).tiny if dtype != "float64" else np.finfo(np.float64).tiny
    bound = u_out * np.abs(e) + ACCUMULATION_FACTOR * math.sqrt(max(fan_in, 1)) * u_acc * mag + 64 * tiny
    finite = np.isfinite(a)
    nonfinite = int(a.size - np.count_nonzero(finite))
    err = np.where(finite, np.abs(a - e), np.inf)
    ratio = err / bound
    if a.size == 0:
        return Comparison(True, dtype, accumulate, fan_in, 0.0, 0.0, 0.0, 0.0, (), 0.0, 0, 0)
    worst = np.unravel_index(int(np.argmax(ratio)), a.shape)
    rel = np.where(np.abs(e) > 0, err / np.maximum(np.abs(e), tiny), np.where(err > 0, np.inf, 0.0))
    out = int(np.count_nonzero(~(ratio <= 1.0)))
    return Comparison(
        passed=nonfinite == 0 and out == 0,
        dtype=dtype,
        accumulate=accumulate,
        fan_in=int(fan_in),
        max_abs_error=float(np.max(err)),
        max_rel_error=float(np.max(rel)),
        max_error_ratio=float(ratio[worst]),
        bound_at_worst=float(bound[worst]),
        worst_index=tuple(int(i) for i in worst),
        fraction_out_of_bound=out / a.size,
        nonfinite=nonfinite,
        elements=int(a.size),
    )
