"""The layout of a torch dense layer's input, read from the model's graph (torch.fx) rather than guessed.

``torch.fx.symbolic_trace`` records every op of ``forward``, functional ones included
(``torch.relu``, ``F.max_pool2d``, ``x.flatten(1)``, ``x.permute(0, 2, 3, 1).reshape(n, -1)``)
that module hooks never see. Each tensor in the graph is given the letters of its axes: a conv's
output (and the model's input) is ``N, C, *spatial``; elementwise ops, pooling and norms keep
the letters; ``permute``/``transpose``/``movedim`` move them; ``flatten``/``view``/``reshape``/
``squeeze`` merge them. A dense layer whose input is one merged axis holding a whole map reads it
flattened in that order. Any other op between two layers stops the trace for the layers after
it (the adapter then judges the layout from the captured activations, and says so).

Shapes come from the real run (each module's output, recorded by the adapter's hooks) and, for
the functional shape ops, from running those ops alone on zeros: nothing is run twice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from equivcheck.errors import framework_message
from equivcheck.modelcheck.layers import Layout
from equivcheck.specs import spatial_letters

__all__ = ["Found", "dense_layouts", "trace"]

#: Ops that keep every axis where it is (elementwise functions, dropout, casts, softmax along an axis).
_KEEP = frozenset({
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardtanh",
    "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid", "tanhshrink", "softshrink", "hardshrink",
    "threshold", "rrelu", "prelu", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
    "type_as", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "clamp", "clip", "clamp_min", "clamp_max",
    "softmax", "log_softmax", "add", "sub", "mul", "div", "truediv", "true_divide", "pow",
})
#: Ops that pool each spatial axis and keep the axes (sizes from the run).
_POOL = frozenset(f"{kind}{rank}d" for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool",
                                               "lp_pool") for rank in (1, 2, 3))
#: Ops that merge (or split off size-1) axes in memory order.
_REGROUP = frozenset({"flatten", "view", "reshape", "squeeze", "unsqueeze"})
#: Ops that move axes.
_MOVE = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"})
#: Ops on shapes and Python numbers (``x.size(0)``, ``x.shape[0]``): evaluated, never a map.
_NUMBER = frozenset({"size", "dim", "numel", "getattr", "getitem", "mul", "add", "sub", "floordiv", "truediv"})
_SCALAR_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.dropout", "torch.nn.modules.linear",
                   "torch.nn.modules.batchnorm", "torch.nn.modules.normalization", "torch.nn.modules.instancenorm")


@dataclass(frozen=True)
class Found:
    """What the graph says of one dense layer's input: its layout (None: the graph does not say) and how."""

    layout: Layout | None
    how: str  # "the map of conv flattened HWC (relu, permute, reshape)", or why the trace stops


@dataclass(frozen=True)
class _Map:
    """A tensor's axes after the batch: each one's letters and their sizes, in memory order."""

    axes: tuple[tuple[tuple[str, int], ...], ...]
    origin: str  # the layer whose output (or "the input") the letters name
    ops: tuple[str, ...] = ()  # the ops run since

    def then(self, op: str, axes: tuple[tuple[tuple[str, int], ...], ...] | None = None) -> _Map:
        return _Map(self.axes if axes is None else axes, self.origin, (*self.ops, op))


class _Unknown(Exception):
    """A shape the graph and the run do not give."""


def trace(model: Any) -> Any:
    """``torch.fx.symbolic_trace(model)``, or a one-line reason where it cannot be traced."""
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError... on untraceable Python
        return framework_message(exc)


def dense_layouts(graph: Any, input_shape: tuple[int, ...], shapes: dict[str, list[tuple[int, ...]]],
                  kind_of: Callable[[Any], str | None]) -> dict[str, Found]:
    """Each dense layer's input layout as the graph gives it, by record name (``fc``, ``fc#2``), for the dense
    layers that read one axis per sample (a dense layer applied per position has no map layout to find).

    ``shapes``: each module's output shapes from the real run, by module name, in call order;
    ``kind_of``: a module's kind (``"conv"``, ``"dense"``, a norm...) or None where it is no checked layer.
    """
    return _Reader(graph, input_shape, shapes, kind_of).read()


def _name(node: Any) -> str:
    if node.op == "call_method":
        return str(node.target)
    name = getattr(node.target, "__name__", str(node.target))
    return name.strip("_")


class _Reader:
    def __init__(self, graph: Any, input_shape: tuple[int, ...], shapes: dict[str, list[tuple[int, ...]]],
                 kind_of: Callable[[Any], str | None]) -> None:
        self.gm, self.kind_of = graph, kind_of
        self.input_shape = tuple(input_shape)
        self.maps: dict[Any, _Map | str | None] = {}  # node -> its letters, why unknown, or None (not a tensor)
        self.values: dict[Any, Any] = {}  # node -> a tensor of its shape (zeros) or its Python value
        self.module_shape: dict[Any, tuple[int, ...]] = {}
        self.key: dict[Any, str] = {}  # call_module node -> its record name
        calls: dict[str, list[Any]] = {}
        for node in graph.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        for target, nodes in calls.items():
            seen = shapes.get(target, [])
            for i, node in enumerate(nodes):
                self.key[node] = target if i == 0 else f"{target}#{i + 1}"
                if len(seen) == len(nodes) and seen[i] is not None:  # aligned with the run only where counts agree
                    self.module_shape[node] = tuple(seen[i])
        self.placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]

    def read(self) -> dict[str, Found]:
        found = {}
        for node in self.gm.graph.nodes:
            self.maps[node] = self._map(node)
            if node.op == "call_module" and self.kind_of(self.gm.get_submodule(node.target)) == "dense":
                got = self._found(node)
                if got is not None:
                    found[self.key[node]] = got
        return found

    # -- a dense layer's input --------------------------------------------------------------
    def _found(self, node: Any) -> Found | None:
        source = node.args[0] if node.args else None
        m = self.maps.get(source) if hasattr(source, "op") else None
        if isinstance(m, str) or m is None:
            return Found(None, m or "its input is not a traced tensor")
        if len(m.axes) != 1:
            return None  # per position
        group = m.axes[0]
        letters = "".join(a for a, _ in group)
        ops = f" ({', '.join(m.ops)})" if m.ops else ""
        features = math.prod(s for _, s in group)
        canon = "C" + spatial_letters(len(group) - 1) if group else ""
        if sorted(letters) != sorted(canon) or len(group) < 2:
            return Found(Layout((features,)), f"the {features} features of {m.origin}{ops}")
        sizes = dict(group)
        wide = [a for a in letters if sizes[a] > 1]
        if len(wide) <= 1:  # every order is the same memory: plain features, as the activations would say
            return Found(Layout((features,)), f"the map of {m.origin} flattened, one axis wide{ops}")
        order = _order(canon, wide)
        return Found(Layout(tuple(sizes[a] for a in canon), flatten=order),
                     f"the map of {m.origin} flattened {order}{ops}")

    # -- letters ----------------------------------------------------------------------------
    def _map(self, node: Any) -> _Map | str | None:
        try:
            if node.op == "placeholder":
                if node is not self.placeholders[0]:
                    return None
                return _fresh(self.input_shape, "the input")
            if node.op == "get_attr":
                return None  # a constant: not a map (an elementwise op with it keeps the map's axes if its shape does)
            if node.op == "output":
                return None
            if node.op == "call_module":
                return self._module(node)
            return self._function(node)
        except _Unknown as exc:
            return str(exc) or f"the shape after {_name(node)} is not known"

    def _first(self, node: Any) -> _Map | str | None:
        src = node.args[0] if node.args else None
        if not hasattr(src, "op"):
            return None
        return self.maps.get(src)

    def _module(self, node: Any) -> _Map | str | None:
        module = self.gm.get_submodule(node.target)
        cls = type(module).__name__
        kind = self.kind_of(module)
        shape = self.module_shape.get(node)
        if kind is not None and shape is None:
            return f"{node.target} ({cls}) was not seen in the run"
        if kind in ("conv", "depthwise", "conv_transpose"):
            return _fresh(shape, node.target)
        if kind == "dense":
            return _fresh(shape, node.target) if len(shape) == 2 else f"{node.target} is a dense layer applied per position"
        before = self._first(node)
        if isinstance(before, str):
            return before
        if before is None:
            return f"{node.target} ({cls}) reads no traced tensor"
        owner = type(module).__module__
        if kind is not None or (owner in _SCALAR_MODULES and cls not in ("MultiheadAttention", "Bilinear", "Linear")) \
                or cls == "Identity":
            return before.then(cls)
        if shape is None:
            return f"{node.target} ({cls}) was not seen in the run"
        if owner == "torch.nn.modules.pooling":
            return self._pooled(before, cls, shape)
        if cls in ("Flatten", "Unflatten"):
            return self._regrouped(before, cls, self._shape(node.args[0]), shape)
        return f"{node.target} ({cls}) is not followed by the trace"

    def _function(self, node: Any) -> _Map | str | None:
        name = _name(node)
        if name in ("size", "dim", "numel") or (name == "getattr" and node.args[1] in ("shape", "ndim", "dtype", "device")):
            return None
        if name == "getitem" and self._first(node) is None:
            return None  # an item of a shape
        tensors = [a for a in node.all_input_nodes if self.maps.get(a) is not None]
        if not tensors:
            return None if name in _NUMBER else f"{name} makes a tensor the trace does not follow"
        maps = [self.maps[a] for a in tensors]
        for m in maps:
            if isinstance(m, str):
                return m
        first = self._first(node)
        if not isinstance(first, _Map):
            first = maps[0]
        if name in _KEEP:
            if any(m.axes != first.axes for m in maps) or (len(node.all_input_nodes) > len(tensors)
                                                           and self._shape(node) != _shape_of(first)):
                return f"{name} combines tensors laid out differently"
            return first.then(name)
        if len(maps) > 1:
            return f"{name} reads several tensors"
        if name in _POOL:
            return self._pooled(first, name, self._shape(node))
        if name in _REGROUP:
            return self._regrouped(first, name, self._shape(node.args[0]), self._shape(node))
        if name in _MOVE:
            return self._moved(node, first, name)
        return f"{name} is not followed by the trace"

    def _pooled(self, m: _Map, op: str, shape: tuple[int, ...]) -> _Map | str:
        if len(shape) != len(m.axes) + 1:
            return f"{op} changes the rank"
        axes = []
        for group, size in zip(m.axes, shape[1:]):
            if math.prod(s for _, s in group) == size:
                axes.append(group)
            elif len(group) == 1:
                axes.append(((group[0][0], size),))
            else:
                return f"{op} pools a merged axis"
        return m.then(op, tuple(axes))

    def _regrouped(self, m: _Map, op: str, before: tuple[int, ...], after: tuple[int, ...]) -> _Map | str:
        axes = _regroup(m.axes, before, after)
        return f"{op} splits an axis or the batch" if axes is None else m.then(op, axes)

    def _moved(self, node: Any, m: _Map, op: str) -> _Map | str:
        import torch

        rank = len(m.axes) + 1
        probe = torch.empty(tuple(range(1, rank + 1)))  # distinct sizes: the result's shape is the permutation
        args = [probe if a is node.args[0] else a for a in node.args]
        if any(hasattr(a, "op") for a in args[1:]) or any(hasattr(v, "op") for v in node.kwargs.values()):
            return f"{op} takes its axes from the graph"
        try:
            moved = _call(node, args, dict(node.kwargs))
        except Exception as exc:
            return f"{op}: {framework_message(exc)}"
        perm = [d - 1 for d in moved.shape]
        if perm[0] != 0:
            return f"{op} moves the batch"
        return m.then(op, tuple(m.axes[p - 1] for p in perm[1:]))

    # -- shapes -----------------------------------------------------------------------------
    def _shape(self, node: Any) -> tuple[int, ...]:
        value = self._value(node)
        if not hasattr(value, "shape"):
            raise _Unknown(f"{_name(node)} is not a tensor")
        return tuple(int(s) for s in value.shape)

    def _value(self, node: Any) -> Any:
        if not hasattr(node, "op"):
            return node
        if node in self.values:
            return self.values[node]
        import torch
        from torch.fx.node import map_arg

        if node.op == "placeholder" and node is self.placeholders[0]:
            value = torch.zeros(self.input_shape)
        elif node.op == "call_module" and node in self.module_shape:
            value = torch.zeros(self.module_shape[node])
        elif node.op == "get_attr":
            value = _attr(self.gm, node.target)
        elif node.op in ("call_function", "call_method") and _name(node) in _KEEP | _POOL | _REGROUP | _MOVE | _NUMBER:
            args, kwargs = map_arg(node.args, self._value), map_arg(node.kwargs, self._value)
            try:
                with torch.no_grad():
                    value = _call(node, args, kwargs)
            except Exception as exc:
                raise _Unknown(f"{_name(node)} cannot be run alone: {framework_message(exc)}") from None
        else:
            raise _Unknown(f"the shape of {node.name} is not known")
        self.values[node] = value
        return value


def _call(node: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _attr(root: Any, target: str) -> Any:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def _fresh(shape: tuple[int, ...], origin: str) -> _Map:
    """The axes of a layer's output: ``N, C, *spatial`` (``N, F`` for features)."""
    if len(shape) < 2:
        raise _Unknown(f"{origin} gives a tensor of rank {len(shape)}")
    letters = "F" if len(shape) == 2 else "C" + spatial_letters(len(shape) - 2)
    return _Map(tuple(((a, int(s)),) for a, s in zip(letters, shape[1:])), origin)


def _shape_of(m: _Map) -> tuple[int, ...]:
    return tuple(math.prod(s for _, s in group) for group in m.axes)


def _regroup(axes: tuple[tuple[tuple[str, int], ...], ...], before: tuple[int, ...],
             after: tuple[int, ...]) -> tuple[tuple[tuple[str, int], ...], ...] | None:
    """The axes after a reshape from ``before`` to ``after`` that merges neighbouring axes (and adds or drops
    axes of size 1); None where it splits one (or touches the batch)."""
    if not before or not after or before[0] != after[0] or tuple(before[1:]) != _sizes(axes):
        return None
    loose = [g for g, s in zip(axes, before[1:]) if s == 1]
    wide = [g for g, s in zip(axes, before[1:]) if s != 1]
    out: list[list[tuple[str, int]]] = []
    i = 0
    for size in after[1:]:
        group: list[tuple[str, int]] = []
        if size != 1:
            product = 1
            while i < len(wide) and product < size:
                group.extend(wide[i])
                product *= math.prod(s for _, s in wide[i])
                i += 1
            if product != size:
                return None
        elif loose:
            group.extend(loose.pop(0))
        out.append(group)
    if i != len(wide):
        return None
    if loose and out:  # size-1 axes dropped: their letters ride along (any place is the same memory)
        out[-1].extend(a for g in loose for a in g)
    return tuple(tuple(g) for g in out)


def _sizes(axes: tuple[tuple[tuple[str, int], ...], ...]) -> tuple[int, ...]:
    return tuple(math.prod(s for _, s in group) for group in axes)


def _order(canon: str, wide: list[str]) -> str:
    """The flatten order whose axes wider than one come in the order ``wide``: the native one where it fits."""
    preferred = [canon, canon[1:] + canon[:1]]
    rest = ["".join(p) for p in itertools.permutations(canon)]
    for order in [*preferred, *rest]:
        if [a for a in order if a in wide] == wide:
            return order
    return "".join(wide)  # not reached: every order of the letters is tried

