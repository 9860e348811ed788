"""Index operations — reshape, transpose, flip — and their normal form.

A leaf: it imports nothing from equivcheck but its errors, and no array library. The ops are
immutable values; :class:`~equivcheck.mapping.Mapping` composes them and applies them to arrays.

The normal form rests on one observation: every reshape that only splits or merges axes, every
transpose and every flip acts on a set of *atomic* axes. Tracking those atoms
(:func:`normal_form`) reduces any such chain to at most ``reshape → transpose → flip → reshape``
(:func:`simplify`); a flip of a merged axis is a flip of each atom in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from equivcheck.errors import MappingError

__all__ = [
    "Flip", "NormalForm", "Op", "Reshape", "Transpose", "int_tuple", "inverse", "local_simplify", "normal_form",
    "ops_from_normal_form", "shape_after", "simplify",
]


def int_tuple(values: Any, what: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints; a :class:`MappingError` naming ``what`` where one is not an integer."""
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise MappingError(f"{what}={values!r} is not a sequence of integers") from None
    if any(v != w for v, w in zip(out, values)):
        raise MappingError(f"{what}={values!r} is not a sequence of integers")
    return out


@dataclass(frozen=True)
class Reshape:
    """Reshape to ``shape`` in C (row-major) order."""

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", int_tuple(self.shape, "Reshape.shape"))
        if any(s < 0 for s in self.shape):
            raise MappingError(f"Reshape.shape={self.shape} has a negative size")

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if math.prod(shape) != math.prod(self.shape):
            raise MappingError(
                f"cannot reshape shape={shape} ({math.prod(shape)} elements) to "
                f"{self.shape} ({math.prod(self.shape)} elements)"
            )
        return self.shape


@dataclass(frozen=True)
class Transpose:
    """Permute axes: output axis ``i`` is input axis ``perm[i]``."""

    perm: tuple[int, ...]

    def __post_init__(self) -> None:
        perm = int_tuple(self.perm, "Transpose.perm")
        if sorted(perm) != list(range(len(perm))):
            raise MappingError(f"Transpose.perm={perm} is not a permutation of 0..{len(perm) - 1}")
        object.__setattr__(self, "perm", perm)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != len(self.perm):
            raise MappingError(f"Transpose.perm={self.perm} does not fit shape={shape}: expected {len(shape)} axes")
        return tuple(shape[p] for p in self.perm)


@dataclass(frozen=True)
class Flip:
    """Reverse the order of elements along ``axes``."""

    axes: tuple[int, ...]

    def __post_init__(self) -> None:
        axes = int_tuple(self.axes, "Flip.axes")
        if len(set(axes)) != len(axes) or any(a < 0 for a in axes):
            raise MappingError(f"Flip.axes={axes} must be distinct non-negative axes")
        object.__setattr__(self, "axes", tuple(sorted(axes)))

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axes and self.axes[-1] >= len(shape):
            raise MappingError(f"Flip.axes={self.axes} does not fit shape={shape}")
        return shape


Op = Reshape | Transpose | Flip


@dataclass(frozen=True)
class NormalForm:
    """The atoms of a chain of ops: ``sizes`` of each atom; ``in_groups``/``out_groups``: the atoms
    each input/output axis is made of (C order), an empty group for a size-1 axis; ``flipped``:
    the atoms the chain reverses."""

    sizes: dict[int, int]
    in_groups: tuple[tuple[int, ...], ...]
    out_groups: tuple[tuple[int, ...], ...]
    flipped: frozenset[int]

    @property
    def in_atoms(self) -> tuple[int, ...]:
        return tuple(a for g in self.in_groups for a in g)

    @property
    def out_atoms(self) -> tuple[int, ...]:
        return tuple(a for g in self.out_groups for a in g)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(self.sizes[a] for a in g) for g in self.out_groups)

    def whole_axes_flipped(self, groups: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
        """Axes of ``groups`` to flip so that exactly the flipped atoms are reversed, or None."""
        axes = []
        for i, g in enumerate(groups):
            hit = [a in self.flipped for a in g]
            if all(hit) and g:
                axes.append(i)
            elif any(hit):
                return None
        return tuple(axes)


def normal_form(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> NormalForm | None:
    """Track atomic axes through ``ops``; None when a reshape regroups irregularly."""
    if 0 in in_shape:
        return None
    sizes: dict[int, int] = {}

    def new(size: int) -> int:
        sizes[len(sizes)] = size
        return len(sizes) - 1

    # Size-1 axes carry no information: they become empty groups.
    in_groups = [[new(s)] if s != 1 else [] for s in in_shape]
    groups = [list(g) for g in in_groups]
    flipped: set[int] = set()

    def split(atom: int, first: int) -> None:
        a, b = new(first), new(sizes[atom] // first)
        for g in (*in_groups, *groups):
            if atom in g:
                i = g.index(atom)
                g[i : i + 1] = [a, b]
        if atom in flipped:
            flipped.difference_update({atom})
            flipped.update({a, b})

    for op in ops:
        if isinstance(op, Transpose):
            groups = [groups[p] for p in op.perm]
        elif isinstance(op, Flip):
            for axis in op.axes:
                flipped.symmetric_difference_update(groups[axis])
        else:
            seq = [a for g in groups for a in g]
            new_groups: list[list[int]] = []
            pos = 0
            for target in op.shape:
                group: list[int] = []
                have = 1
                while have < target:
                    atom = seq[pos]
                    need = target // have
                    if target % have:
                        return None
                    if sizes[atom] > need:
                        if sizes[atom] % need:
                            return None
                        split(atom, need)
                        seq[pos : pos + 1] = [len(sizes) - 2, len(sizes) - 1]
                        atom = seq[pos]
                    group.append(atom)
                    have *= sizes[atom]
                    pos += 1
                if have != target:
                    return None
                new_groups.append(group)
            groups = new_groups
    return NormalForm(
        sizes=dict(sizes),
        in_groups=tuple(tuple(g) for g in in_groups),
        out_groups=tuple(tuple(g) for g in groups),
        flipped=frozenset(flipped),
    )


def shape_after(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[int, ...]:
    """The shape ``ops`` make of ``in_shape``; a :class:`MappingError` where one does not fit."""
    shape = in_shape
    for op in ops:
        shape = op.out_shape(shape)
    return shape


def local_simplify(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[Op, ...]:
    """Merge adjacent ops of one kind and drop no-ops, until nothing changes.

    The fallback for irregular reshapes, and the last tidy-up of a normal form.
    """
    while True:
        out: list[Op] = []
        shape = in_shape
        for op in ops:
            new_shape = op.out_shape(shape)
            noop = (
                (isinstance(op, Reshape) and new_shape == shape)
                or (isinstance(op, Transpose) and op.perm == tuple(range(len(op.perm))))
                or (isinstance(op, Flip) and all(shape[a] == 1 for a in op.axes))
            )
            prev = out[-1] if out else None
            if noop:
                pass
            elif isinstance(op, Reshape) and isinstance(prev, Reshape):
                out[-1] = op
            elif isinstance(op, Transpose) and isinstance(prev, Transpose):
                out[-1] = Transpose(tuple(prev.perm[p] for p in op.perm))
            elif isinstance(op, Flip) and isinstance(prev, Flip):
                out[-1] = Flip(tuple(set(prev.axes) ^ set(op.axes)))
            else:
                out.append(op)
            shape = new_shape
        if tuple(out) == ops:
            return ops
        ops = tuple(out)


def ops_from_normal_form(nf: NormalForm, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[Op, ...]:
    """The shortest readable op sequence for a normal form.

    Prefer permuting whole input axes before reshaping (``w.T.reshape(...)``), then
    splitting first (``w.reshape(...).transpose(...)``); put a flip where it reverses whole
    axes: at the end, else at the start, else between the transpose and the final reshape.
    """
    sizes = nf.sizes
    in_atoms, out_atoms = nf.in_atoms, nf.out_atoms
    atom_shape = tuple(sizes[a] for a in in_atoms)
    perm = tuple(in_atoms.index(a) for a in out_atoms)
    identity_perm = perm == tuple(range(len(perm)))

    # Does the permutation move whole (non-empty) input axes?
    nonempty = [i for i, g in enumerate(nf.in_groups) if g]
    group_perm: list[int] | None = []
    k = 0
    while k < len(out_atoms):
        owner = next(i for i in nonempty if out_atoms[k] in nf.in_groups[i])
        g = nf.in_groups[owner]
        if out_atoms[k : k + len(g)] != g:
            group_perm = None
            break
        group_perm.append(owner)
        k += len(g)

    out_flip = nf.whole_axes_flipped(nf.out_groups)
    in_flip = nf.whole_axes_flipped(nf.in_groups)

    ops: list[Op] = []
    if not nf.flipped:
        out_flip = ()
    elif out_flip is None and in_flip is not None:
        ops.append(Flip(in_flip))
        out_flip = ()

    if not identity_perm and group_perm is not None and len(group_perm) == len(nonempty):
        # Permute whole input axes first; size-1 input axes are squeezed away by a reshape.
        if len(nonempty) != len(in_shape):
            ops.append(Reshape(tuple(in_shape[i] for i in nonempty)))
        ops.append(Transpose(tuple(nonempty.index(i) for i in group_perm)))
    elif not identity_perm:
        if atom_shape != in_shape:
            ops.append(Reshape(atom_shape))
        ops.append(Transpose(perm))

    if out_flip is None:
        # Flip atoms that neither side holds whole: do it at atom granularity.
        cur = shape_after(in_shape, tuple(ops))
        atom_out = tuple(sizes[a] for a in out_atoms)
        if cur != atom_out:
            ops.append(Reshape(atom_out))
        ops.append(Flip(tuple(i for i, a in enumerate(out_atoms) if a in nf.flipped)))
        out_flip = ()
    if shape_after(in_shape, tuple(ops)) != out_shape:
        ops.append(Reshape(out_shape))
    if out_flip:
        ops.append(Flip(out_flip))
    return local_simplify(in_shape, tuple(ops))


def simplify(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[Op, ...]:
    """An equivalent chain in normal form (at most reshape, transpose, flip, reshape), or merely
    tidied where a reshape regroups irregularly."""
    nf = normal_form(in_shape, ops)
    if nf is None:
        return local_simplify(in_shape, ops)
    return ops_from_normal_form(nf, in_shape, shape_after(in_shape, ops))


def inverse(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[Op, ...]:
    """The chain that undoes ``ops`` (applied to arrays of ``in_shape``), on their output shape."""
    shapes = [in_shape]
    for op in ops:
        shapes.append(op.out_shape(shapes[-1]))
    inv: list[Op] = []
    for op, before in zip(reversed(ops), reversed(shapes[:-1])):
        if isinstance(op, Reshape):
            inv.append(Reshape(before))
        elif isinstance(op, Transpose):
            inv.append(Transpose(tuple(sorted(range(len(op.perm)), key=op.perm.__getitem__))))
        else:
            inv.append(op)
    return tuple(inv)
