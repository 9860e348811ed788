"""The dtypes equivcheck computes in, by name: one table, one lookup."""

from __future__ import annotations

import numpy as np

from equivcheck.errors import SpecError

__all__ = ["DTYPES", "np_dtype"]

DTYPES = ("float64", "float32", "float16", "bfloat16")


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name; bfloat16 through ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise SpecError(f"dtype={name!r} is not supported: expected one of {', '.join(DTYPES)}")
    return np.dtype(name)
