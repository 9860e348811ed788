"""Weight mappings: reshape, transpose and flip as a small algebra.

A :class:`Mapping` is an input shape plus a short immutable sequence of index operations.
It composes (:meth:`Mapping.then`), inverts (:meth:`Mapping.inverse`), simplifies to a
normal form (:meth:`Mapping.simplify`), applies natively to numpy, torch, tensorflow and
jax arrays (:meth:`Mapping.apply`) and prints itself as code (:meth:`Mapping.code`).

The normal form rests on one observation: every reshape that only splits or merges
axes, every transpose and every flip acts on a set of *atomic* axes. Tracking those atoms
reduces any such chain to at most ``reshape → transpose → flip → reshape``; a flip of a
merged axis is a flip of each atom in it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from equivcheck import _arrays
from equivcheck.errors import MappingError

__all__ = ["Flip", "Mapping", "Op", "Reshape", "Transpose"]


def _ints(values: Any, what: str) -> tuple[int, ...]:
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
        object.__setattr__(self, "shape", _ints(self.shape, "Reshape.shape"))
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
        perm = _ints(self.perm, "Transpose.perm")
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
        axes = _ints(self.axes, "Flip.axes")
        if len(set(axes)) != len(axes) or any(a < 0 for a in axes):
            raise MappingError(f"Flip.axes={axes} must be distinct non-negative axes")
        object.__setattr__(self, "axes", tuple(sorted(axes)))

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axes and self.axes[-1] >= len(shape):
            raise MappingError(f"Flip.axes={self.axes} does not fit shape={shape}")
        return shape


Op = Reshape | Transpose | Flip


@dataclass(frozen=True)
class _NormalForm:
    """``in_groups``/``out_groups``: the atoms each input/output axis is made of (C order)."""

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


def _normal_form(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> _NormalForm | None:
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
    return _NormalForm(
        sizes=dict(sizes),
        in_groups=tuple(tuple(g) for g in in_groups),
        out_groups=tuple(tuple(g) for g in groups),
        flipped=frozenset(flipped),
    )


def _shape_after(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[int, ...]:
    shape = in_shape
    for op in ops:
        shape = op.out_shape(shape)
    return shape


def _local_simplify(in_shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[Op, ...]:
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


def _ops_from_normal_form(nf: _NormalForm, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[Op, ...]:
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
        cur = _shape_after(in_shape, tuple(ops))
        atom_out = tuple(sizes[a] for a in out_atoms)
        if cur != atom_out:
            ops.append(Reshape(atom_out))
        ops.append(Flip(tuple(i for i, a in enumerate(out_atoms) if a in nf.flipped)))
        out_flip = ()
    if _shape_after(in_shape, tuple(ops)) != out_shape:
        ops.append(Reshape(out_shape))
    if out_flip:
        ops.append(Flip(out_flip))
    return _local_simplify(in_shape, tuple(ops))


@dataclass(frozen=True)
class Mapping:
    """An index mapping from arrays of ``in_shape``: a chain of reshape, transpose and flip.

    Build one fluently — ``Mapping.identity((25088, 4096)).transpose(1, 0).reshape(4096, 512,
    7, 7).flip(2, 3)`` — or get one from :func:`equivcheck.plan`.
    """

    in_shape: tuple[int, ...]
    ops: tuple[Op, ...] = ()
    # Optional axis names (e.g. ("i", "o") and ("o", "i", "h", "w")), used only to render einops code.
    in_names: tuple[str, ...] | None = field(default=None, compare=False, repr=False)
    out_names: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_shape", _ints(self.in_shape, "in_shape"))
        object.__setattr__(self, "ops", tuple(self.ops))
        for op in self.ops:
            if not isinstance(op, (Reshape, Transpose, Flip)):
                raise MappingError(f"op={op!r} is not a Reshape, Transpose or Flip")
        _shape_after(self.in_shape, self.ops)  # validates the chain

    # -- construction -------------------------------------------------------------------
    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> Mapping:
        return cls(tuple(shape))

    def _with(self, op: Op) -> Mapping:
        return Mapping(self.in_shape, (*self.ops, op), in_names=self.in_names)

    def named(self, in_names: str | tuple[str, ...] | None, out_names: str | tuple[str, ...] | None) -> Mapping:
        """The same mapping with axis names for its input and output (e.g. ``"io"``, ``"oihw"``) for einops code."""
        for which, names, shape in (("in_names", in_names, self.in_shape), ("out_names", out_names, self.out_shape)):
            if names is not None and len(names) != len(shape):
                raise MappingError(f"{which}={names!r} has {len(names)} names for shape={shape}")
        return dataclasses.replace(self, in_names=None if in_names is None else tuple(in_names),
                                   out_names=None if out_names is None else tuple(out_names))

    def reshape(self, *shape: int) -> Mapping:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self._with(Reshape(shape))

    def transpose(self, *perm: int) -> Mapping:
        if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
            perm = tuple(perm[0])
        return self._with(Transpose(perm))

    def flip(self, *axes: int) -> Mapping:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return self._with(Flip(axes))

    # -- algebra ----------------------------------------------------------------------------
    @cached_property
    def out_shape(self) -> tuple[int, ...]:
        return _shape_after(self.in_shape, self.ops)

    def then(self, other: Mapping) -> Mapping:
        """``self`` followed by ``other``."""
        if self.out_shape != other.in_shape:
            raise MappingError(
                f"cannot compose: first mapping gives shape={self.out_shape}, "
                f"second expects in_shape={other.in_shape}"
            )
        return Mapping(self.in_shape, self.ops + other.ops, in_names=self.in_names, out_names=other.out_names)

    def inverse(self) -> Mapping:
        """The mapping that undoes this one."""
        shapes = [self.in_shape]
        for op in self.ops:
            shapes.append(op.out_shape(shapes[-1]))
        inv: list[Op] = []
        for op, before in zip(reversed(self.ops), reversed(shapes[:-1])):
            if isinstance(op, Reshape):
                inv.append(Reshape(before))
            elif isinstance(op, Transpose):
                inv.append(Transpose(tuple(np.argsort(op.perm).tolist())))
            else:
                inv.append(op)
        return Mapping(self.out_shape, tuple(inv), in_names=self.out_names, out_names=self.in_names)

    @cached_property
    def _normal(self) -> _NormalForm | None:
        return _normal_form(self.in_shape, self.ops)

    @cached_property
    def _simple_ops(self) -> tuple[Op, ...]:
        nf = self._normal
        if nf is None:
            return _local_simplify(self.in_shape, self.ops)
        return _ops_from_normal_form(nf, self.in_shape, self.out_shape)

    def simplify(self) -> Mapping:
        """An equivalent mapping in normal form: at most reshape, transpose, flip, reshape."""
        return Mapping(self.in_shape, self._simple_ops, in_names=self.in_names, out_names=self.out_names)

    @property
    def regular(self) -> bool:
        """Whether every reshape only splits or merges axes (always so for planner mappings)."""
        return self._normal is not None

    @property
    def is_identity(self) -> bool:
        return not self._simple_ops

    @property
    def is_reshape(self) -> bool:
        """Whether the mapping only reshapes: every element keeps its place in memory order."""
        return all(isinstance(op, Reshape) for op in self._simple_ops)

    @property
    def flipped_axes(self) -> int:
        """How many atomic axes the mapping reverses."""
        nf = self._normal
        return len(nf.flipped) if nf else sum(len(op.axes) for op in self.ops if isinstance(op, Flip))

    def equivalent(self, other: Mapping) -> bool:
        """Whether both mappings move every element to the same place."""
        if self.in_shape != other.in_shape or self.out_shape != other.out_shape:
            return False
        if self._simple_ops == other._simple_ops:
            return True
        probe = np.arange(math.prod(self.in_shape)).reshape(self.in_shape)
        return bool(np.array_equal(self.apply(probe), other.apply(probe)))

    # -- application ------------------------------------------------------------------------
    def apply(self, array: Any, *, out: np.ndarray | None = None) -> Any:
        """Apply to a numpy, torch, tensorflow or jax array; returns the same kind, contiguous.

        The values must be real numbers (float, bfloat16, integer, bool): complex, object, void
        and structured arrays are refused. The result is a new array, never a view of ``array``,
        unless ``out`` is given: for a numpy array, a C-contiguous array of ``out_shape`` and the
        same dtype to write into (e.g. an ``np.memmap``) instead of a new one; it is returned.
        """
        ops = _arrays.ops_for(array)
        ops.check(array)
        shape = tuple(int(s) for s in array.shape)
        if shape != self.in_shape:
            raise MappingError(f"mapping expects an array of shape={self.in_shape}, got shape={shape}")
        if out is not None:
            self._check_out(array, out)
        if isinstance(ops, _arrays.NumpyOps):
            return ops.apply(array, self._simple_ops, self._normal, out)
        return ops.apply(array, self._simple_ops)

    def _check_out(self, array: Any, out: Any) -> None:
        if not isinstance(array, np.ndarray) or not isinstance(out, np.ndarray):
            raise MappingError(f"out= takes a numpy array for a numpy input, got {type(out).__name__} "
                               f"for {type(array).__name__}: leave out=None")
        if tuple(out.shape) != self.out_shape or out.dtype != array.dtype:
            raise MappingError(f"out has shape={tuple(out.shape)} dtype={out.dtype}: expected shape={self.out_shape} "
                               f"dtype={array.dtype}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise MappingError("out is not a writeable C-contiguous array: pass np.empty(mapping.out_shape, dtype)")
        if np.shares_memory(array, out):
            raise MappingError("out overlaps the input array: a mapping cannot rearrange in place")

    __call__ = apply

    # -- rendering --------------------------------------------------------------------------
    def code(self, lang: str = "numpy", var: str = "w") -> str:
        """The mapping as code on variable ``var``: ``"numpy"``, ``"torch"`` or ``"einops"``."""
        from equivcheck import _codegen

        return _codegen.render(self, lang, var)

    def __str__(self) -> str:
        return self.code("numpy")

    def to_dict(self) -> dict[str, Any]:
        ops = []
        for op in self.ops:
            if isinstance(op, Reshape):
                ops.append({"op": "reshape", "shape": list(op.shape)})
            elif isinstance(op, Transpose):
                ops.append({"op": "transpose", "perm": list(op.perm)})
            else:
                ops.append({"op": "flip", "axes": list(op.axes)})
        return {"in_shape": list(self.in_shape), "out_shape": list(self.out_shape), "ops": ops}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mapping:
        try:
            ops: list[Op] = []
            for d in data["ops"]:
                kind = d["op"]
                if kind == "reshape":
                    ops.append(Reshape(tuple(d["shape"])))
                elif kind == "transpose":
                    ops.append(Transpose(tuple(d["perm"])))
                elif kind == "flip":
                    ops.append(Flip(tuple(d["axes"])))
                else:
                    raise MappingError(f"op={kind!r} is not one of 'reshape', 'transpose', 'flip'")
            return cls(tuple(data["in_shape"]), tuple(ops))
        except (KeyError, TypeError) as exc:
            raise MappingError(f"mapping dict is missing or mistypes a field: {exc}") from None
