"""Plausible wrong conversions, used to show a check can tell right from wrong.

Each :class:`Mutant` is a wrong source→target conversion of the kind people write by hand:
a flip forgotten or added, a flip on one axis only, the wrong flatten order, a dense kernel
reshaped instead of transposed, a kernel reshaped straight into the target shape, kernel axes
or in/out channels exchanged (a transposed conv's included), a depthwise kernel's channels
read ``m·C + c`` instead of ``c·M + m``, the bias left in the other channel order, or the
padding put on the other side (TF's ``same`` pads after, torch's ``padding=1`` before and
after). Each names the :class:`Convention` it breaks. A verification runs every mutant on the
same data and expects each to fail; a mutant that changes nothing on this shape (a flip of a
1-wide axis) cannot be told apart and is marked ambiguous — never counted as rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any

from equivcheck.errors import EquivcheckError
from equivcheck.mapping import Flip, Mapping
from equivcheck.planning import plan
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec

__all__ = ["Convention", "Mutant", "convention_of", "mutants"]


class Convention(str, Enum):
    """What a wrong conversion gets wrong: one column of the report's convention matrix."""

    FLIP = "flip"
    FLATTEN_ORDER = "flatten order"
    KERNEL_TRANSPOSED = "kernel transposed"
    KERNEL_AXES = "kernel axes"
    CHANNELS = "channels"
    CHANNEL_ORDER = "channel order"
    PADDING = "padding"
    BIAS = "bias"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Mutant:
    """A wrong conversion: ``mapping`` for the kernel, ``bias`` for the bias (None: the right one)
    and, for a padding mistake, the ``target`` layer it amounts to."""

    name: str
    description: str
    mapping: Mapping
    convention: Convention
    ambiguous: bool = False  # changes nothing on this shape: cannot be rejected here
    bias: Mapping | None = None
    target: LayerSpec | None = None


# Names of mutants in reports written before each mutant carried its convention.
_LEGACY = (("flip", Convention.FLIP), ("flatten", Convention.FLATTEN_ORDER), ("transpos", Convention.KERNEL_TRANSPOSED),
           ("reshape", Convention.KERNEL_TRANSPOSED), ("axes", Convention.KERNEL_AXES), ("channel", Convention.CHANNELS))


def convention_of(mutation: dict | str) -> str:
    """The convention column of a serialised mutation (its ``convention``; from the name in older reports)."""
    if isinstance(mutation, dict):
        if mutation.get("convention"):
            return str(mutation["convention"])
        mutation = str(mutation.get("name", ""))
    name = mutation.lower()
    return next((c.value for word, c in _LEGACY if word in name), mutation)


def _reread(m: Mapping, perm: tuple[int, ...]) -> Mapping:
    """Permute the target kernel's axes and read the result back at the target shape."""
    return m.transpose(*perm).reshape(*m.out_shape)


def _spatial_positions(spec: ConvSpec) -> list[int]:
    return [spec.kernel_layout.index(a) for a in spec.letters]


def _flip_name(source: LayerSpec, target: LayerSpec) -> str:
    """``"missing flip"`` when the right conversion flips the kernel, else ``"spurious flip"``."""
    ops = {getattr(s, "op", "correlate") for s in (source, target) if isinstance(s, ConvSpec)}
    return "missing flip" if ops == {"correlate", "convolve"} or (
        "convolve" in ops and (isinstance(source, DenseSpec) or isinstance(target, DenseSpec))
    ) else "spurious flip"


def _flips(conv: ConvSpec, flip: Callable[..., Mapping], flip_name: str) -> list[tuple[str, str, Mapping]]:
    """A flip of every spatial axis, and of each axis alone (rank > 1), of ``conv``'s kernel."""
    spatial = _spatial_positions(conv)
    out = [(flip_name, "kernel flipped 180° in space relative to the right conversion", flip(*spatial))]
    if len(spatial) > 1:
        for pos, letter in zip(spatial, conv.letters):
            out.append((f"flip {letter} only", f"kernel reversed along {letter} alone", flip(pos)))
    return out


def _depthwise_order(conv: ConvSpec, m: Mapping, axis_of: str) -> Mapping | None:
    """``m`` followed by reading channel ``c·M + m`` as ``m·C + c`` along the layout's ``O`` (or ``IM``) axes."""
    c, mult = conv.in_channels, conv.out_channels // conv.in_channels
    shape = list(m.out_shape)
    if axis_of == "O":
        o = conv.kernel_layout.index("O")
        split = [*shape[:o], c, mult, *shape[o + 1:]]
        perm = list(range(len(split)))
        perm[o], perm[o + 1] = o + 1, o
        return m.reshape(*split).transpose(*perm).reshape(*shape)
    i, k = conv.kernel_layout.index("I"), conv.kernel_layout.index("M")
    if k != i + 1:
        return None
    flat = [*shape[:i], c * mult, *shape[k + 1:]]
    return m.reshape(*flat).reshape(*shape[:i], mult, c, *shape[k + 1:]).transpose(
        *range(i), i + 1, i, *range(i + 2, len(shape))).reshape(*shape)


def mutants(source: LayerSpec, target: LayerSpec, mapping: Mapping | None = None) -> list[Mutant]:
    """The catalogue of wrong conversions from ``source`` to ``target`` (``mapping``: the right one)."""
    return list(_catalogue(source, target, mapping if mapping is not None else plan(source, target)))


@lru_cache(maxsize=256)
def _catalogue(source: LayerSpec, target: LayerSpec, right: Mapping) -> tuple[Mutant, ...]:
    """:func:`mutants`, built once per spec pair (specs and mappings are immutable)."""
    out: list[Mutant] = []

    def add(name: str, description: str, m: Mapping, convention: Convention, **wrong: Any) -> None:
        out.append(Mutant(name, description, m, convention, ambiguous=m.equivalent(right) and not wrong, **wrong))

    flip_name = _flip_name(source, target)
    if isinstance(target, ConvSpec):
        for name, description, m in _flips(target, right.flip, flip_name):
            add(name, description, m, Convention.FLIP)
        spatial = _spatial_positions(target)
        if len(spatial) > 1:
            perm = list(range(len(target.kernel_layout)))
            perm[spatial[-2]], perm[spatial[-1]] = perm[spatial[-1]], perm[spatial[-2]]
            a, b = target.letters[-2:]
            add("kernel axes permuted", f"{a} and {b} of the kernel exchanged", _reread(right, tuple(perm)), Convention.KERNEL_AXES)
        if "O" in target.kernel_layout:
            o, i = target.kernel_layout.index("O"), target.kernel_layout.index("I")
            perm = list(range(len(target.kernel_layout)))
            perm[o], perm[i] = perm[i], perm[o]
            if target.transposed:
                add("transposed in/out swapped", "transposed-conv kernel read as (out, in): in and out channels exchanged",
                    _reread(right, tuple(perm)), Convention.CHANNELS)
            else:
                add("channels permuted", "in and out channels of the kernel exchanged", _reread(right, tuple(perm)),
                    Convention.CHANNELS)
        _depthwise_mutants(target, right, add)
        _padding_mutant(target, right, add)
    elif isinstance(source, ConvSpec):  # conv -> dense: the flip belongs to the source kernel

        def source_flip(*axes: int) -> Mapping:
            return Mapping(source.kernel_shape, (Flip(axes),)).then(right)

        for name, description, m in _flips(source, source_flip, flip_name):
            add(name, description, m, Convention.FLIP)

    both = isinstance(source, DenseSpec) and isinstance(target, DenseSpec)
    for dense, is_source in ((source, True), (target, False)):
        if not isinstance(dense, DenseSpec) or dense.rank == 0:
            continue
        side = (" (source)" if is_source else " (target)") if both else ""
        letters = dense.map_letters
        other = letters if dense.flatten != letters else letters[1:] + "C"
        try:
            wrong = dense.replace(flatten=other)
            m = plan(wrong, target) if is_source else plan(source, wrong)
        except EquivcheckError:
            continue
        add(f"wrong flatten order{side}", f"map flattened as {other} instead of {dense.flatten}", m, Convention.FLATTEN_ORDER)
        swapped = "OI" if dense.kernel_layout == "IO" else "IO"
        wrong = dense.replace(kernel_layout=swapped)
        if is_source:
            m = Mapping.identity(dense.kernel_shape).reshape(*wrong.kernel_shape).then(plan(wrong, target))
        else:
            m = plan(source, wrong).reshape(*dense.kernel_shape)
        add(f"dense kernel not transposed{side}", "dense kernel reshaped where it needed a transpose", m,
            Convention.KERNEL_TRANSPOSED)
    if not right.is_reshape:  # last: the catch-all name for a kernel left in its source order
        add("reshape only", "kernel reshaped straight into the target shape, without transpose or flip",
            Mapping.identity(source.kernel_shape).reshape(*target.kernel_shape), Convention.KERNEL_TRANSPOSED)
    return tuple(_unique(out))


def _depthwise_mutants(target: ConvSpec, right: Mapping, add: Callable[..., None]) -> None:
    """Channel ``c·M + m`` read as ``m·C + c`` (Keras's (…, C, M) against torch's (C·M, 1, …)), in the kernel or the bias."""
    c = target.in_channels
    mult = target.out_channels // c
    depthwise = target.groups == c and not target.transposed
    if not depthwise or c < 2 or mult < 2:
        return
    wrong = _depthwise_order(target, right, "M" if target.is_depthwise_layout else "O")
    if wrong is None:
        return
    add("depthwise channel order", f"output channel c*{mult} + m read as m*{c} + c in the kernel", wrong,
        Convention.CHANNEL_ORDER)
    if target.bias:
        order = Mapping.identity((c * mult,)).reshape(c, mult).transpose(1, 0).reshape(c * mult)
        add("bias in the other channel order", f"bias of channel c*{mult} + m read as m*{c} + c, the kernel right",
            right, Convention.BIAS, bias=order)


def _padding_mutant(target: ConvSpec, right: Mapping, add: Callable[..., None]) -> None:
    """The spec's padding on the other side of each axis: TF's ``same`` (extra after) against torch's (before too)."""
    pads = target.pads()
    if target.transposed or all(lo == hi for lo, hi in pads):
        return
    mirrored = target.replace(padding=tuple((hi, lo) for lo, hi in pads))
    add("padding on the other side", f"pads {pads} applied as {mirrored.pads()} (e.g. torch padding=1 for TF 'same')",
        right, Convention.PADDING, target=mirrored)


def _unique(found: list[Mutant]) -> list[Mutant]:
    """Drop a rejectable mutant that changes the same as an earlier one (keeps the first name)."""
    kept: list[Mutant] = []
    seen: set[tuple] = set()
    for m in found:
        key = (m.mapping.simplify().ops, None if m.bias is None else m.bias.simplify().ops, m.target)
        if m.ambiguous or key not in seen:
            kept.append(m)
            if not m.ambiguous:
                seen.add(key)
    return kept
