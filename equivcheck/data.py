"""Data that can tell conventions apart: seeded numpy weights and inputs for a layer spec.

Used by :func:`equivcheck.verification.verify_pair`, the checker and the hypothesis strategies in
:mod:`equivcheck.strategies` (this module needs no hypothesis). Never all-zero or all-equal
arrays, kernels or inputs that a flip of a spatial axis leaves unchanged, or a bias with
repeated values. Inputs are *sparse*: each sample holds at most :data:`NONZEROS` non-zero values
per output's receptive field, and every input position is non-zero in :data:`COVERAGE`
samples. A wrong weight then changes some output by an amount the comparator's bound (which
grows with the fan-in of the non-zero products) cannot hide, even at fan-in 25088 in
bfloat16 — see docs/comparator.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.errors import SpecError
from equivcheck.specs import CHANNELS_LAST, LayerSpec, fan_in

__all__ = ["COVERAGE", "NONZEROS", "detection_batch", "fan_in", "nonzeros_for", "sample_inputs", "sample_weights"]

def checked_int(name: str, value: Any, floor: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SpecError(f"{name}={value!r} is not an integer: expected an integer >= {floor}")
    if value < floor:
        raise SpecError(f"{name}={value!r} is too small: expected an integer >= {floor}")
    return int(value)


#: Non-zero inputs per output's receptive field and sample (the rest of the sample is zero).
NONZEROS = 784
#: How many samples of a batch hold each input position non-zero.
COVERAGE = 4
#: Fewest samples in a batch.
MIN_BATCH = 4
#: Bias standard deviation, relative to the output's (without bias).
BIAS_SCALE = 0.25

#: Non-zero inputs per receptive field where a backend sums in less than float32: its rounding
#: noise grows with the non-zero products, a swapped weight's effect does not.
LOW_PRECISION_NONZEROS = 2
#: Most samples :func:`nonzeros_for` lets a batch grow to.
MAX_BATCH = 512


def nonzeros_for(spec: LayerSpec, accumulations: Sequence[str] = ()) -> int:
    """Non-zero inputs per receptive field for data judged under these accumulation precisions.

    :data:`NONZEROS`, or fewer (down to :data:`LOW_PRECISION_NONZEROS`, the batch at most
    :data:`MAX_BATCH`) where a backend sums in less than float32.
    """
    if all(a in ("float64", "float32", "tf32", "bf16x") for a in accumulations):
        return NONZEROS
    return max(LOW_PRECISION_NONZEROS, math.ceil(COVERAGE * fan_in(spec) / MAX_BATCH))


def _density(spec: LayerSpec, nonzeros: int = NONZEROS) -> float:
    return min(1.0, nonzeros / fan_in(spec))


def detection_batch(spec: LayerSpec, nonzeros: int = NONZEROS) -> int:
    """Samples needed so that every input position is non-zero in :data:`COVERAGE` of them."""
    return max(MIN_BATCH, math.ceil(COVERAGE / _density(spec, nonzeros)))


def _round(values: np.ndarray, dtype: str) -> np.ndarray:
    from equivcheck.dtypes import np_dtype

    return values.astype(np_dtype(dtype))


def _flip_invariant(a: np.ndarray, axes: Sequence[int]) -> bool:
    """Whether reversing one of ``axes`` (each longer than 1) leaves ``a`` unchanged.

    The first element against its mirror settles almost every axis without a full comparison.
    """
    first = a.reshape(-1)[:1]
    for ax in axes:
        n = a.shape[ax]
        if n < 2 or (first.size and a[(0,) * ax + (n - 1,) + (0,) * (a.ndim - ax - 1)] != first[0]):
            continue
        if np.array_equal(a, np.flip(a, ax)):
            return True
    return False


def _degenerate(a: np.ndarray) -> bool:
    """All-zero, or all one value (a single element only when it is zero)."""
    flat = a.reshape(-1)
    if flat.size > 1 and flat[0] != flat[1]:  # two values: neither constant nor all zero
        return False
    return flat.size == 0 or not np.any(flat) or (flat.size > 1 and not np.any(flat != flat[0]))


def _bad_samples(x: np.ndarray) -> list[int]:
    """Samples of a batch that are all-zero, constant, or unchanged by a flip of a spatial axis.

    A flip changes a sample when its first non-zero value lands on a different value; only the
    samples where it does not (rare) get the full comparison.
    """
    bits = x.view(f"u{x.dtype.itemsize}")  # compare bits: fast for every dtype (no NaN or -0 is ever drawn)
    flat = bits.reshape(len(x), -1)
    first = np.argmax(flat != 0, axis=1)
    rows = np.arange(len(x))
    bad = flat[rows, first] == 0  # all zero
    if flat.shape[1] > 1:
        bad |= flat.max(axis=1) == flat.min(axis=1)
    shape = x.shape[1:]
    coords = np.unravel_index(first, shape)
    for axis in range(1, len(shape)):
        if shape[axis] < 2:
            continue
        mirrored = list(coords)
        mirrored[axis] = shape[axis] - 1 - coords[axis]
        same = flat[rows, np.ravel_multi_index(tuple(mirrored), shape)] == flat[rows, first]
        for i in np.flatnonzero(same & ~bad):
            bad[i] = np.array_equal(bits[i], np.flip(bits[i], axis))
    return [int(i) for i in np.flatnonzero(bad)]


@functools.lru_cache(maxsize=256)
def _mirror_indices(spec: LayerSpec) -> tuple[int, tuple[int | None, ...]]:
    """Stored (flat) index of the canonical kernel's first weight, and of its mirror along each spatial axis
    (None for an axis of length 1)."""
    from equivcheck.planning import canonical

    to_canonical = canonical(spec)
    shape = to_canonical.out_shape
    coords = np.zeros((len(shape), len(shape) - 1), dtype=np.int64)  # column 0: the first weight
    for k, ax in enumerate(range(2, len(shape)), start=1):
        coords[ax, k] = shape[ax] - 1
    flat = to_canonical.source_indices(tuple(coords)).tolist()
    return flat[0], tuple(flat[k] if shape[ax] > 1 else None for k, ax in enumerate(range(2, len(shape)), start=1))


def sample_weights(spec: LayerSpec, dtype: str, rng: np.random.Generator, *,
                   nonzeros: int = NONZEROS) -> tuple[np.ndarray, np.ndarray | None]:
    """A kernel (in ``spec``'s stored layout) and bias, rounded to ``dtype``.

    Normal with fan-in scaling, redrawn until the kernel is not all-equal and its canonical
    form is changed by a flip of any spatial axis; the bias (a quarter of the output scale
    under :func:`sample_inputs`) has distinct values.
    """
    from equivcheck.planning import canonical

    scale = 1.0 / math.sqrt(fan_in(spec))
    to_canonical = canonical(spec)
    first, mirrors = _mirror_indices(spec)
    for _ in range(100):
        kernel = rng.standard_normal(spec.kernel_shape)
        kernel *= scale
        kernel = _round(kernel, dtype)
        if _degenerate(kernel):
            continue
        flat = kernel.reshape(-1)
        # The canonical kernel's first weight against its mirror on each spatial axis mostly settles the flips.
        if all(m is not None and flat[m] != flat[first] for m in mirrors):
            break
        canon = to_canonical.apply(kernel)
        if not _flip_invariant(canon, range(2, canon.ndim)):
            break
    else:  # pragma: no cover - needs a hundred symmetric draws in a row
        raise SpecError(f"could not draw an asymmetric kernel for {spec.describe()} in dtype={dtype}")
    bias = None
    if spec.bias:
        b_scale = BIAS_SCALE * math.sqrt(_density(spec, nonzeros))
        for _ in range(100):
            bias = _round(rng.standard_normal(spec.bias_shape) * b_scale, dtype)
            ordered = np.sort(bias.astype(np.float64), axis=None)
            if ordered.all() and (ordered[1:] != ordered[:-1]).all():  # no zero, no two alike
                break
    return kernel, bias


def _input_values(count: int, rng: np.random.Generator) -> np.ndarray:
    """Random signs, magnitudes in [0.5, 1.5): never near zero, so every non-zero input counts."""
    signs = _SIGNS[rng.integers(0, 2, size=count)]  # the draws of rng.choice((-1.0, 1.0)), without its checks
    signs *= rng.uniform(0.5, 1.5, size=count)
    return signs


_SIGNS = np.array((-1.0, 1.0))


def sample_inputs(
    spec: LayerSpec, batch: int | None, dtype: str, rng: np.random.Generator, *, layout: str = "canonical",
    nonzeros: int = NONZEROS,
) -> np.ndarray:
    """A batch of input maps for ``spec``, rounded to ``dtype``.

    ``layout="canonical"`` gives ``(batch, channels, *spatial)``; ``"native"`` the spec's own
    data format. ``batch=None`` uses :func:`detection_batch`. Each sample holds at most
    ``nonzeros`` non-zero values per receptive field (see the module docstring and
    :func:`nonzeros_for`), has at least two distinct values and is changed by a flip of any
    spatial axis longer than 1.
    """
    if layout not in ("canonical", "native"):
        raise SpecError(f"layout={layout!r} is not valid: expected 'canonical' or 'native'")
    nonzeros = checked_int("nonzeros", nonzeros, 1)
    b = detection_batch(spec, nonzeros) if batch is None else checked_int("batch", batch, 1)
    shape = (spec.channels, *spec.spatial)
    n = math.prod(shape)
    per_sample = max(1, min(n, round(_density(spec, nonzeros) * n)))
    if per_sample == n:
        x = _round(_input_values(b * n, rng), dtype).reshape(b, n)
    else:  # values rounded first, then scattered: the zeros need no rounding
        from equivcheck.dtypes import np_dtype

        laps = math.ceil(b * per_sample / n)
        cols = np.concatenate([rng.permutation(n) for _ in range(laps)])[: b * per_sample]
        x = np.zeros((b, n), dtype=np_dtype(dtype))
        x[np.repeat(np.arange(b), per_sample), cols] = _round(_input_values(b * per_sample, rng), dtype)
    x = x.reshape(b, *shape)
    for s in _bad_samples(x):
        for _ in range(100):
            flat = x[s].reshape(-1).astype(np.float64)  # a symmetric or constant sample: change one value
            flat[rng.integers(n)] = _input_values(1, rng)[0]
            x[s] = _round(flat, dtype).reshape(shape)
            if not _bad_samples(x[s : s + 1]):
                break
    if layout == "native" and spec.data_format == CHANNELS_LAST and x.ndim > 2:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x
