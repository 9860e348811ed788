"""Framework-free records of one linear layer as a model ran it, and the layouts of its input.

A :class:`Linear` is what capture found: the layer's kind and configuration, its weights in
the framework's stored layout, and the input and output it saw. :class:`Layout` says how the
input is laid out against the *canonical* form ``(N, C, *spatial)`` of the map (or the plain
features ``(N, F)`` of a dense layer that reads no map), so that one side's captured input can
be brought to the other side's layout.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from equivcheck.errors import EquivcheckError
from equivcheck.specs import CHANNELS_FIRST, ConvSpec, DenseSpec, LayerSpec, spatial_letters

__all__ = ["Layout", "Linear", "Other", "conv_letters", "flatten_order", "spec_of"]


@dataclass
class Layout:
    """How a layer's input holds its map: ``letters`` of the axes after the batch, in memory order.

    ``"CHW"`` / ``"HWC"`` for a conv's input; for a dense input ``flatten`` is the order its
    features linearise the map (``"CHW"``, ``"HWC"``, ``"CWH"``...), ``map_shape`` the canonical
    ``(C, *spatial)``; a dense input with no map found has ``map_shape=(F,)`` and ``flatten=""``.
    """

    map_shape: tuple[int, ...]
    letters: str = ""  # conv: memory order of the input's axes
    flatten: str = ""  # dense: the flatten order of its features

    @property
    def canonical_letters(self) -> str:
        return "C" + spatial_letters(len(self.map_shape) - 1) if len(self.map_shape) > 1 else ""

    @property
    def is_flat(self) -> bool:
        return len(self.map_shape) == 1

    def to_canonical(self, x: np.ndarray) -> np.ndarray:
        """``(N, C, *spatial)`` (or ``(N, F)``) from this layout."""
        n = x.shape[0]
        if self.is_flat:
            return x.reshape(n, -1)
        canon = self.canonical_letters
        order = self.flatten or self.letters
        sizes = dict(zip(canon, self.map_shape))
        m = x.reshape(n, *(sizes[a] for a in order))
        return m.transpose(0, *(1 + order.index(a) for a in canon))

    def from_canonical(self, xc: np.ndarray) -> np.ndarray:
        n = xc.shape[0]
        if self.is_flat:
            return np.ascontiguousarray(xc.reshape(n, -1))
        canon = self.canonical_letters
        order = self.flatten or self.letters
        out = xc.reshape(n, *self.map_shape).transpose(0, *(1 + canon.index(a) for a in order))
        return np.ascontiguousarray(out.reshape(n, -1) if self.flatten else out)

    def describe(self) -> str:
        if self.is_flat:
            return f"{self.map_shape[0]} features"
        if self.flatten:
            return f"map {'x'.join(map(str, self.map_shape))} flattened {self.flatten}"
        return self.letters


@dataclass
class Linear:
    """One linear layer as captured from a model run."""

    name: str
    framework: str  # "torch" | "keras"
    kind: str  # "dense" | "conv" | "depthwise" | "conv_transpose"
    kernel: np.ndarray  # the framework's stored layout
    bias: np.ndarray | None
    x: np.ndarray  # the input it saw (framework layout)
    y: np.ndarray  # its output without any fused activation (framework layout)
    config: dict[str, Any] = field(default_factory=dict)
    layer: Any = field(default=None, repr=False)  # the real layer, for replay
    layout: Layout | None = None
    map_before: np.ndarray | None = field(default=None, repr=False)  # the map a dense input was flattened from
    map_letters: str = ""  # axes of map_before in memory order
    index: int = 0  # execution order among the model's linear layers

    @property
    def weights(self) -> int:
        return int(self.kernel.size)

    @property
    def family(self) -> str:
        return "transposed" if self.kind == "conv_transpose" else "linear"

    @property
    def output_layout(self) -> str:
        return self.config.get("data_format", CHANNELS_FIRST)


@dataclass(frozen=True)
class Other:
    """A layer holding parameters that no pairing rule checks (an LSTM, attention, an unknown layer)."""

    name: str
    kind: str  # the framework's own class or op name: "LSTM", "MultiheadAttention", "BatchNormalization"
    weights: int  # how many parameters (and statistics) it holds
    after: int = -1  # how many captured layers ran before it (its place in execution order); -1: not known / not run
    why: str = ""  # why no rule checks it, where the adapter knows (an LSTM with options no spec describes)


def flatten_order(map_: np.ndarray, letters: str, x: np.ndarray) -> str | None:
    """The order in which ``x`` (N, F) linearises ``map_`` (N, ...) whose axes are ``letters``, or None.

    Exact where ``x`` holds the map's values (shape-only operations move values without
    arithmetic). Where an elementwise activation ran between the map and the flatten (``torch.relu``
    called as a function, invisible to module hooks), the one order in which ``x`` is a monotone
    function of the map's values (ReLU, sigmoid, tanh, ELU, leaky ReLU...), else None.
    """
    n = map_.shape[0]
    if x.ndim != 2 or map_.shape[0] != x.shape[0] or math.prod(map_.shape[1:]) != x.shape[1]:
        return None
    orders = ["".join(letters[p] for p in perm) for perm in itertools.permutations(range(len(letters)))]
    moved = {o: map_.transpose(0, *(1 + letters.index(a) for a in o)).reshape(n, -1) for o in orders}
    exact = {o for o, m in moved.items() if np.array_equal(m, x)}
    if exact:
        return _one(exact, moved)
    return _one({o for o, m in moved.items() if _monotone(m, x)}, moved)


def _one(found: set[str], moved: dict[str, np.ndarray]) -> str | None:
    """The one order found, or None (none, or a map symmetric enough that several orders fit)."""
    return next(iter(found)) if len(found) == 1 else None


def _monotone(m: np.ndarray, x: np.ndarray) -> bool:
    """Whether ``x`` is a non-constant monotone function of ``m``, element by element."""
    a, b = np.asarray(m, np.float64).reshape(-1), np.asarray(x, np.float64).reshape(-1)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.ptp(b) == 0:
        return False
    order = np.argsort(a, kind="stable")
    steps = np.diff(b[order])
    same = np.diff(a[order]) == 0
    if np.any(steps[same] != 0):  # equal inputs, different outputs: not a function of the value
        return False
    return bool(np.all(steps >= 0) or np.all(steps <= 0))


def spec_of(layer: Linear, role: str = "layer") -> LayerSpec:
    """The :class:`~equivcheck.specs.DenseSpec` / :class:`~equivcheck.specs.ConvSpec` of a captured layer."""
    cfg, layout = layer.config, layer.layout
    try:
        if layer.kind == "dense":
            assert layout is not None
            if layout.is_flat:
                channels, spatial, flatten = layout.map_shape[0], (), None
            else:
                channels, spatial, flatten = layout.map_shape[0], layout.map_shape[1:], layout.flatten
            return DenseSpec(channels=channels, spatial=spatial, units=cfg["units"], data_format=CHANNELS_FIRST,
                             flatten=flatten, kernel_layout=cfg["kernel_layout"], bias=layer.bias is not None,
                             name=layer.name)
        data_format = cfg["data_format"]
        xs = layer.x.shape[1:]
        spatial = xs[1:] if data_format == CHANNELS_FIRST else xs[:-1]
        return ConvSpec(
            in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], kernel_size=cfg["kernel_size"],
            spatial=tuple(int(s) for s in spatial), stride=cfg["stride"], dilation=cfg["dilation"],
            padding=cfg["padding"], groups=cfg["groups"], data_format=data_format, kernel_layout=cfg["kernel_layout"],
            transposed=layer.kind == "conv_transpose", output_padding=cfg.get("output_padding", 0),
            op=cfg.get("op", "correlate"), bias=layer.bias is not None, name=layer.name,
        )
    except EquivcheckError as exc:
        raise EquivcheckError(f"{role} {layer.name!r} ({layer.framework} {layer.kind}) cannot be described: {exc}") from None


def conv_letters(rank: int, data_format: str) -> str:
    letters = spatial_letters(rank)
    return "C" + letters if data_format == CHANNELS_FIRST else letters + "C"

