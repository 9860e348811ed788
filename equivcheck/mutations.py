"""Plausible wrong conversions, used to show a check can tell right from wrong.

Each :class:`Mutant` is a wrong source→target kernel mapping of the kind people write by
hand: a flip forgotten or added, a flip on one axis only, the wrong flatten order, a dense
kernel reshaped instead of transposed, kernel axes or channels in the wrong order. A
verification runs every mutant on the same data and expects each to fail; a mutant that
moves no element (a flip of a 1-wide axis) cannot be told apart on this shape and is
marked ambiguous instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from equivcheck.errors import EquivcheckError
from equivcheck.mapping import Mapping
from equivcheck.plan import plan
from equivcheck.specs import ConvSpec, DenseSpec, LayerSpec

__all__ = ["Mutant", "mutants"]


@dataclass(frozen=True)
class Mutant:
    name: str
    description: str
    mapping: Mapping
    ambiguous: bool = False  # moves no element: cannot be rejected on this shape


def _reread(m: Mapping, perm: tuple[int, ...]) -> Mapping:
    """Permute the target kernel's axes and read the result back at the target shape."""
    return m.transpose(*perm).reshape(*m.out_shape)


def _spatial_positions(spec: ConvSpec) -> list[int]:
    return [spec.kernel_layout.index(a) for a in spec.letters]


def mutants(source: LayerSpec, target: LayerSpec, mapping: Mapping | None = None) -> list[Mutant]:
    """The catalogue of wrong conversions from ``source`` to ``target``."""
    right = mapping if mapping is not None else plan(source, target)
    out: list[Mutant] = []

    def add(name: str, description: str, m: Mapping) -> None:
        out.append(Mutant(name, description, m, ambiguous=m.equivalent(right)))

    if isinstance(target, ConvSpec):
        spatial = _spatial_positions(target)
        needs_flip = isinstance(source, (DenseSpec, ConvSpec)) and source.kind == "conv" and source.op != target.op
        needs_flip = needs_flip or (isinstance(source, DenseSpec) and target.op == "convolve")
        name = "missing flip" if needs_flip else "spurious flip"
        add(name, "kernel flipped 180° in space relative to the right conversion", right.flip(*spatial))
        if len(spatial) > 1:
            for pos, letter in zip(spatial, target.letters):
                add(f"flip {letter} only", f"kernel reversed along {letter} alone", right.flip(pos))
            perm = list(range(len(target.kernel_layout)))
            perm[spatial[-2]], perm[spatial[-1]] = perm[spatial[-1]], perm[spatial[-2]]
            a, b = target.letters[-2:]
            add("kernel axes permuted", f"{a} and {b} of the kernel exchanged", _reread(right, tuple(perm)))
        o, i = target.kernel_layout.index("O") if "O" in target.kernel_layout else None, target.kernel_layout.index("I")
        if o is not None:
            perm = list(range(len(target.kernel_layout)))
            perm[o], perm[i] = perm[i], perm[o]
            add("channels permuted", "in and out channels of the kernel exchanged", _reread(right, tuple(perm)))
    if isinstance(target, DenseSpec):
        perm = (1, 0)
        add("channels permuted", "dense kernel's in and out read in the wrong order", _reread(right, perm))

    for dense, is_source in ((source, True), (target, False)):
        if not isinstance(dense, DenseSpec) or dense.rank == 0:
            continue
        letters = dense.map_letters
        other = letters if dense.flatten != letters else letters[1:] + "C"
        try:
            wrong = dense.replace(flatten=other)
            m = plan(wrong, target) if is_source else plan(source, wrong)
        except EquivcheckError:
            continue
        add("wrong flatten order", f"map flattened as {other} instead of {dense.flatten}", m)
        swapped = "OI" if dense.kernel_layout == "IO" else "IO"
        wrong = dense.replace(kernel_layout=swapped)
        if is_source:
            m = Mapping.identity(dense.kernel_shape).reshape(*wrong.kernel_shape).then(plan(wrong, target))
        else:
            m = plan(source, wrong).reshape(*dense.kernel_shape)
        add("dense kernel not transposed", "dense kernel reshaped where it needed a transpose", m)
    return out
