"""Render a :class:`~equivcheck.mapping.Mapping` as numpy, torch or einops code."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from equivcheck.errors import MappingError

if TYPE_CHECKING:
    from equivcheck.mapping import Mapping, Op

LANGS = ("numpy", "torch", "einops")


def _args(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values)


def _numpy_flip(axes: tuple[int, ...]) -> str:
    parts = [":"] * (max(axes) + 1)
    for a in axes:
        parts[a] = "::-1"
    return "[" + ", ".join(parts) + "]"


def _chain(ops: tuple[Op, ...], var: str, lang: str) -> str:
    from equivcheck.mapping import Flip, Reshape

    out = var
    for op in ops:
        if isinstance(op, Reshape):
            out += f".reshape({_args(op.shape)})"
        elif isinstance(op, Flip):
            out += _numpy_flip(op.axes) if lang == "numpy" else f".flip({op.axes!r})"
        elif len(op.perm) == 2:
            out += ".T"
        else:
            out += f".{'transpose' if lang == 'numpy' else 'permute'}({_args(op.perm)})"
    return out


def _einops(mapping: Mapping, var: str) -> str:
    """``rearrange(w, '(a b c) d -> d a b c', ...)`` plus numpy-style flips."""
    nf = mapping._normal
    if nf is None:
        raise MappingError(f"mapping {mapping.code('numpy')} has an irregular reshape that einops cannot express")
    names = _atom_names(mapping, nf)

    def side(groups: tuple[tuple[int, ...], ...]) -> str:
        parts = []
        for g in groups:
            if len(g) == 1:
                parts.append(names[g[0]])
            else:
                parts.append("(" + " ".join(names[a] for a in g) + ")")  # () is a size-1 axis
        return " ".join(parts)

    def call(src: str, lhs: tuple, rhs: tuple) -> str:
        sizes = sorted({a for g in lhs if len(g) > 1 for a in g}, key=list(names).index)
        kw = "".join(f", {names[a]}={nf.sizes[a]}" for a in sizes)
        return f"rearrange({src}, '{side(lhs)} -> {side(rhs)}'{kw})"

    atoms = tuple((a,) for a in nf.out_atoms)
    out_flip = nf.whole_axes_flipped(nf.out_groups)
    in_flip = nf.whole_axes_flipped(nf.in_groups)
    if not nf.flipped:
        return call(var, nf.in_groups, nf.out_groups)
    if out_flip is not None:
        return call(var, nf.in_groups, nf.out_groups) + _numpy_flip(out_flip)
    if in_flip is not None:
        return call(var + _numpy_flip(in_flip), nf.in_groups, nf.out_groups)
    flip = tuple(i for i, a in enumerate(nf.out_atoms) if a in nf.flipped)
    return call(call(var, nf.in_groups, atoms) + _numpy_flip(flip), atoms, nf.out_groups)


def _atom_names(mapping: Mapping, nf: Any) -> dict[int, str]:
    """An einops name per atom: the axis name where an atom is a whole named axis (output side
    first), else a free letter in output order, so the right-hand side reads a, b, c, ..."""
    names: dict[int, str] = {}
    for groups, axis_names in ((nf.out_groups, mapping.out_names), (nf.in_groups, mapping.in_names)):
        for group, name in zip(groups, axis_names or ()):
            name = name.lower()
            if len(group) == 1 and group[0] not in names and name.isidentifier() and name not in names.values():
                names[group[0]] = name
    free = (c for c in [*string.ascii_lowercase, *(f"x{i}" for i in range(len(nf.sizes)))] if c not in names.values())
    ordered = {a: names.get(a) or next(free) for a in nf.out_atoms}
    return ordered


def render(mapping: Mapping, lang: str, var: str) -> str:
    if lang not in LANGS:
        raise MappingError(f"lang={lang!r} is not one of {', '.join(LANGS)}")
    if lang == "einops":
        if mapping.is_identity:
            return var
        return _einops(mapping, var)
    return _chain(mapping.simplify().ops, var, lang)
