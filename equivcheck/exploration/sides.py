"""One side of an exploration: a layer that can be given weights and run on a canonical map.

Whatever the layer is — a spec built by a backend, a torch module, a Keras layer or model, a
plain callable — it becomes a :class:`Side`: its stored kernel shape, whether it has a bias,
its *geometry* (a :class:`~equivcheck.specs.ConvSpec` in canonical layout: ``OIHW``
cross-correlation, channels first; a dense layer is a conv whose kernel covers the map), the
data format it reads, and :meth:`Side.run`, which takes a canonical ``(batch, C, *spatial)``
map and returns a canonical ``(batch, O, *out_spatial)`` output. The layer's own weights are
never modified: torch runs through ``torch.func.functional_call``, Keras through
``stateless_call``.
"""

from __future__ import annotations

import inspect
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from equivcheck._arrays import aligned_empty, to_numpy
from equivcheck.errors import EquivcheckError, ProbeError, SpecError, framework_message
from equivcheck.memory import require_memory
from equivcheck.presets import backend_of, build
from equivcheck.specs import CHANNELS_FIRST, CHANNELS_LAST, DATA_FORMATS, ConvSpec, DenseSpec, LayerSpec, Shape

__all__ = ["BlackBox", "CallableSide", "LayerSide", "Side", "spec_side"]

# Kernels up to this many weights are probed in float64 where the layer allows it.
FLOAT64_MAX_WEIGHTS = 1 << 24


@dataclass
class BlackBox:
    """A callable ``fn(x, kernel[, bias])`` and what the explorer must know to call it.

    ``kernel_shape`` is the shape of the kernel ``fn`` takes; ``data_format`` how it reads
    the map ``x`` (``"channels_first"``: ``(batch, C, *spatial)``, or ``"channels_last"``);
    ``dtype`` the float type to call it with. A plain function carrying these as attributes
    (``fn.kernel_shape = (7, 7, 512, 4096)``) works as well.
    """

    fn: Callable[..., Any]
    kernel_shape: tuple[int, ...]
    data_format: str = CHANNELS_FIRST
    bias: bool = True
    dtype: str = "float64"
    transposed: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise SpecError(f"fn={self.fn!r} is not callable: expected fn(x, kernel, bias)")
        try:
            self.kernel_shape = tuple(int(s) for s in self.kernel_shape)
        except (TypeError, ValueError):
            raise SpecError(f"kernel_shape={self.kernel_shape!r} is not a tuple of sizes") from None
        if len(self.kernel_shape) < 2 or min(self.kernel_shape) < 1:
            raise SpecError(f"kernel_shape={self.kernel_shape} must have 2 (dense) to 5 (3-D conv) positive sizes")
        if self.data_format not in DATA_FORMATS:
            raise SpecError(f"data_format={self.data_format!r} is not valid: expected 'channels_first' or 'channels_last'")
        if self.dtype not in ("float32", "float64"):
            raise SpecError(f"dtype={self.dtype!r} is not valid for probing: expected 'float32' or 'float64'")

    @classmethod
    def from_callable(cls, fn: Callable[..., Any]) -> BlackBox:
        shape = getattr(fn, "kernel_shape", None)
        name = getattr(fn, "__qualname__", type(fn).__name__)
        if shape is None:
            raise SpecError(
                f"callable {name} has no kernel_shape: set fn.kernel_shape = (...) or wrap it, "
                "equivcheck.exploration.BlackBox(fn, kernel_shape=...)"
            )
        try:
            params = [
                p for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            takes_bias = len(params) >= 3
        except (TypeError, ValueError):
            takes_bias = True
        return cls(
            fn, shape, data_format=getattr(fn, "data_format", CHANNELS_FIRST), bias=getattr(fn, "bias", takes_bias),
            dtype=getattr(fn, "dtype", "float64"), transposed=getattr(fn, "transposed", False), name=name,
        )


class Side(ABC):
    """A layer the explorer can set weights on and run. Subclasses implement :meth:`_forward`."""

    framework = "numpy"

    def __init__(self, *, label: str, kind: str, geometry: ConvSpec, kernel_shape: tuple[int, ...], has_bias: bool,
                 data_format: str, dtype: str, flat_input: bool = False, rank0: bool = False) -> None:
        self.label = label
        self.kind = kind  # "dense" | "conv"
        self.geometry = geometry
        self.kernel_shape = tuple(int(s) for s in kernel_shape)
        self.has_bias = has_bias
        self.data_format = data_format
        self.dtype = dtype
        self.flat_input = flat_input
        self.rank0 = rank0  # a dense layer on plain features: the canonical map is (C, 1)
        self.calls = 0
        if math.prod(self.kernel_shape) != math.prod(self.canonical_shape):
            raise SpecError(
                f"{label}: kernel shape={self.kernel_shape} holds {math.prod(self.kernel_shape)} weights but "
                f"{geometry.describe()} needs {math.prod(self.canonical_shape)}: check channels, spatial, kernel_size and groups"
            )

    # -- shapes ---------------------------------------------------------------------------
    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return self.geometry.kernel_shape

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def weights(self) -> int:
        return math.prod(self.kernel_shape)

    def describe(self) -> str:
        return self.label

    def scratch(self) -> np.ndarray:
        """A kernel-shaped buffer in the probe dtype, allocated once (64-byte aligned) and reused."""
        buf = getattr(self, "_scratch", None)
        if buf is None:
            buf = self._scratch = aligned_empty(self.kernel_shape, self.np_dtype)
        return buf

    def release(self) -> None:
        """Drop the buffers (and layers) this side allocated: the explorer is done running it."""
        self._scratch = None

    def share_scratch(self, other: Side) -> None:
        """Reuse ``other``'s buffer when it has the same size and dtype (the sides are probed one after the other)."""
        if other.np_dtype == self.np_dtype and other.weights == self.weights:
            self._scratch = other.scratch().reshape(self.kernel_shape)

    # -- running --------------------------------------------------------------------------
    def to_input(self, x: np.ndarray) -> np.ndarray:
        """A canonical ``(batch, C, *spatial)`` map as this layer reads it."""
        if self.rank0:
            x = x.reshape(x.shape[0], -1)
        elif self.data_format == CHANNELS_LAST:
            x = np.moveaxis(x, 1, -1)
        if self.flat_input:
            x = x.reshape(x.shape[0], -1)
        return np.ascontiguousarray(x, dtype=self.np_dtype)

    def from_output(self, y: np.ndarray, batch: int) -> np.ndarray:
        """This layer's output as a canonical ``(batch, O, *out_spatial)`` array."""
        g = self.geometry
        expected = (batch, g.out_channels, *g.output_spatial)
        if self.kind == "dense":
            if y.shape != (batch, g.out_channels):
                raise ProbeError(f"{self.label} returned shape={y.shape}: expected {(batch, g.out_channels)}")
            return y.reshape(expected)
        if self.data_format == CHANNELS_LAST and y.ndim > 2:
            y = np.moveaxis(y, -1, 1)
        if y.shape != expected:
            raise ProbeError(f"{self.label} returned shape={tuple(y.shape)}: expected {expected} (channels first)")
        return y

    def run(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> np.ndarray:
        """Forward ``x`` (canonical map) with these weights; the output canonical, in float64."""
        xin = self.to_input(x)
        kernel = np.ascontiguousarray(kernel, dtype=self.np_dtype)
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=self.np_dtype)
        self.calls += 1
        try:
            y = self._forward(kernel, bias if self.has_bias else None, xin)
        except EquivcheckError:
            raise
        except Exception as exc:  # the layer's own error, on our probe input
            raise ProbeError(
                f"{self.label} failed on an input of shape={xin.shape} with a kernel of shape={kernel.shape}: "
                f"{framework_message(exc)}"
            ) from None
        return self.from_output(np.asarray(_to_numpy(y), dtype=np.float64), x.shape[0])

    @abstractmethod
    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        """The layer's raw output for ``kernel``, ``bias`` and input ``x`` in its own layout."""


def _to_numpy(y: Any) -> Any:
    """A layer's output as numpy; a one-element tuple or list (some callables) unwrapped."""
    if isinstance(y, (tuple, list)) and len(y) == 1:
        y = y[0]
    return to_numpy(y)


# -- geometry ------------------------------------------------------------------------------
def dense_geometry(channels: int, spatial: tuple[int, ...], units: int, bias: bool) -> ConvSpec:
    """A dense layer as the conv whose kernel covers its map (a 1-wide axis for plain features)."""
    ks = tuple(spatial) or (1,)
    return ConvSpec(channels, units, ks, spatial=ks, bias=bias)


def conv_geometry(spec: ConvSpec) -> ConvSpec:
    """``spec`` in canonical layout: channels first, cross-correlation, ``OI…``/``IO…`` kernel."""
    return ConvSpec(
        spec.in_channels, spec.out_channels, spec.kernel_size, spatial=spec.spatial, stride=spec.stride,
        dilation=spec.dilation, padding=spec.padding, groups=spec.groups, transposed=spec.transposed,
        output_padding=spec.output_padding, bias=spec.bias,
    )


def probe_dtype(weights: int, supports64: bool) -> str:
    return "float64" if supports64 and weights <= FLOAT64_MAX_WEIGHTS else "float32"


# -- specs through the backends ------------------------------------------------------------
class LayerSide(Side):
    """A spec built by a backend (``equivcheck.backends``)."""

    def __init__(self, layer: Any, label: str, *, owned: bool = False) -> None:
        spec = layer.spec
        self.layer, self.owned = layer, owned  # owned: built here, dropped on release()
        self.framework = label.split("(")[-1].rstrip(")") if "(" in label else "numpy"
        if isinstance(spec, DenseSpec):
            geometry = dense_geometry(spec.channels, spec.spatial, spec.units, spec.bias)
            kind = "dense"
        else:
            geometry, kind = conv_geometry(spec), "conv"
        super().__init__(label=label, kind=kind, geometry=geometry, kernel_shape=spec.kernel_shape,
                         has_bias=spec.bias, data_format=spec.data_format, dtype=layer.dtype,
                         rank0=isinstance(spec, DenseSpec) and spec.rank == 0)

    def release(self) -> None:
        super().release()
        if self.owned:
            self.layer = None

    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        from equivcheck.backends.numpy import NumpyLayer, forward

        if self.layer is None:
            raise EquivcheckError(f"{self.label} was released after exploring: make a new side to run it")
        if type(self.layer) in (NumpyLayer, _Reference):  # the reference itself: run it without copying weights in
            return forward(self.layer.spec, kernel, bias, x)
        self.layer.set_weights(kernel, bias, copy=False)  # set again before every call: no copy needed
        return self.layer(x)


def _backend_for(spec: LayerSpec, backend: str | None) -> str:
    from equivcheck import backends
    from equivcheck.backends.probe import probe

    if backend is not None:
        if backend not in backends.BACKENDS:
            raise SpecError(f"backend={backend!r} is unknown: expected one of {', '.join(backends.BACKENDS)}")
        return backend
    name = backend_of(spec)
    try:
        b = backends.get(name)
        if not b.available() or not probe(b, spec, "float32").runs:
            return "numpy"
    except ImportError:
        return "numpy"
    return name


def spec_side(spec: LayerSpec, backend: str | None) -> LayerSide:
    from equivcheck import backends
    from equivcheck.backends.probe import probe

    name = _backend_for(spec, backend)
    b = backends.get(name)
    # The layer, its kernel-sized scratch and a few probe batches in and out, before anything is built.
    require_memory(f"exploring {spec.describe()}", 8 * (3 * math.prod(spec.kernel_shape)
                                                       + 4 * math.prod(spec.input_shape) + 4 * math.prod(spec.output_shape)))
    supports64 = probe(b, spec, "float64").runs
    dtype = probe_dtype(math.prod(spec.kernel_shape), supports64)
    facts = probe(b, spec, dtype)
    if not facts.runs:
        raise SpecError(f"backend={name!r} cannot run {spec.describe()}: {facts.reason}")
    # The numpy reference is run straight from its forward function: no weights to allocate.
    layer = _Reference(spec, dtype) if name == "numpy" else b.build(spec, dtype)
    return LayerSide(layer, f"{spec.name or spec.kind} ({name})", owned=True)


class _Reference:
    """A spec on the numpy reference, without a weight buffer of its own (see :meth:`LayerSide._forward`)."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        self.spec, self.dtype = spec, dtype


def preset_spec(name: str, shape: Shape) -> LayerSpec:
    """The spec of preset layer ``name`` at the given shape (as the CLI builds it)."""
    return build(name, shape.replace(channels=shape.need_channels(name)))


# -- callables -----------------------------------------------------------------------------
class CallableSide(Side):
    def __init__(self, box: BlackBox, shape: Shape) -> None:
        self.box = box
        self.framework = "callable"
        label = f"callable {box.name or getattr(box.fn, '__qualname__', 'fn')}"
        n = math.prod(box.kernel_shape)
        channels = shape.need_channels(label)
        if len(box.kernel_shape) == 2:
            spatial = shape.spatial_or(())
            per_unit = channels * math.prod(spatial)
            if n % per_unit:
                raise SpecError(f"{label}: kernel_shape={box.kernel_shape} is not (in, out) for {per_unit} input features")
            geometry = dense_geometry(channels, spatial, n // per_unit, box.bias)
            kind, rank0 = "dense", not spatial
        else:
            rank = len(box.kernel_shape) - 2
            ks = shape.kernel_size or shape.spatial
            if ks is None:
                raise SpecError(f"{label}: pass spatial= (the map) or kernel_size= for a {rank}-D conv")
            ks = tuple(ks)
            spatial = shape.spatial_or(ks)
            groups = channels if shape.multiplier is not None else shape.groups
            per = (channels // groups) * math.prod(ks) if channels % groups == 0 else 0
            if not per or (n * groups) % (channels * math.prod(ks)):
                raise SpecError(
                    f"{label}: kernel_shape={box.kernel_shape} does not fit channels={channels}, groups={groups}, "
                    f"kernel_size={ks}"
                )
            units = n * groups // (channels * math.prod(ks))
            geometry = ConvSpec(channels, units, ks, spatial=spatial, stride=shape.stride, dilation=shape.dilation,
                                padding=shape.padding, groups=groups, transposed=box.transposed, bias=box.bias)
            kind, rank0 = "conv", False
        if shape.units is not None and shape.units != geometry.out_channels:
            raise SpecError(f"{label}: units={shape.units} but its kernel_shape={box.kernel_shape} gives {geometry.out_channels}")
        super().__init__(label=label, kind=kind, geometry=geometry, kernel_shape=box.kernel_shape, has_bias=box.bias,
                         data_format=box.data_format, dtype=box.dtype, rank0=rank0)

    def _forward(self, kernel: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Any:
        args = (x, kernel, bias) if self.has_bias else (x, kernel)
        jax = sys.modules.get("jax")
        if jax is not None and self.dtype == "float64" and hasattr(jax, "enable_x64"):
            with jax.enable_x64(True):
                return np.asarray(_to_numpy(self.box.fn(*args)))
        return self.box.fn(*args)


