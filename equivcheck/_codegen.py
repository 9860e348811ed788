"""Render a chain of index ops (a :class:`~equivcheck.mapping.Mapping`) as numpy, torch or einops code.

Works on the ops and their normal form (:mod:`equivcheck.ops`) alone, so that ``Mapping.code``
calls it without this module knowing the Mapping class.
"""

from __future__ import annotations

import string

from equivcheck.errors import MappingError
from equivcheck.ops import Flip, NormalForm, Op, Reshape

Names = tuple[str, ...] | None

LANGS = ("numpy", "torch", "einops")


def _args(values: tuple[int, ...]) -> str:
    return ", ".join(str(v) for v in values)


def _numpy_flip(axes: tuple[int, ...]) -> str:
    parts = [":"] * (max(axes) + 1)
    for a in axes:
        parts[a] = "::-1"
    return "[" + ", ".join(parts) + "]"


def _chain(ops: tuple[Op, ...], var: str, lang: str) -> str:
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


def _einops(nf: NormalForm, var: str, in_names: Names, out_names: Names) -> str:
    """``rearrange(w, '(a b c) d -> d a b c', ...)`` plus numpy-style flips."""
    names = _atom_names(nf, in_names, out_names)

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


def _atom_names(nf: NormalForm, in_names: Names, out_names: Names) -> dict[int, str]:
    """An einops name per atom: the axis name where an atom is a whole named axis (output side
    first), else a free letter in output order, so the right-hand side reads a, b, c, ..."""
    names: dict[int, str] = {}
    for groups, axis_names in ((nf.out_groups, out_names), (nf.in_groups, in_names)):
        for group, name in zip(groups, axis_names or ()):
            name = name.lower()
            if len(group) == 1 and group[0] not in names and name.isidentifier() and name not in names.values():
                names[group[0]] = name
    free = (c for c in [*string.ascii_lowercase, *(f"x{i}" for i in range(len(nf.sizes)))] if c not in names.values())
    ordered = {a: names.get(a) or next(free) for a in nf.out_atoms}
    return ordered


def render(simple_ops: tuple[Op, ...], nf: NormalForm | None, lang: str, var: str,
           in_names: Names = None, out_names: Names = None) -> str:
    """Code applying a mapping to variable ``var`` in ``lang``.

    ``simple_ops``: the mapping's ops in normal form (``ops.simplify``); ``nf``: their
    ``ops.normal_form``, None where a reshape regroups irregularly (no einops then);
    ``in_names``/``out_names``: axis names the einops pattern uses where it can.
    """
    if lang not in LANGS:
        raise MappingError(f"lang={lang!r} is not one of {', '.join(LANGS)}")
    if lang == "einops":
        if not simple_ops:
            return var
        if nf is None:
            raise MappingError(f"mapping {_chain(simple_ops, 'w', 'numpy')} has an irregular reshape that einops cannot express")
        return _einops(nf, var, in_names, out_names)
    return _chain(simple_ops, var, lang)
