"""Hypothesis strategies for layer specs, spec pairs, backends, dtypes, weights and inputs.

In the style of ``hypothesis.extra.numpy``: plain functions with keyword-only ``min_*``/``max_*``
arguments, validated when called (a bad argument raises :class:`~equivcheck.errors.SpecError`
at once, not at draw time), composable with ``st.*``, shrinking toward the smallest shape
and the first preset.

Data is built so that conventions can be told apart. :func:`sample_weights` and
:func:`sample_inputs` (seeded numpy, used by :func:`weights`, :func:`inputs` and the checker)
never produce all-zero or all-equal arrays, kernels or inputs that a flip of a spatial axis
leaves unchanged, or a bias with repeated values. Inputs are *sparse*: each sample holds at
most :data:`NONZEROS` non-zero values per output's receptive field, and every input position is
non-zero in :data:`COVERAGE` samples. A wrong weight then changes some output by an amount the
comparator's bound (which grows with the fan-in of the non-zero products) cannot hide, even at
fan-in 25088 in bfloat16 — see docs/comparator.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from equivcheck.data import (
    BIAS_SCALE,
    COVERAGE,
    MIN_BATCH,
    NONZEROS,
    checked_int,
    detection_batch,
    fan_in,
    sample_inputs,
    sample_weights,
)
from equivcheck.errors import SpecError
from equivcheck.presets import PRESETS, spec
from equivcheck.specs import DATA_FORMATS, ConvSpec, DenseSpec, LayerSpec

__all__ = [
    "BIAS_SCALE",
    "COVERAGE",
    "KINDS",
    "MIN_BATCH",
    "NONZEROS",
    "backends",
    "conv_specs",
    "dense_specs",
    "detection_batch",
    "dtypes",
    "fan_in",
    "inputs",
    "sample_inputs",
    "sample_weights",
    "spec_pairs",
    "weights",
]

#: Spec pair kinds :func:`spec_pairs` draws from (``conv_transpose->conv_transpose`` on request).
KINDS = ("dense->conv", "conv->dense", "dense->dense", "conv->conv")
_ALL_KINDS = (*KINDS, "conv_transpose->conv_transpose")
_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


# -- argument validation -----------------------------------------------------------------
def _range(name: str, lo: Any, hi: Any, floor: int = 1) -> tuple[int, int]:
    lo, hi = checked_int(f"min_{name}", lo, floor), checked_int(f"max_{name}", hi, floor)
    if lo > hi:
        raise SpecError(f"min_{name}={lo} is greater than max_{name}={hi}: expected min_{name} <= max_{name}")
    return lo, hi


def _choices(name: str, values: Any, allowed: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    if values is None:
        return tuple(default)
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values:
        raise SpecError(f"{name}=() is empty: expected at least one of {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise SpecError(f"{name} contains {v!r}: expected names from {', '.join(allowed)}")
    return values


def _presets_with(layer: str, presets: Any) -> tuple[str, ...]:
    names = _choices("presets", presets, tuple(PRESETS), tuple(PRESETS))
    usable = tuple(p for p in names if layer in PRESETS[p].layers())
    if not usable:
        raise SpecError(f"presets={names} have no {layer!r} layer: expected at least one preset that has it")
    return usable


# -- strategies ----------------------------------------------------------------------------
def dtypes(*, names: Sequence[str] | None = None) -> st.SearchStrategy[str]:
    """Dtype names, shrinking toward the first (``float32`` by default)."""
    from equivcheck.dtypes import DTYPES

    default = ("float32", *(d for d in DTYPES if d != "float32"))
    return st.sampled_from(_choices("names", names, DTYPES, default))


def backends(
    *, names: Sequence[str] | None = None, min_size: int = 1, max_size: int | None = None
) -> st.SearchStrategy[tuple[str, ...]]:
    """Subsets of the installed backends (of ``names`` when given), as tuples; shrinks toward ``("numpy",)``."""
    from equivcheck import backends as registry

    known = tuple(registry.BACKENDS)
    wanted = _choices("names", names, known, known)
    installed = tuple(n for n in wanted if registry.get(n).available())
    if not installed:
        raise SpecError(f"backends names={wanted} are not installed: pip install 'equivcheck[all]' or pick from {known}")
    lo = checked_int("min_size", min_size, 0)
    hi = len(installed) if max_size is None else checked_int("max_size", max_size, 0)
    if lo > min(hi, len(installed)):
        raise SpecError(
            f"min_size={lo} is more than the {min(hi, len(installed))} backends available "
            f"({', '.join(installed)}): lower min_size or install more frameworks"
        )
    return st.lists(st.sampled_from(installed), min_size=lo, max_size=hi, unique=True).map(tuple)


def _sides(rank: st.SearchStrategy[int], lo: int, hi: int) -> st.SearchStrategy[tuple[int, ...]]:
    return rank.flatmap(lambda r: st.tuples(*(st.integers(lo, hi) for _ in range(r))))


def dense_specs(
    *,
    presets: Sequence[str] | None = None,
    min_channels: int = 1,
    max_channels: int = 8,
    min_rank: int = 1,
    max_rank: int = 2,
    min_side: int = 1,
    max_side: int = 6,
    min_units: int = 1,
    max_units: int = 8,
    bias: bool | None = None,
) -> st.SearchStrategy[DenseSpec]:
    """``PRESET:dense`` specs reading a ``channels × spatial`` map (rank 0: plain features)."""
    names = _presets_with("dense", presets)
    c_lo, c_hi = _range("channels", min_channels, max_channels)
    r_lo, r_hi = _range("rank", min_rank, max_rank, 0)
    if r_hi > 3:
        raise SpecError(f"max_rank={r_hi} is too large: expected at most 3 spatial axes")
    s_lo, s_hi = _range("side", min_side, max_side)
    u_lo, u_hi = _range("units", min_units, max_units)
    biases = st.booleans() if bias is None else st.just(bool(bias))

    @st.composite
    def build(draw: st.DrawFn) -> DenseSpec:
        preset = draw(st.sampled_from(names))
        spatial = draw(_sides(st.integers(r_lo, r_hi), s_lo, s_hi))
        return spec(f"{preset}:dense", channels=draw(st.integers(c_lo, c_hi)), spatial=spatial,
                    units=draw(st.integers(u_lo, u_hi)), bias=draw(biases))

    return build()


def _geometry(
    draw: st.DrawFn, *, rank: int, s: tuple[int, int], k: tuple[int, int], max_stride: int, max_dilation: int
) -> dict[str, tuple[int, ...]]:
    """Spatial size, kernel size, stride and dilation per axis, kernel fitting the map."""
    spatial, kernel, stride, dilation = [], [], [], []
    for _ in range(rank):
        n = draw(st.integers(max(s[0], k[0]), max(s[1], k[0])))
        kk = draw(st.integers(k[0], min(k[1], n)))
        d_hi = max_dilation if kk == 1 else max(1, min(max_dilation, (n - 1) // (kk - 1)))
        dilation.append(draw(st.integers(1, d_hi)))
        stride.append(draw(st.integers(1, max_stride)))
        spatial.append(n)
        kernel.append(kk)
    return {"spatial": tuple(spatial), "kernel_size": tuple(kernel), "stride": tuple(stride), "dilation": tuple(dilation)}


def _grouped_channels(draw: st.DrawFn, c: tuple[int, int], u: tuple[int, int], max_groups: int,
                      per_group: int = 1) -> tuple[int, int, int]:
    """(groups, channels, units): groups divides both and leaves ``per_group`` channels per group."""
    fits = [g for g in range(1, max_groups + 1)
            if max(math.ceil(c[0] / g), per_group) <= c[1] // g and max(math.ceil(u[0] / g), per_group) <= u[1] // g]
    g = draw(st.sampled_from(fits)) if fits else 1
    ch = g * draw(st.integers(max(math.ceil(c[0] / g), per_group), max(c[1] // g, per_group)))
    un = g * draw(st.integers(max(math.ceil(u[0] / g), per_group), max(u[1] // g, per_group)))
    return g, ch, un


def conv_specs(
    *,
    presets: Sequence[str] | None = None,
    layers: Sequence[str] = ("conv",),
    min_rank: int = 1,
    max_rank: int = 2,
    min_channels: int = 1,
    max_channels: int = 8,
    min_units: int = 1,
    max_units: int = 8,
    min_side: int = 1,
    max_side: int = 8,
    min_kernel: int = 1,
    max_kernel: int = 3,
    max_stride: int = 1,
    max_dilation: int = 1,
    max_groups: int = 1,
    data_formats: Sequence[str] | None = None,
    paddings: Sequence[Any] = ("valid",),
    bias: bool | None = None,
) -> st.SearchStrategy[ConvSpec]:
    """``PRESET:conv`` (or ``conv_transpose``) specs of rank 1–3.

    ``data_formats`` overrides the preset's map layout (kernel layout and op stay the
    preset's). ``paddings`` holds ``"valid"``, ``"same"`` or an integer per spec.
    """
    layer_names = _choices("layers", layers, ("conv", "conv_transpose"), ("conv",))
    names = {layer: _presets_with(layer, presets) for layer in layer_names}
    r_lo, r_hi = _range("rank", min_rank, max_rank)
    if r_hi > 3:
        raise SpecError(f"max_rank={r_hi} is too large: expected 1, 2 or 3 spatial axes")
    c = _range("channels", min_channels, max_channels)
    u = _range("units", min_units, max_units)
    s = _range("side", min_side, max_side)
    k = _range("kernel", min_kernel, max_kernel)
    if k[0] > s[1]:
        raise SpecError(f"min_kernel={k[0]} is larger than max_side={s[1]}: a kernel must fit the map")
    max_stride, max_dilation, max_groups = (checked_int(n, v, 1) for n, v in (
        ("max_stride", max_stride), ("max_dilation", max_dilation), ("max_groups", max_groups)))
    formats = None if data_formats is None else _choices("data_formats", data_formats, DATA_FORMATS, DATA_FORMATS)
    pads = tuple(paddings)
    for p in pads:
        if p not in ("valid", "same") and (isinstance(p, bool) or not isinstance(p, int) or p < 0):
            raise SpecError(f"paddings contains {p!r}: expected 'valid', 'same' or a non-negative integer")
    if not pads:
        raise SpecError("paddings=() is empty: expected e.g. ('valid',)")
    biases = st.booleans() if bias is None else st.just(bool(bias))

    @st.composite
    def build(draw: st.DrawFn) -> ConvSpec:
        layer = draw(st.sampled_from(layer_names))
        preset = draw(st.sampled_from(names[layer]))
        geo = _geometry(draw, rank=draw(st.integers(r_lo, r_hi)), s=s, k=k, max_stride=max_stride,
                        max_dilation=max_dilation)
        groups, channels, units = _grouped_channels(draw, c, u, max_groups)
        padding = draw(st.sampled_from([p for p in pads if not (layer == "conv_transpose" and p == "same")] or [0]))
        if layer == "conv_transpose" and isinstance(padding, int):  # cropping may not eat the whole output
            padding = min(padding, *(((n - 1) * st_ + d * (kk - 1)) // 2 for n, kk, st_, d in zip(
                geo["spatial"], geo["kernel_size"], geo["stride"], geo["dilation"])))
        extra = {} if formats is None else {"data_format": draw(st.sampled_from(formats))}
        return spec(f"{preset}:{layer}", channels=channels, units=units, groups=groups, padding=padding,
                    bias=draw(biases), **geo, **extra)

    return build()


def spec_pairs(
    *,
    presets: Sequence[str] | None = None,
    kinds: Sequence[str] = KINDS,
    min_channels: int = 2,
    max_channels: int = 6,
    min_units: int = 2,
    max_units: int = 6,
    min_rank: int = 1,
    max_rank: int = 2,
    min_side: int = 2,
    max_side: int = 5,
    max_kernel: int = 3,
    max_stride: int = 2,
    max_dilation: int = 2,
    max_groups: int = 2,
    bias: bool | None = None,
) -> st.SearchStrategy[tuple[LayerSpec, LayerSpec]]:
    """(source, target) spec pairs that :func:`equivcheck.plan` can map, across ``presets``.

    Kinds: ``dense->conv`` (a conv whose kernel covers the map), ``conv->dense``,
    ``dense->dense``, ``conv->conv`` (same geometry, each preset's layout, data format and
    correlation/convolution) and, on request, ``conv_transpose->conv_transpose``. With the
    default minimums (2 for channels, units and every side) every plausible wrong
    conversion of :mod:`equivcheck.mutations` moves some weight, so none is ambiguous.
    """
    kind_names = _choices("kinds", kinds, _ALL_KINDS, KINDS)
    c = _range("channels", min_channels, max_channels)
    u = _range("units", min_units, max_units)
    r_lo, r_hi = _range("rank", min_rank, max_rank)
    if r_hi > 3:
        raise SpecError(f"max_rank={r_hi} is too large: expected 1, 2 or 3 spatial axes")
    s = _range("side", min_side, max_side)
    max_kernel, max_stride, max_dilation, max_groups = (checked_int(n, v, 1) for n, v in (
        ("max_kernel", max_kernel), ("max_stride", max_stride), ("max_dilation", max_dilation),
        ("max_groups", max_groups)))
    k = (min(s[0], max_kernel), max_kernel)
    needed = {"dense": "dense", "conv": "conv", "conv_transpose": "conv_transpose"}
    names = {layer: _presets_with(layer, presets) for kind in kind_names for layer in
             (needed[part] for part in kind.split("->"))}
    biases = st.booleans() if bias is None else st.just(bool(bias))
    per_group = min(2, c[0], u[0])

    @st.composite
    def build(draw: st.DrawFn) -> tuple[LayerSpec, LayerSpec]:
        kind = draw(st.sampled_from(kind_names))
        first, second = kind.split("->")
        a = draw(st.sampled_from(names[first]))
        b = draw(st.sampled_from(names[second]))
        has_bias = draw(biases)
        if "conv" in (first, second) and first != second:  # dense <-> covering conv
            spatial = draw(_sides(st.integers(r_lo, r_hi), s[0], s[1]))
            shape = dict(channels=draw(st.integers(*c)), spatial=spatial, units=draw(st.integers(*u)), bias=has_bias)
            return spec(f"{a}:{first}", **shape), spec(f"{b}:{second}", **shape)
        if first == "dense":
            spatial = draw(_sides(st.integers(r_lo, r_hi), s[0], s[1]))
            shape = dict(channels=draw(st.integers(*c)), spatial=spatial, units=draw(st.integers(*u)), bias=has_bias)
            return spec(f"{a}:dense", **shape), spec(f"{b}:dense", **shape)
        geo = _geometry(draw, rank=draw(st.integers(r_lo, r_hi)), s=s, k=k, max_stride=max_stride,
                        max_dilation=max_dilation)
        groups, channels, units = _grouped_channels(draw, c, u, max_groups, per_group)
        shape = dict(channels=channels, units=units, groups=groups, bias=has_bias, **geo)
        return spec(f"{a}:{first}", **shape), spec(f"{b}:{second}", **shape)

    return build()


def _check_spec(spec_: Any) -> LayerSpec:
    if not isinstance(spec_, (DenseSpec, ConvSpec)):
        raise SpecError(f"spec={spec_!r} is not a DenseSpec or ConvSpec: build one with equivcheck.spec(...)")
    return spec_


def weights(spec: LayerSpec, *, dtype: str = "float32") -> st.SearchStrategy[tuple[np.ndarray, np.ndarray | None]]:
    """``(kernel, bias)`` for ``spec`` in ``dtype``, from :func:`sample_weights` on a drawn seed."""
    from equivcheck.dtypes import np_dtype

    _check_spec(spec)
    np_dtype(dtype)
    return _SEEDS.map(lambda seed: sample_weights(spec, dtype, np.random.default_rng(seed)))


def inputs(spec: LayerSpec, *, batch: int | None = None, dtype: str = "float32") -> st.SearchStrategy[np.ndarray]:
    """Input batches for ``spec`` in its own data format, from :func:`sample_inputs` on a drawn seed."""
    from equivcheck.dtypes import np_dtype

    _check_spec(spec)
    np_dtype(dtype)
    if batch is not None:
        checked_int("batch", batch, 1)
    return _SEEDS.map(lambda seed: sample_inputs(spec, batch, dtype, np.random.default_rng(seed), layout="native"))
