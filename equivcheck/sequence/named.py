"""Named tensors: a layer's weights as a dict keyed by its framework's own parameter names.

A :class:`NamedMapping` gives each target tensor as one :class:`TensorPlan`: its source
tensors (stacked along a new first axis when there are several) followed by a chain of steps.
A step is a :class:`~equivcheck.mapping.Mapping` (reshape, transpose, flip) or one of the few
ops the index algebra cannot express: :class:`Take` (gates reordered along one axis),
:class:`Select` (one slice of an axis), :class:`Sum` (the bias sum) and :class:`Spread` (a bias
split: the values in one slot of a new axis, zeros in the others).

Every spec has a *canonical* dict: per direction ``d``, ``W{d}`` (gates, units, in),
``R{d}`` (gates, units, units), ``b{d}`` (2, gates, units) = input and recurrent bias, gates
in canonical order; for attention ``Win`` (3, heads, head_dim, E) q;k;v, ``bin`` (3, heads,
head_dim), ``Wo`` (E, heads, head_dim), ``bo`` (E,); where key/value heads are shared
(``kv_heads`` < ``heads``) ``Wq`` (heads, head_dim, E) and ``Wkv`` (2, kv_heads, head_dim, E)
k;v in place of ``Win`` (and ``bq``, ``bkv`` of ``bin``). A plan is the source's way to canonical
followed by the inverse of the target's. A target tensor made of canonical tensors of different
sizes (a fused per-key-value-group ``wqkv``) is a :class:`ConcatPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from equivcheck.errors import MappingError, NoMapping, SpecError
from equivcheck.mapping import Mapping, Reshape, Transpose
from equivcheck.sequence.specs import GATES, AttentionSpec, RecurrentSpec, SequenceSpec

__all__ = ["ConcatPlan", "NamedMapping", "Select", "Spread", "Sum", "Take", "TensorPlan", "Zero", "canonical", "convert", "from_canonical", "plan",
           "tensor_shapes"]


# -- the ops the index algebra lacks ------------------------------------------------------------
@dataclass(frozen=True)
class Take:
    """Reorder (or pick) entries along ``axis``: output entry ``k`` is input entry ``indices[k]``."""

    axis: int
    indices: tuple[int, ...]

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis >= len(shape) or any(not 0 <= i < shape[self.axis] for i in self.indices):
            raise MappingError(f"Take(axis={self.axis}, indices={self.indices}) does not fit shape={shape}")
        return (*shape[: self.axis], len(self.indices), *shape[self.axis + 1 :])


@dataclass(frozen=True)
class Select:
    """Entry ``index`` of ``axis``, dropping the axis."""

    axis: int
    index: int

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis >= len(shape) or not 0 <= self.index < shape[self.axis]:
            raise MappingError(f"Select(axis={self.axis}, index={self.index}) does not fit shape={shape}")
        return (*shape[: self.axis], *shape[self.axis + 1 :])


@dataclass(frozen=True)
class Sum:
    """Sum over ``axis`` (two biases into one)."""

    axis: int

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis >= len(shape):
            raise MappingError(f"Sum(axis={self.axis}) does not fit shape={shape}")
        return (*shape[: self.axis], *shape[self.axis + 1 :])


@dataclass(frozen=True)
class Spread:
    """A new ``axis`` of ``size`` holding the input at ``at`` and zeros elsewhere (one bias into two)."""

    axis: int
    size: int
    at: int

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis > len(shape) or not 0 <= self.at < self.size:
            raise MappingError(f"Spread(axis={self.axis}, size={self.size}, at={self.at}) does not fit shape={shape}")
        return (*shape[: self.axis], self.size, *shape[self.axis :])


@dataclass(frozen=True)
class Zero:
    """Zeros of the input's shape (the empty half of a bias split)."""

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


Step = Mapping | Take | Select | Sum | Spread | Zero


def _xp(array: Any) -> Any:
    """numpy, or torch for a torch tensor (the array kinds the named ops run on natively)."""
    if type(array).__module__.startswith("torch"):
        import torch

        return torch
    return np


def _apply_step(step: Step, x: Any) -> Any:
    if isinstance(step, Mapping):
        return step.apply(x)
    index = (slice(None),) * getattr(step, "axis", 0)
    if isinstance(step, Take):
        return x[(*index, list(step.indices))]
    if isinstance(step, Select):
        return x[(*index, step.index)]
    if isinstance(step, Sum):
        return x.sum(step.axis)
    xp = _xp(x)
    if isinstance(step, Zero):
        return xp.zeros_like(x)
    parts = [x if k == step.at else xp.zeros_like(x) for k in range(step.size)]
    return xp.stack(parts, step.axis)


def _render_step(step: Step, expr: str, lang: str) -> str:
    """``expr`` followed by ``step`` as code; the ops Mapping lacks render as numpy/torch indexing."""
    if isinstance(step, Mapping):
        return step.code(lang, expr)
    index = ":, " * getattr(step, "axis", 0)
    if not expr.replace("_", "").replace(".", "").isalnum() and not expr.endswith((")", "]")):
        expr = f"({expr})"
    if isinstance(step, Take):
        return f"{expr}[{index}{list(step.indices)}]"
    if isinstance(step, Select):
        return f"{expr}[{index}{step.index}]"
    if isinstance(step, Sum):
        return f"{expr}.sum({step.axis})"
    xp = "torch" if lang == "torch" else "np"
    if isinstance(step, Zero):
        return f"{xp}.zeros_like({expr})"
    parts = ", ".join("x" if k == step.at else f"{xp}.zeros_like(x)" for k in range(step.size))
    return f"(lambda x: {xp}.stack([{parts}], {step.axis}))({expr})"


def _leading_reshape(step: Step) -> bool:
    """Whether ``step`` only reshapes the axes after the first."""
    return (isinstance(step, Mapping) and bool(step.ops) and all(isinstance(op, Reshape) for op in step.ops)
            and len(step.in_shape) > 0 and len(step.out_shape) > 0 and step.out_shape[0] == step.in_shape[0])


def _peephole(prev: Step | None, step: Step, shape: tuple[int, ...]) -> list[Step] | None:
    """``prev`` then ``step`` rewritten shorter or with the axis op first; None: leave them."""
    if (isinstance(step, Mapping) and step.is_identity) or (
            isinstance(step, Take) and step.indices == tuple(range(shape[step.axis]))):
        return [] if prev is None else [prev]
    if prev is None:
        return None
    if isinstance(step, Mapping) and isinstance(prev, Mapping):
        return [prev.then(step).simplify()]
    if isinstance(step, Take) and isinstance(prev, Take) and prev.axis == step.axis:
        return [Take(step.axis, tuple(prev.indices[k] for k in step.indices))]
    if isinstance(step, Select) and isinstance(prev, Take) and prev.axis == step.axis:
        return [Select(step.axis, prev.indices[step.index])]
    if isinstance(step, Sum) and isinstance(prev, Spread) and prev.axis == step.axis:
        return []
    if isinstance(step, Select) and isinstance(prev, Spread) and prev.axis == step.axis:
        return [] if step.index == prev.at else [Zero()]
    if isinstance(step, (Sum, Select)) and step.axis == 0 and _leading_reshape(prev):
        # a reshape of the trailing axes, then an op on the first: the op first, the reshape after
        return [step, Mapping.identity(prev.in_shape[1:]).reshape(*prev.out_shape[1:])]
    if isinstance(step, Select) and isinstance(prev, Mapping) and prev.ops and isinstance(prev.ops[-1], Transpose):
        perm = prev.ops[-1].perm
        axis = perm[step.axis]
        rest = [p - (p > axis) for p in perm if p != axis]
        head = Mapping(prev.in_shape, prev.ops[:-1])
        return [head, Select(axis, step.index), Mapping.identity(Select(axis, step.index).out_shape(head.out_shape)).transpose(*rest)]
    return None


def _simplify(in_shape: tuple[int, ...], steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """Merge neighbouring mappings and takes, drop identities, move selections and sums forward."""
    for _ in range(100):
        out: list[Step] = []
        shapes = [in_shape]
        changed = False
        for step in steps:
            prev = out[-1] if out else None
            shape = shapes[-1]
            new = _peephole(prev, step, shape)
            if new is None:
                out.append(step)
                shapes.append(_shape_after(step, shape))
            else:
                changed = True
                if prev is not None:
                    out.pop()
                    shapes.pop()
                for s in new:
                    out.append(s)
                    shapes.append(_shape_after(s, shapes[-1]))
        steps = tuple(s.simplify() if isinstance(s, Mapping) else s for s in out)
        if not changed:
            return steps
    return steps


def _shape_after(step: Step, shape: tuple[int, ...]) -> tuple[int, ...]:
    return step.out_shape if isinstance(step, Mapping) else step.out_shape(shape)


@dataclass(frozen=True)
class TensorPlan:
    """One target tensor: ``sources`` (stacked on a new first axis when several) through ``steps``."""

    sources: tuple[str, ...]
    source_shape: tuple[int, ...]
    steps: tuple[Step, ...] = ()

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.source_shape if len(self.sources) == 1 else (len(self.sources), *self.source_shape)

    @property
    def source_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict.fromkeys(self.sources, self.source_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        shape = self.in_shape
        for step in self.steps:
            shape = step.out_shape if isinstance(step, Mapping) else step.out_shape(shape)
        return shape

    def then(self, *steps: Step) -> TensorPlan:
        shape = self.out_shape
        chain: list[Step] = []
        for step in steps:
            if isinstance(step, Mapping) and step.in_shape != shape:
                raise MappingError(f"step expects shape={step.in_shape}, the plan gives {shape}")
            chain.append(step)
            shape = step.out_shape if isinstance(step, Mapping) else step.out_shape(shape)
        steps = _simplify(self.in_shape, (*self.steps, *chain))
        if len(self.sources) > 1 and steps and isinstance(steps[0], Select) and steps[0].axis == 0:
            # one of the stacked sources: that source alone
            return TensorPlan((self.sources[steps[0].index],), self.source_shape, steps[1:])
        return TensorPlan(self.sources, self.source_shape, steps)

    def apply(self, weights: dict[str, Any]) -> Any:
        arrays = [weights[s] for s in self.sources]
        x = arrays[0] if len(arrays) == 1 else _xp(arrays[0]).stack(arrays, 0)
        for step in self.steps:
            x = _apply_step(step, x)
            if isinstance(x, np.generic):  # numpy makes a scalar of a 0-d result
                x = np.asarray(x)
        return x

    def code(self, lang: str = "numpy") -> str:
        if lang not in ("numpy", "torch", "einops"):
            raise SpecError(f"lang={lang!r} is not supported: expected 'numpy', 'torch' or 'einops'")
        xp = "torch" if lang == "torch" else "np"
        names = [f"w[{s!r}]" for s in self.sources]
        expr = names[0] if len(names) == 1 else f"{xp}.stack([{', '.join(names)}])"
        for step in self.steps:
            expr = _render_step(step, expr, lang)
        return expr


@dataclass(frozen=True)
class ConcatPlan:
    """Several plans' results joined along ``axis`` (their sizes there may differ), then ``steps``."""

    parts: tuple[TensorPlan, ...]
    axis: int
    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        shapes = [p.out_shape for p in self.parts]
        a = self.axis
        if len(shapes) < 2 or any(len(x) != len(shapes[0]) or x[:a] + x[a + 1:] != shapes[0][:a] + shapes[0][a + 1:]
                                  for x in shapes) or not 0 <= a < len(shapes[0]):
            raise MappingError(f"ConcatPlan(axis={a}) cannot join parts of shapes {shapes}")

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for p in self.parts for s in p.sources))

    @property
    def source_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for p in self.parts:
            shapes.update(p.source_shapes)
        return shapes

    @property
    def in_shape(self) -> tuple[int, ...]:
        first = self.parts[0].out_shape
        return (*first[: self.axis], sum(p.out_shape[self.axis] for p in self.parts), *first[self.axis + 1 :])

    @property
    def out_shape(self) -> tuple[int, ...]:
        shape = self.in_shape
        for step in self.steps:
            shape = _shape_after(step, shape)
        return shape

    def then(self, *steps: Step) -> TensorPlan | ConcatPlan:
        head = TensorPlan(("_",), self.in_shape, self.steps).then(*steps)
        first = head.steps[0] if head.steps else None
        if isinstance(first, (Take, Select)) and first.axis == self.axis:  # picks from one part only: that part
            picked = first.indices if isinstance(first, Take) else (first.index,)
            lo = 0
            for part in self.parts:
                hi = lo + part.out_shape[self.axis]
                if all(lo <= i < hi for i in picked):
                    local = (Take(self.axis, tuple(i - lo for i in picked)) if isinstance(first, Take)
                             else Select(self.axis, first.index - lo))
                    return part.then(local, *head.steps[1:])
                lo = hi
        return ConcatPlan(self.parts, self.axis, head.steps)

    def apply(self, weights: dict[str, Any]) -> Any:
        arrays = [p.apply(weights) for p in self.parts]
        xp = _xp(arrays[0])
        x = xp.cat(arrays, self.axis) if xp is not np else np.concatenate(arrays, self.axis)
        for step in self.steps:
            x = _apply_step(step, x)
        return x

    def code(self, lang: str = "numpy") -> str:
        parts = ", ".join(p.code(lang) for p in self.parts)
        expr = f"torch.cat([{parts}], {self.axis})" if lang == "torch" else f"np.concatenate([{parts}], {self.axis})"
        for step in self.steps:
            expr = _render_step(step, expr, lang)
        return expr


def _concat(parts: tuple[TensorPlan, ...], axis: int) -> TensorPlan | ConcatPlan:
    """``parts`` joined along ``axis``: one plan with one :class:`Take` where they all pick from one source alike."""
    first = parts[0]
    takes = [p.steps[-1] if p.steps else None for p in parts]
    if all(p.sources == first.sources and p.source_shape == first.source_shape and p.steps[:-1] == first.steps[:-1]
           for p in parts) and all(isinstance(t, Take) and t.axis == axis for t in takes):
        return TensorPlan(first.sources, first.source_shape, first.steps[:-1]).then(
            Take(axis, tuple(i for t in takes for i in t.indices)))
    return ConcatPlan(parts, axis)


@dataclass(frozen=True)
class NamedMapping:
    """One :class:`TensorPlan` per target tensor, from ``source`` to ``target`` (specs or None)."""

    plans: tuple[tuple[str, TensorPlan | ConcatPlan], ...]
    source: Any = None
    target: Any = None

    def __getitem__(self, name: str) -> TensorPlan | ConcatPlan:
        return dict(self.plans)[name]

    def __iter__(self):
        return iter(name for name, _ in self.plans)

    def __len__(self) -> int:
        return len(self.plans)

    def keys(self) -> list[str]:
        return [name for name, _ in self.plans]

    def items(self) -> list[tuple[str, TensorPlan | ConcatPlan]]:
        return list(self.plans)

    @property
    def in_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for _, p in self.plans:
            shapes.update(p.source_shapes)
        return shapes

    def apply(self, weights: dict[str, Any]) -> dict[str, Any]:
        """The target dict from a source dict (arrays keep their kind: numpy or torch)."""
        if not isinstance(weights, dict):
            raise SpecError(f"weights of type={type(weights).__name__} is not a dict: expected tensors by parameter name")
        for name, shape in self.in_shapes.items():
            if name not in weights:
                raise SpecError(f"weights lack {name!r}: expected {sorted(self.in_shapes)}")
            got = tuple(int(s) for s in getattr(weights[name], "shape", ()))
            if got != shape:
                raise SpecError(f"{name} shape={got} is not the expected {shape}")
        return {name: p.apply(weights) for name, p in self.plans}

    __call__ = apply

    def then(self, other: NamedMapping) -> NamedMapping:
        """``self`` followed by ``other``: each of ``other``'s tensors written over ``self``'s sources."""
        return NamedMapping(_compose(self, other), self.source, other.target)

    def inverse(self) -> NamedMapping:
        """The plan back from the target to the source (a bias sum goes back all into the input bias)."""
        if self.source is None or self.target is None:
            raise MappingError("this NamedMapping carries no specs: build it with equivcheck.plan to invert it")
        return plan(self.target, self.source)

    def code(self, lang: str = "numpy") -> str:
        """Code reading the source dict ``w`` and writing the target dict ``out``."""
        return "\n".join(f"out[{name!r}] = {p.code(lang)}" for name, p in self.plans)

    def __str__(self) -> str:
        return self.code("numpy")


# -- canonical forms ----------------------------------------------------------------------------
def tensor_shapes(spec: SequenceSpec) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape of a spec's stored weights."""
    return {s: shape for _, sources, shape, _ in _to_canonical_parts(spec) for s in sources}


# TFLite's LSTM kernel names its gates input, forget, cell, output (lstm_shared.h: kInputToCellWeightsTensor …).
_TFLITE_GATES = {"i": "input", "f": "forget", "g": "cell", "o": "output"}


def _gate_perm(order: str, canon: str) -> tuple[int, ...]:
    return tuple(order.index(g) for g in canon)


def _to_canonical_parts(spec: SequenceSpec) -> list[tuple[str, tuple[str, ...], tuple[int, ...], tuple[Step, ...]]]:
    """(canonical name, source names, source shape, steps) for each canonical tensor."""
    if isinstance(spec, AttentionSpec):
        return _attention_parts(spec)
    if not isinstance(spec, RecurrentSpec):
        raise SpecError(f"spec={spec!r} is not a RecurrentSpec or AttentionSpec")
    G, H, I, D = spec.gates, spec.units, spec.input_size, spec.directions  # noqa: E741
    perm = _gate_perm(spec.gate_order, GATES[spec.cell])
    parts = []
    if spec.storage == "onnx":
        m = Mapping.identity
        for d in range(D):
            parts.append((f"W{d}", ("W",), (D, G * H, I), (Select(0, d), m((G * H, I)).reshape(G, H, I), Take(0, perm))))
            parts.append((f"R{d}", ("R",), (D, G * H, H), (Select(0, d), m((G * H, H)).reshape(G, H, H), Take(0, perm))))
            parts.append((f"b{d}", ("B",), (D, 2 * G * H), (Select(0, d), m((2 * G * H,)).reshape(2, G, H), Take(1, perm))))
        return parts
    if spec.storage == "flax":
        letters = GATES[spec.cell]
        parts.append(("W0", tuple(f"i{g}/kernel" for g in letters), (I, H),
                      (Mapping.identity((G, I, H)).transpose(0, 2, 1),)))
        parts.append(("R0", tuple(f"h{g}/kernel" for g in letters), (H, H),
                      (Mapping.identity((G, H, H)).transpose(0, 2, 1),)))
        parts.append(("b0", tuple(f"h{g}/bias" for g in letters), (H,), (Spread(0, 2, 1),)))
        return parts
    if spec.storage == "tflite":  # the fused op's inputs: one (H, in) / (H, H) / (H,) tensor per gate, fw_/bw_ when two
        for d in range(D):
            p = ("fw_", "bw_")[d] if spec.bidirectional else ""
            if spec.cell == "rnn":
                parts.append((f"W{d}", (f"{p}weights",), (H, I), (Mapping.identity((H, I)).reshape(1, H, I),)))
                parts.append((f"R{d}", (f"{p}recurrent_weights",), (H, H), (Mapping.identity((H, H)).reshape(1, H, H),)))
                parts.append((f"b{d}", (f"{p}bias",), (H,), (Mapping.identity((H,)).reshape(1, H), Spread(0, 2, 0))))
                continue
            gates = [_TFLITE_GATES[g] for g in GATES[spec.cell]]
            parts.append((f"W{d}", tuple(f"{p}input_to_{g}_weights" for g in gates), (H, I), ()))
            parts.append((f"R{d}", tuple(f"{p}recurrent_to_{g}_weights" for g in gates), (H, H), ()))
            parts.append((f"b{d}", tuple(f"{p}{g}_gate_bias" for g in gates), (H,), (Spread(0, 2, 0),)))
        return parts
    for d in range(D):
        if spec.storage == "torch":
            s = "_reverse" if d else ""
            parts.append((f"W{d}", (f"weight_ih_l0{s}",), (G * H, I), (Mapping.identity((G * H, I)).reshape(G, H, I), Take(0, perm))))
            parts.append((f"R{d}", (f"weight_hh_l0{s}",), (G * H, H), (Mapping.identity((G * H, H)).reshape(G, H, H), Take(0, perm))))
            parts.append((f"b{d}", (f"bias_ih_l0{s}", f"bias_hh_l0{s}"), (G * H,),
                          (Mapping.identity((2, G * H)).reshape(2, G, H), Take(1, perm))))
        else:  # keras
            p = ("forward/", "backward/")[d] if spec.bidirectional else ""
            parts.append((f"W{d}", (f"{p}kernel",), (I, G * H), (Mapping.identity((I, G * H)).reshape(I, G, H).transpose(1, 2, 0), Take(0, perm))))
            parts.append((f"R{d}", (f"{p}recurrent_kernel",), (H, G * H), (Mapping.identity((H, G * H)).reshape(H, G, H).transpose(1, 2, 0), Take(0, perm))))
            if spec.summed_bias:
                parts.append((f"b{d}", (f"{p}bias",), (G * H,), (Mapping.identity((G * H,)).reshape(G, H), Take(0, perm), Spread(0, 2, 0))))
            else:
                parts.append((f"b{d}", (f"{p}bias",), (2, G * H), (Mapping.identity((2, G * H)).reshape(2, G, H), Take(1, perm))))
    return parts


def _attention_parts(spec: AttentionSpec) -> list[tuple[str, tuple[str, ...], tuple[int, ...], tuple[Step, ...]]]:
    E, N, Dh = spec.embed_dim, spec.heads, spec.head_dim
    if spec.storage == "torch":
        parts = [("Win", ("in_proj_weight",), (3 * E, E), (Mapping.identity((3 * E, E)).reshape(3, N, Dh, E),)),
                 ("Wo", ("out_proj.weight",), (E, E), (Mapping.identity((E, E)).reshape(E, N, Dh),))]
        if spec.bias:
            parts += [("bin", ("in_proj_bias",), (3 * E,), (Mapping.identity((3 * E,)).reshape(3, N, Dh),)),
                      ("bo", ("out_proj.bias",), (E,), ())]
        return parts
    if spec.storage == "gpt2":  # Conv1D: y = x @ W + b, W (in, out); q, k, v side by side in out
        parts = [("Win", ("c_attn.weight",), (E, 3 * E), (Mapping.identity((E, 3 * E)).reshape(E, 3, N, Dh).transpose(1, 2, 3, 0),)),
                 ("Wo", ("c_proj.weight",), (E, E), (Mapping.identity((E, E)).reshape(N, Dh, E).transpose(2, 0, 1),))]
        if spec.bias:
            parts += [("bin", ("c_attn.bias",), (3 * E,), (Mapping.identity((3 * E,)).reshape(3, N, Dh),)),
                      ("bo", ("c_proj.bias",), (E,), ())]
        return parts
    if spec.storage == "neox":  # rows (heads, q;k;v, head_dim)
        parts = [("Win", ("query_key_value.weight",), (3 * E, E), (Mapping.identity((3 * E, E)).reshape(N, 3, Dh, E).transpose(1, 0, 2, 3),)),
                 ("Wo", ("dense.weight",), (E, E), (Mapping.identity((E, E)).reshape(E, N, Dh),))]
        if spec.bias:
            parts += [("bin", ("query_key_value.bias",), (3 * E,), (Mapping.identity((3 * E,)).reshape(N, 3, Dh).transpose(1, 0, 2),)),
                      ("bo", ("dense.bias",), (E,), ())]
        return parts
    K, G = spec.kv_heads, spec.group
    m = Mapping.identity
    if spec.storage == "llama":  # torch Linear (out, in) each: q_proj (N·Dh, E), k_proj and v_proj (K·Dh, E)
        names = ("q_proj", "k_proj", "v_proj")
        if K == N:
            parts = [("Win", tuple(f"{n}.weight" for n in names), (N * Dh, E), (m((3, N * Dh, E)).reshape(3, N, Dh, E),))]
        else:
            parts = [("Wq", ("q_proj.weight",), (N * Dh, E), (m((N * Dh, E)).reshape(N, Dh, E),)),
                     ("Wkv", ("k_proj.weight", "v_proj.weight"), (K * Dh, E), (m((2, K * Dh, E)).reshape(2, K, Dh, E),))]
        parts.append(("Wo", ("o_proj.weight",), (E, N * Dh), (m((E, N * Dh)).reshape(E, N, Dh),)))
        if spec.bias:
            if K == N:
                parts.append(("bin", tuple(f"{n}.bias" for n in names), (N * Dh,), (m((3, N * Dh)).reshape(3, N, Dh),)))
            else:
                parts += [("bq", ("q_proj.bias",), (N * Dh,), (m((N * Dh,)).reshape(N, Dh),)),
                          ("bkv", ("k_proj.bias", "v_proj.bias"), (K * Dh,), (m((2, K * Dh)).reshape(2, K, Dh),))]
            parts.append(("bo", ("o_proj.bias",), (E,), ()))
        return parts
    if spec.storage == "internlm2":  # wqkv rows (kv_heads, group q heads;k;v, head_dim)
        rows = K * (G + 2) * Dh
        grouped = m((rows, E)).reshape(K, G + 2, Dh, E)
        if K == N:  # one q per group: per-head interleaved, as GPT-NeoX
            parts = [("Win", ("wqkv.weight",), (rows, E), (grouped.transpose(1, 0, 2, 3),))]
        else:
            parts = [("Wq", ("wqkv.weight",), (rows, E), (grouped, Take(1, tuple(range(G))), m((K, G, Dh, E)).reshape(N, Dh, E))),
                     ("Wkv", ("wqkv.weight",), (rows, E), (grouped, Take(1, (G, G + 1)), m((K, 2, Dh, E)).transpose(1, 0, 2, 3)))]
        parts.append(("Wo", ("wo.weight",), (E, N * Dh), (m((E, N * Dh)).reshape(E, N, Dh),)))
        if spec.bias:
            gb = m((K * (G + 2) * Dh,)).reshape(K, G + 2, Dh)
            if K == N:
                parts.append(("bin", ("wqkv.bias",), (rows,), (gb.transpose(1, 0, 2),)))
            else:
                parts += [("bq", ("wqkv.bias",), (rows,), (gb, Take(1, tuple(range(G))), m((K, G, Dh)).reshape(N, Dh))),
                          ("bkv", ("wqkv.bias",), (rows,), (gb, Take(1, (G, G + 1)), m((K, 2, Dh)).transpose(1, 0, 2)))]
            parts.append(("bo", ("wo.bias",), (E,), ()))
        return parts
    out = "attention_output" if spec.storage == "keras" else "out"
    if K == N:
        parts = [("Win", ("query/kernel", "key/kernel", "value/kernel"), (E, N, Dh), (m((3, E, N, Dh)).transpose(0, 2, 3, 1),))]
    else:  # Keras GroupQueryAttention: query (E, N, Dh), key and value (E, K, Dh)
        parts = [("Wq", ("query/kernel",), (E, N, Dh), (m((E, N, Dh)).transpose(1, 2, 0),)),
                 ("Wkv", ("key/kernel", "value/kernel"), (E, K, Dh), (m((2, E, K, Dh)).transpose(0, 2, 3, 1),))]
    parts.append(("Wo", (f"{out}/kernel",), (N, Dh, E), (m((N, Dh, E)).transpose(2, 0, 1),)))
    if spec.bias:
        if K == N:
            parts.append(("bin", ("query/bias", "key/bias", "value/bias"), (N, Dh), ()))
        else:
            parts += [("bq", ("query/bias",), (N, Dh), ()), ("bkv", ("key/bias", "value/bias"), (K, Dh), ())]
        parts.append(("bo", (f"{out}/bias",), (E,), ()))
    return parts


def _inverse_steps(in_shape: tuple[int, ...], steps: tuple[Step, ...]) -> tuple[Step, ...]:
    shapes = [in_shape]
    for step in steps:
        shapes.append(step.out_shape if isinstance(step, Mapping) else step.out_shape(shapes[-1]))
    inv: list[Step] = []
    for step, before in zip(reversed(steps), reversed(shapes[:-1])):
        if isinstance(step, Mapping):
            inv.append(step.inverse())
        elif isinstance(step, Take):
            inv.append(Take(step.axis, tuple(sorted(range(len(step.indices)), key=step.indices.__getitem__))))
        elif isinstance(step, Spread):
            inv.append(Sum(step.axis))
        elif isinstance(step, Sum):
            inv.append(Spread(step.axis, before[step.axis], 0))
        else:
            raise MappingError(f"{step!r} has no inverse")
    return tuple(inv)


@lru_cache(maxsize=256)
def canonical(spec: SequenceSpec) -> NamedMapping:
    """The plan from a spec's named weights to its canonical dict (see the module docstring)."""
    plans = []
    for canon, sources, shape, steps in _to_canonical_parts(spec):
        start = TensorPlan(sources, shape)
        plans.append((canon, start.then(*steps)))
    return NamedMapping(tuple(plans), spec, None)


@lru_cache(maxsize=256)
def from_canonical(spec: SequenceSpec) -> NamedMapping:
    """The plan from the canonical dict to a spec's named weights."""
    if isinstance(spec, RecurrentSpec) and spec.storage == "onnx":
        return NamedMapping(tuple(_onnxfrom_canonical(spec).items()), None, spec)
    plans: dict[str, TensorPlan | ConcatPlan] = {}
    fused = isinstance(spec, AttentionSpec) and spec.storage == "internlm2" and spec.kv_heads != spec.heads
    for canon, sources, shape, steps in _to_canonical_parts(spec):
        if fused and canon in ("Wq", "Wkv", "bq", "bkv"):
            if canon in ("Wq", "bq"):
                plans[sources[0]] = _grouped_from_canonical(spec, canon == "Wq")
            continue
        stacked = shape if len(sources) == 1 else (len(sources), *shape)
        fwd = TensorPlan(sources, shape, steps)
        back = TensorPlan((canon,), fwd.out_shape).then(*_inverse_steps(stacked, steps))
        for j, s in enumerate(sources):
            plans[s] = back if len(sources) == 1 else back.then(Select(0, j))
    return NamedMapping(tuple(plans.items()), None, spec)


def _grouped_from_canonical(spec: AttentionSpec, kernel: bool) -> ConcatPlan:
    """InternLM2's ``wqkv`` (kernel, else bias) from ``Wq`` and ``Wkv``: per key-value group its query heads, k, v."""
    N, K, G, Dh = spec.heads, spec.kv_heads, spec.group, spec.head_dim
    tail = (spec.embed_dim,) if kernel else ()
    q, kv = ("Wq", "Wkv") if kernel else ("bq", "bkv")
    m = Mapping.identity
    parts = (TensorPlan((q,), (N, Dh, *tail)).then(m((N, Dh, *tail)).reshape(K, G, Dh, *tail)),
             TensorPlan((kv,), (2, K, Dh, *tail)).then(m((2, K, Dh, *tail)).transpose(1, 0, 2, *range(3, 3 + len(tail)))))
    return ConcatPlan(parts, 1).then(m((K, G + 2, Dh, *tail)).reshape(K * (G + 2) * Dh, *tail))


def _onnxfrom_canonical(spec: RecurrentSpec) -> dict[str, TensorPlan]:
    G, H, I, D = spec.gates, spec.units, spec.input_size, spec.directions  # noqa: E741
    back = _gate_perm(GATES[spec.cell], spec.gate_order)
    out = {}
    for name, canon, shape, flat in (("W", "W", (G, H, I), (G * H, I)), ("R", "R", (G, H, H), (G * H, H)),
                                     ("B", "b", (2, G, H), (2 * G * H,))):
        p = TensorPlan(tuple(f"{canon}{d}" for d in range(D)), shape)
        lead = 0 if D == 1 else 1
        take = Take((1 if name == "B" else 0) + lead, back)
        out[name] = p.then(take, Mapping.identity(p.in_shape).reshape(D, *flat))
    return out


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _compatible(src: SequenceSpec, dst: SequenceSpec) -> None:
    def no(reason: str) -> NoMapping:
        return NoMapping(f"no mapping from {src.describe()} to {dst.describe()}: {reason}")

    if type(src) is not type(dst):
        raise no(f"one is {_article(src.kind)} layer, the other {_article(dst.kind)} layer")
    if isinstance(src, RecurrentSpec):
        for f in ("cell", "input_size", "units", "bidirectional"):
            if getattr(src, f) != getattr(dst, f):
                raise no(f"{f} differs ({getattr(src, f)} vs {getattr(dst, f)})")
        if src.cell == "gru" and src.reset_after != dst.reset_after:
            raise no("the reset gate is applied after the recurrent matmul in one and before it in the other "
                     "(reset_after / linear_before_reset differ): the layers compute different functions")
    else:
        for f in ("embed_dim", "heads", "head_dim", "kv_heads", "bias"):
            if getattr(src, f) != getattr(dst, f):
                raise no(f"{f} differs ({getattr(src, f)} vs {getattr(dst, f)})")


@lru_cache(maxsize=256)
def plan(source: SequenceSpec, target: SequenceSpec) -> NamedMapping:
    """One :class:`TensorPlan` per target tensor, or :class:`NoMapping` saying why none exists."""
    _compatible(source, target)
    return NamedMapping(_compose(canonical(source), from_canonical(target)), source, target)


def _compose(first: NamedMapping, second: NamedMapping) -> tuple[tuple[str, TensorPlan | ConcatPlan], ...]:
    return tuple((name, _compose_one(first, p)) for name, p in second.plans)


def _compose_one(first: NamedMapping, p: TensorPlan | ConcatPlan) -> TensorPlan | ConcatPlan:
    """``p`` read over ``first``'s sources: each of its sources replaced by ``first``'s plan of it."""
    if isinstance(p, ConcatPlan):
        parts = [_compose_one(first, q) for q in p.parts]
        if any(isinstance(q, ConcatPlan) for q in parts):
            raise MappingError("cannot join plans that are themselves joined")
        return _concat(tuple(parts), p.axis).then(*p.steps)
    inner = [first[s] for s in p.sources]
    if len(inner) > 1 and any(isinstance(q, ConcatPlan) for q in inner):
        raise MappingError("cannot stack plans that are joined")
    start = inner[0] if len(inner) == 1 else _stack_composed(inner)
    return start.then(*p.steps)


def _stack_composed(inner: list[TensorPlan]) -> TensorPlan:
    """Several canonical tensors, each from its own source plan, stacked on a new first axis."""
    k, shape = len(inner[0].sources), inner[0].source_shape
    if all(len(q.sources) == k and q.source_shape == shape for q in inner) and len({q.steps for q in inner}) == 1 and (
            k > 1 or not any(isinstance(s, Select) for s in inner[0].steps)):
        # the same steps on each direction's sources: stack them all and run the steps one axis further
        d = len(inner)
        sources = tuple(s for q in inner for s in q.sources)
        lead = (Mapping.identity((d * k, *shape)).reshape(d, k, *shape),) if k > 1 else ()
        return TensorPlan(sources, shape, (*lead, *(_shift(s, d) for s in inner[0].steps)))
    if all(q.sources == inner[0].sources and len(q.sources) == 1 for q in inner) and all(
            q.steps and isinstance(q.steps[0], Select) and q.steps[0].axis == 0 for q in inner) and [
            q.steps[0].index for q in inner] == list(range(len(inner))) and len({q.steps[1:] for q in inner}) == 1:
        # each direction selected from one stacked source (ONNX to ONNX): skip the select
        steps = tuple(_shift(s, len(inner)) for s in inner[0].steps[1:])
        return TensorPlan(inner[0].sources, inner[0].source_shape, steps)
    raise MappingError("cannot stack these per-direction plans")


def _shift(step: Step, lead: int) -> Step:
    """``step`` acting one axis further right, behind a new first axis of ``lead``."""
    if isinstance(step, Mapping):
        out = Mapping.identity((lead, *step.in_shape))
        for op in step.ops:
            if isinstance(op, Reshape):
                out = out.reshape(lead, *op.shape)
            elif isinstance(op, Transpose):
                out = out.transpose(0, *(p + 1 for p in op.perm))
            else:
                out = out.flip(*(a + 1 for a in op.axes))
        return out
    if isinstance(step, Take):
        return Take(step.axis + 1, step.indices)
    if isinstance(step, Select):
        return Select(step.axis + 1, step.index)
    if isinstance(step, Sum):
        return Sum(step.axis + 1)
    return Spread(step.axis + 1, step.size, step.at)


def convert(source: SequenceSpec, target: SequenceSpec, weights: dict[str, Any]) -> dict[str, Any]:
    """``source``'s named weights as ``target``'s (a new dict; numpy or torch arrays keep their kind)."""
    return plan(source, target).apply(weights)
