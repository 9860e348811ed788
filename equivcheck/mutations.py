"""Plausible wrong conversions, used to show a check can tell right from wrong.

Each :class:`Mutant` is a wrong source→target kernel mapping of the kind people write by
hand: a flip forgotten or added, a flip on one axis only, the wrong flatten order, a dense
kernel reshaped instead of transposed, a kernel reshaped straight into the target shape,
kernel axes or channels in the wrong order. A verification runs every mutant on the same
data and expects each to fail; a mutant that moves no element (a flip of a 1-wide axis)
cannot be told apart on this shape and is marked ambiguous — never counted as rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from equivcheck.errors import EquivcheckError
from equivcheck.mapping import Flip, Mapping
from equivcheck.plan import plan
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec

__all__ = ["Mutant", "convention_of", "diagnose", "mutants"]


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    mapping: Mapping
    ambiguous: bool = False  # moves no element: cannot be rejected on this shape

    @property
    def convention(self) -> str:
        return convention_of(self.name)


def convention_of(mutation: str) -> str:
    """The convention a mutant breaks, from its name (an unknown name is its own column)."""
    name = mutation.lower()
    if "flip" in name:
        return "flip"
    if "flatten" in name:
        return "flatten order"
    if "transpos" in name or "reshape" in name:
        return "kernel transposed"
    if "axes" in name:
        return "kernel axes"
    if "channel" in name:
        return "channels"
    return mutation


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


def mutants(source: LayerSpec, target: LayerSpec, mapping: Mapping | None = None) -> list[Mutant]:
    """The catalogue of wrong conversions from ``source`` to ``target`` (``mapping``: the right one)."""
    right = mapping if mapping is not None else plan(source, target)
    out: list[Mutant] = []

    def add(name: str, description: str, m: Mapping) -> None:
        out.append(Mutant(name, description, m, ambiguous=m.equivalent(right)))

    flip_name = _flip_name(source, target)
    if isinstance(target, ConvSpec):
        for name, description, m in _flips(target, right.flip, flip_name):
            add(name, description, m)
        spatial = _spatial_positions(target)
        if len(spatial) > 1:
            perm = list(range(len(target.kernel_layout)))
            perm[spatial[-2]], perm[spatial[-1]] = perm[spatial[-1]], perm[spatial[-2]]
            a, b = target.letters[-2:]
            add("kernel axes permuted", f"{a} and {b} of the kernel exchanged", _reread(right, tuple(perm)))
        if "O" in target.kernel_layout:
            o, i = target.kernel_layout.index("O"), target.kernel_layout.index("I")
            perm = list(range(len(target.kernel_layout)))
            perm[o], perm[i] = perm[i], perm[o]
            add("channels permuted", "in and out channels of the kernel exchanged", _reread(right, tuple(perm)))
    elif isinstance(source, ConvSpec):  # conv -> dense: the flip belongs to the source kernel

        def source_flip(*axes: int) -> Mapping:
            return Mapping(source.kernel_shape, (Flip(axes),)).then(right)

        for name, description, m in _flips(source, source_flip, flip_name):
            add(name, description, m)

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
        add(f"wrong flatten order{side}", f"map flattened as {other} instead of {dense.flatten}", m)
        swapped = "OI" if dense.kernel_layout == "IO" else "IO"
        wrong = dense.replace(kernel_layout=swapped)
        if is_source:
            m = Mapping.identity(dense.kernel_shape).reshape(*wrong.kernel_shape).then(plan(wrong, target))
        else:
            m = plan(source, wrong).reshape(*dense.kernel_shape)
        add(f"dense kernel not transposed{side}", "dense kernel reshaped where it needed a transpose", m)
    if not right.is_reshape:  # last: the catch-all name for a kernel left in its source order
        add("reshape only", "kernel reshaped straight into the target shape, without transpose or flip",
            Mapping.identity(source.kernel_shape).reshape(*target.kernel_shape))
    return _unique(out)


def _unique(found: list[Mutant]) -> list[Mutant]:
    """Drop a rejectable mutant whose normal form equals an earlier one's (keeps the first name)."""
    kept: list[Mutant] = []
    seen: set[tuple] = set()
    for m in found:
        key = m.mapping.simplify().ops
        if m.ambiguous or key not in seen:
            kept.append(m)
            if not m.ambiguous:
                seen.add(key)
    return kept


def diagnose(source: LayerSpec, target: LayerSpec, mapping: Mapping, kernel: np.ndarray,
             new_kernel: np.ndarray) -> dict[str, str] | None:
    """The mutant whose kernel a converter returned, exactly: the mistake it makes, on any data.

    ``new_kernel`` is compared with each mutant applied to ``kernel`` (in ``new_kernel``'s
    dtype). ``None`` when none matches, or mutants breaking different conventions all do.
    """
    found = [m for m in mutants(source, target, mapping)
             if not m.ambiguous and np.array_equal(m.mapping.apply(kernel).astype(new_kernel.dtype), new_kernel)]
    if len({m.convention for m in found}) != 1:
        return None
    m = found[0]
    return {"mutant": m.name, "convention": m.convention, "description": m.description,
            "code": m.mapping.simplify().code("numpy")}
