"""Weight mappings: reshape, transpose and flip as a small algebra.

A :class:`Mapping` is an input shape plus a short immutable sequence of the index operations
of :mod:`equivcheck.ops`. It composes (:meth:`Mapping.then`), inverts (:meth:`Mapping.inverse`),
simplifies to the normal form of :mod:`equivcheck.ops` (:meth:`Mapping.simplify`), applies
natively to numpy, torch, tensorflow and jax arrays through :mod:`equivcheck._arrays`
(:meth:`Mapping.apply`) and prints itself as code through :mod:`equivcheck._codegen`
(:meth:`Mapping.code`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from equivcheck import _arrays, _codegen
from equivcheck import ops as _ops
from equivcheck.errors import MappingError
from equivcheck.ops import Flip, NormalForm, Op, Reshape, Transpose, int_tuple, shape_after

__all__ = ["Flip", "Mapping", "Op", "Reshape", "Transpose"]


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
        object.__setattr__(self, "in_shape", int_tuple(self.in_shape, "in_shape"))
        object.__setattr__(self, "ops", tuple(self.ops))
        for op in self.ops:
            if not isinstance(op, (Reshape, Transpose, Flip)):
                raise MappingError(f"op={op!r} is not a Reshape, Transpose or Flip")
        shape_after(self.in_shape, self.ops)  # validates the chain

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
        return shape_after(self.in_shape, self.ops)

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
        return Mapping(self.out_shape, _ops.inverse(self.in_shape, self.ops), in_names=self.out_names,
                       out_names=self.in_names)

    @cached_property
    def normal_form(self) -> NormalForm | None:
        """The atoms of this mapping (see :class:`equivcheck.ops.NormalForm`); None where a reshape
        regroups irregularly."""
        return _ops.normal_form(self.in_shape, self.ops)

    @cached_property
    def _simple_ops(self) -> tuple[Op, ...]:
        return _ops.simplify(self.in_shape, self.ops)

    def simplify(self) -> Mapping:
        """An equivalent mapping in normal form: at most reshape, transpose, flip, reshape."""
        return Mapping(self.in_shape, self._simple_ops, in_names=self.in_names, out_names=self.out_names)

    @property
    def regular(self) -> bool:
        """Whether every reshape only splits or merges axes (always so for planner mappings)."""
        return self.normal_form is not None

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
        nf = self.normal_form
        return len(nf.flipped) if nf else sum(len(op.axes) for op in self.ops if isinstance(op, Flip))

    def equivalent(self, other: Mapping) -> bool:
        """Whether both mappings move every element to the same place."""
        if self.in_shape != other.in_shape or self.out_shape != other.out_shape:
            return False
        if self._simple_ops == other._simple_ops:
            return True
        nf = self.then(other.inverse()).normal_form
        if nf is not None:  # regular: the same atoms in the same places, none reversed, is the identity
            return nf.in_groups == nf.out_groups and not nf.flipped
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
        kind = _arrays.ops_for(array)
        kind.check(array)
        shape = tuple(int(s) for s in array.shape)
        if shape != self.in_shape:
            raise MappingError(f"mapping expects an array of shape={self.in_shape}, got shape={shape}")
        if out is not None:
            kind.check_out(array, out, self.out_shape)
        return kind.apply(array, self._simple_ops, self.normal_form, out)

    __call__ = apply

    def source_indices(self, coords: tuple[Any, ...]) -> np.ndarray:
        """Flat (row-major) input indices of the output elements at ``coords`` (one index array per output axis).

        ``self.apply(a)[coords] == a.reshape(-1)[self.source_indices(coords)]``, computed on the
        indices alone: no array of ``in_shape`` is made, so a few elements of a large kernel are cheap.
        """
        if len(coords) != len(self.out_shape):
            raise MappingError(f"coords has {len(coords)} index arrays for out_shape={self.out_shape}")
        shapes = [self.in_shape]
        for op in self.ops:
            shapes.append(op.out_shape(shapes[-1]))
        try:
            c = list(np.broadcast_arrays(*(np.asarray(a, dtype=np.int64) for a in coords)))
        except ValueError as exc:
            raise MappingError(f"coords do not broadcast to one shape: {exc}") from None
        shape = c[0].shape if c else ()
        for axis, (a, n) in enumerate(zip(c, self.out_shape)):
            if a.size and (a.min() < 0 or a.max() >= n):
                raise MappingError(f"coords on axis {axis} run outside 0..{n - 1}")
        for op, before, after in zip(reversed(self.ops), reversed(shapes[:-1]), reversed(shapes[1:])):
            if isinstance(op, Reshape):
                c = list(np.unravel_index(np.ravel_multi_index(tuple(c), after), before))
            elif isinstance(op, Transpose):
                back = list(c)
                for j, p in enumerate(op.perm):
                    back[p] = c[j]
                c = back
            else:
                c = [before[a] - 1 - v if a in op.axes else v for a, v in enumerate(c)]
        return np.broadcast_to(np.ravel_multi_index(tuple(c), self.in_shape), shape).astype(np.int64)

    # -- rendering --------------------------------------------------------------------------
    def code(self, lang: str = "numpy", var: str = "w") -> str:
        """The mapping as code on variable ``var``: ``"numpy"``, ``"torch"`` or ``"einops"``."""
        return _codegen.render(self._simple_ops, self.normal_form, lang, var, self.in_names, self.out_names)

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
