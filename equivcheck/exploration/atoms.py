"""From observed weight positions to a :class:`~equivcheck.mapping.Mapping`.

Probing tells, for points of a layer's *canonical* kernel (``(out, in, *k)``, see
:func:`equivcheck.planning.canonical`), which stored weight acts there: its flat index ``t`` in
the stored kernel. Every reshape/transpose/flip mapping makes ``t`` a sum of one term per
canonical axis, and each term a mixed-radix number of *atoms* (size, signed stride):

    t(o, i, h, w) = t0 + line_O(o) + line_I(i) + line_H(h) + line_W(w)

So the lines through the origin determine the whole mapping. :func:`mapping_from_lines`
splits each line into atoms, checks that the atoms tile ``0..N-1`` exactly once (a
permutation), and writes the mapping as reshape → transpose → flip → reshape.
:func:`stored_index` runs the other way: where a mapping puts given canonical points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from equivcheck.errors import NotAPermutation
from equivcheck.mapping import Flip, Mapping, Reshape, Transpose

__all__ = ["Atom", "NotAPermutation", "line_atoms", "line_points", "mapping_from_lines", "signature", "stored_index"]


@dataclass(frozen=True)
class Atom:
    """``size`` consecutive values of one canonical axis, ``stride`` apart in the stored kernel.

    A negative stride is an atom read in reverse (a flip).
    """

    axis: int
    size: int
    stride: int


def _digits(coords: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Mixed-radix digits of ``coords`` for ``sizes`` (outer first)."""
    out = []
    rest = coords
    for size in reversed(sizes):
        out.append(rest % size)
        rest = rest // size
    return out[::-1]


def line_atoms(line: np.ndarray, axis: int) -> list[Atom]:
    """Atoms of one canonical axis, outer first, from ``line[c] = t(c) - t(0)``."""
    line = np.asarray(line, dtype=np.int64)
    n = len(line)
    if n and line[0] != 0:
        raise NotAPermutation(f"axis {axis}: the line does not pass through the origin")
    atoms: list[Atom] = []
    step = 1
    while step < n:
        stride = int(line[step])
        if stride == 0:
            raise NotAPermutation(f"axis {axis}: positions 0 and {step} read the same weight")
        quot = n // step
        j = np.arange(quot, dtype=np.int64)
        run = np.flatnonzero(line[j * step] != j * stride)
        size = int(run[0]) if run.size else quot
        while quot % size:
            size -= 1
        if size < 2:
            raise NotAPermutation(f"axis {axis}: position {step} does not continue a regular stride")
        atoms.append(Atom(axis, size, stride))
        step *= size
    atoms.reverse()
    rebuilt = sum(
        (a.stride * d for a, d in zip(atoms, _digits(np.arange(n, dtype=np.int64), [a.size for a in atoms]))),
        np.zeros(n, dtype=np.int64),
    )
    if not np.array_equal(rebuilt, line):
        bad = int(np.flatnonzero(rebuilt != line)[0])
        raise NotAPermutation(f"axis {axis}: position {bad} is not a reshape/transpose/flip of its neighbours")
    return atoms


def atom_offset(atoms: Sequence[Atom]) -> int:
    """Stored index of the canonical origin implied by the reversed atoms."""
    return sum(-a.stride * (a.size - 1) for a in atoms if a.stride < 0)


def check_tiling(atoms: Sequence[Atom], size: int) -> list[Atom]:
    """The atoms sorted by |stride|; raise unless they tile ``0..size-1`` exactly once."""
    ordered = sorted(atoms, key=lambda a: abs(a.stride))
    expected = 1
    for a in ordered:
        if abs(a.stride) != expected:
            raise NotAPermutation(
                f"axis {a.axis} steps {abs(a.stride)} weights where {expected} was expected: "
                "the positions overlap or leave gaps (a scaled, shared or partly fixed kernel?)"
            )
        expected *= a.size
    if expected != size:
        raise NotAPermutation(f"the probed positions cover {expected} weights of {size}")
    return ordered


def mapping_from_lines(
    lines: Sequence[np.ndarray], origin: int, stored_shape: tuple[int, ...], canonical_shape: tuple[int, ...]
) -> Mapping:
    """The stored → canonical mapping whose lines through the origin are ``lines``.

    ``lines[a][c]`` is the stored flat index at canonical coordinate ``c`` on axis ``a``
    (others 0); ``origin`` is the one at the origin.
    """
    n = math.prod(stored_shape)
    atoms = [a for axis, line in enumerate(lines) for a in line_atoms(np.asarray(line) - origin, axis)]
    by_stride = check_tiling(atoms, n)
    if origin != atom_offset(atoms):
        raise NotAPermutation(f"the origin reads weight {origin}, the strides imply {atom_offset(atoms)}")
    stored_order = by_stride[::-1]  # C order: largest stride first
    canonical_order = atoms  # grouped by canonical axis, outer first
    ops: list = [
        Reshape(tuple(a.size for a in stored_order)),
        Transpose(tuple(stored_order.index(a) for a in canonical_order)),
        Flip(tuple(i for i, a in enumerate(canonical_order) if a.stride < 0)),
        Reshape(canonical_shape),
    ]
    return Mapping(stored_shape, tuple(ops)).simplify()


def stored_index(mapping: Mapping, coords: np.ndarray) -> np.ndarray:
    """Flat index in ``mapping.in_shape`` of the element that lands at each row of ``coords``."""
    coords = np.asarray(coords, dtype=np.int64)
    shapes = [mapping.in_shape]
    for op in mapping.ops:
        shapes.append(op.out_shape(shapes[-1]))
    idx = np.ravel_multi_index(tuple(coords.T), mapping.out_shape) if coords.size else np.zeros(0, np.int64)
    for op, before, after in reversed(list(zip(mapping.ops, shapes[:-1], shapes[1:]))):
        if isinstance(op, Reshape):
            continue
        c = list(np.unravel_index(idx, after))
        if isinstance(op, Transpose):
            src: list = [None] * len(c)
            for i, p in enumerate(op.perm):
                src[p] = c[i]
            c = src
        else:
            for a in op.axes:
                c[a] = after[a] - 1 - c[a]
        idx = np.ravel_multi_index(tuple(c), before)
    return np.asarray(idx, dtype=np.int64)


def line_points(shape: tuple[int, ...]) -> np.ndarray:
    """The origin and every point on the axis lines through it, as rows of coordinates."""
    rows = [np.zeros((1, len(shape)), dtype=np.int64)]
    for axis, n in enumerate(shape):
        pts = np.zeros((n - 1, len(shape)), dtype=np.int64)
        pts[:, axis] = np.arange(1, n)
        rows.append(pts)
    return np.concatenate(rows)


def signature(mapping: Mapping) -> bytes:
    """A fingerprint that two separable mappings share exactly when they are equivalent."""
    return stored_index(mapping, line_points(mapping.out_shape)).tobytes()
