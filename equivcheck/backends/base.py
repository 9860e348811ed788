"""The backend interface: build a real layer from a spec, set weights, run it, read weights back.

Arrays cross this boundary as numpy arrays: kernels and biases in the spec's own stored
layout, inputs and outputs in the spec's data format with a leading batch axis. A backend
converts to and from its framework inside. ``import`` of a framework happens in
:meth:`Backend.load`, on first use.

The helpers below are shared by the framework backends: :func:`kernel_layout_mapping` turns a
spec's stored kernel into the layout a framework wants (``"OIHW"``, ``"HWIO"``, ``"HWOI"``,
``"HWIM"`` …, always in cross-correlation form), :func:`flatten_permutation` says how to
permute a map so that a row-major flatten reads it in the spec's flatten order.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import time
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Any

import numpy as np

from equivcheck.dtypes import DTYPES, np_dtype
from equivcheck.errors import BackendUnavailable, SpecError
from equivcheck.mapping import Mapping
from equivcheck.specs import CHANNELS_FIRST, ConvSpec, DenseSpec, LayerSpec

__all__ = [
    "DTYPES",
    "ArrayLayer",
    "Backend",
    "Layer",
    "can_share",
    "check_bias",
    "check_input",
    "check_kernel",
    "dense_kernel",
    "flatten_permutation",
    "kernel_layout_mapping",
    "map_layout",
    "native_weights",
    "np_dtype",
    "stored_kernel",
    "to_native_kernel",
]

# -- layout helpers ----------------------------------------------------------------------
def map_layout(spec: LayerSpec) -> str:
    """Letters of the per-sample input axes as the map arrives: ``"CHW"`` or ``"HWC"``."""
    letters = spec.map_letters if isinstance(spec, DenseSpec) else "C" + spec.letters
    return letters if spec.data_format == CHANNELS_FIRST else letters[1:] + letters[:1]


def flatten_permutation(spec: DenseSpec, native: str | None = None) -> tuple[int, ...] | None:
    """Axis permutation (batch axis included) that makes a flatten read ``spec.flatten``.

    ``native`` is the order the framework's own Flatten produces for ``spec.data_format``
    (default: the map's own layout, i.e. a row-major reshape). None when no permutation is
    needed: the framework's Flatten already realises the spec.
    """
    layout = map_layout(spec)
    if spec.flatten == (native or layout):
        return None
    return (0, *(1 + layout.index(a) for a in spec.flatten))


@lru_cache(maxsize=512)
def kernel_layout_mapping(spec: ConvSpec, layout: str) -> Mapping:
    """Mapping from ``spec``'s stored kernel to ``layout``, in cross-correlation form.

    ``layout`` orders ``O``, ``I`` and the spatial letters (for a transposed conv ``I`` is its
    input, ``O`` its output channels, as in :class:`~equivcheck.specs.ConvSpec`), or ``I``,
    ``M`` and the spatial letters for a depthwise kernel ``(…, in, multiplier)``.
    """
    from equivcheck.planning import canonical

    m = canonical(spec)
    base = ("IO" if spec.transposed else "OI") + spec.letters
    if "M" in layout:
        if spec.transposed or spec.groups != spec.in_channels:
            raise SpecError(f"layout={layout!r} is depthwise but the spec is not: {spec.describe()}")
        mult = spec.out_channels // spec.in_channels
        m = m.reshape(spec.in_channels, mult, *spec.kernel_size)
        base = "IM" + spec.letters
    if sorted(layout) != sorted(base):
        raise SpecError(f"layout={layout!r} does not name the axes of {spec.describe()}: expected an ordering of {base}")
    return m.transpose(*(base.index(a) for a in layout)).simplify()


def to_native_kernel(spec: ConvSpec, kernel: np.ndarray, layout: str) -> np.ndarray:
    """``kernel`` (stored as ``spec.kernel_layout``) rearranged to ``layout`` in correlation form."""
    check_kernel(spec, kernel)
    mapping = kernel_layout_mapping(spec, layout)
    kernel = np.asarray(kernel)
    return np.ascontiguousarray(kernel if mapping.is_identity else mapping.apply(kernel))


def native_weights(spec: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None, layout: str) -> np.ndarray:
    """Check ``kernel`` and ``bias`` against ``spec``; the kernel in the framework's ``layout``
    (``"IO"``/``"OI"`` for a dense spec, e.g. ``"OIHW"`` for a convolution)."""
    check_kernel(spec, kernel)
    check_bias(spec, bias)
    if isinstance(spec, DenseSpec):
        return dense_kernel(spec, kernel, layout)
    return to_native_kernel(spec, kernel, layout)


def stored_kernel(spec: ConvSpec, native: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of :func:`to_native_kernel`: a framework's kernel back in the spec's layout."""
    return np.ascontiguousarray(kernel_layout_mapping(spec, layout).inverse().apply(np.asarray(native)))


def dense_kernel(spec: DenseSpec, kernel: np.ndarray, layout: str) -> np.ndarray:
    """A dense kernel stored as ``spec.kernel_layout`` in ``layout`` (``"IO"`` or ``"OI"``); its own inverse."""
    kernel = np.asarray(kernel)
    return np.ascontiguousarray(kernel.T if layout != spec.kernel_layout else kernel)


def check_kernel(spec: LayerSpec, kernel: np.ndarray) -> None:
    """Refuse a kernel that is not in the spec's stored shape."""
    if tuple(np.shape(kernel)) != spec.kernel_shape:
        raise SpecError(f"kernel shape={tuple(np.shape(kernel))} does not match {spec.describe()}: expected {spec.kernel_shape}")


def check_bias(spec: LayerSpec, bias: np.ndarray | None) -> None:
    """Refuse a bias the spec cannot hold, or a missing one it needs."""
    if spec.bias and bias is None:
        raise SpecError(f"bias=None but {spec.describe()} has a bias: pass an array of shape {spec.bias_shape}")
    if not spec.bias and bias is not None:
        raise SpecError(f"a bias was given but {spec.describe()} has bias=False: pass bias=None")
    if bias is not None and tuple(np.shape(bias)) != spec.bias_shape:
        raise SpecError(f"bias shape={tuple(np.shape(bias))} does not match {spec.describe()}: expected {spec.bias_shape}")


def can_share(a: np.ndarray, dtype: Any, align: int = 1) -> bool:
    """Whether a framework may read ``a`` in place: C-contiguous, writeable, of ``dtype``, aligned."""
    return (a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.flags.writeable
            and (align == 1 or a.ctypes.data % align == 0))  # .ctypes costs microseconds: only where asked


def check_input(spec: LayerSpec, x: np.ndarray) -> None:
    """Refuse an input batch that is not ``(batch, *spec.input_shape)``."""
    if tuple(x.shape[1:]) != spec.input_shape or x.ndim != len(spec.input_shape) + 1:
        raise SpecError(
            f"input shape={tuple(x.shape)} does not fit {spec.describe()}: expected (batch, *{spec.input_shape})"
        )


# -- the interface -----------------------------------------------------------------------
class Layer(ABC):
    """A layer built by a backend. Subclasses implement the three methods."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        self.spec = spec
        self.dtype = dtype

    @abstractmethod
    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None, *, copy: bool = True) -> None:
        """Load ``kernel`` (in the spec's stored layout) and ``bias``.

        ``copy=False`` lets the layer read the arrays in place, without a copy where its
        framework can, until the next ``set_weights``: the caller must not change them meanwhile.
        For a kernel of hundreds of MB (VGG fc6: 411 MB) the copies, not the forward pass, are
        what a call costs.
        """

    @abstractmethod
    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The layer's kernel (in the spec's stored layout) and bias."""

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Forward pass: a numpy batch in ``spec.data_format`` → numpy output in ``self.dtype``."""


class ArrayLayer(Layer):
    """A layer that holds its weights as numpy arrays (the numpy, scipy and jax backends); zeros at first."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        super().__init__(spec, dtype)
        dt = np_dtype(dtype)
        self.kernel = np.zeros(spec.kernel_shape, dt)
        self.bias = np.zeros(spec.bias_shape, dt) if spec.bias else None

    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None, *, copy: bool = True) -> None:
        check_kernel(self.spec, kernel)
        check_bias(self.spec, bias)
        dt = np_dtype(self.dtype)
        keep = True if copy else None  # None: numpy copies only to convert
        self.kernel = np.array(kernel, dtype=dt, copy=keep)
        self.bias = None if bias is None else np.array(bias, dtype=dt, copy=keep)

    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.kernel.copy(), None if self.bias is None else self.bias.copy()


@lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    import importlib.metadata  # on first use: it costs a noticeable part of `import equivcheck`

    return dict(importlib.metadata.packages_distributions())


# Seconds each backend's first load() took in this process (0 when its framework was already imported).
IMPORT_SECONDS: dict[str, float] = {}


class Backend(ABC):
    """One framework. ``module`` is what must be importable for it to be available."""

    name = ""
    module = ""
    dtypes: tuple[str, ...] = DTYPES

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def load(self) -> Any:
        """Import the framework (first use), or raise :class:`BackendUnavailable`."""
        if self.name in IMPORT_SECONDS:
            return self._import()
        if not self.available():
            raise BackendUnavailable(
                f"backend={self.name!r} needs the {self.module!r} package, which is not installed: "
                f"pip install 'equivcheck[{self.name}]'"
            )
        start = time.perf_counter()
        framework = self._import()
        IMPORT_SECONDS[self.name] = time.perf_counter() - start
        return framework

    def _import(self) -> Any:
        """Import the framework; a backend whose framework needs set-up first overrides this."""
        return importlib.import_module(self.module)

    def tensor(self, a: np.ndarray, dtype: str) -> Any:
        """``a`` as this framework's own tensor type in ``dtype`` (what ``native=True`` converters receive)."""
        return np.asarray(a, dtype=np_dtype(dtype))

    def version(self) -> str:
        """The framework's version string (imports the framework)."""
        return str(getattr(self.load(), "__version__", "unknown"))

    def installed_version(self) -> str | None:
        """The framework's version without importing it: from the loaded module, else its distribution's metadata."""
        loaded = sys.modules.get(self.module)
        if loaded is not None and getattr(loaded, "__version__", None):
            return str(loaded.__version__)
        import importlib.metadata

        for dist in _distributions().get(self.module, ()):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(dist)
        return None

    def unsupported(self, spec: LayerSpec, dtype: str) -> str | None:
        """Why the framework's API cannot express ``spec`` in ``dtype``, or None.

        Only what holds on every machine belongs here (an argument a layer does not have, a
        dtype a library has no kernels for). Whether a kernel exists on this CPU, and how it
        rounds and sums, is measured: :func:`equivcheck.backends.probe.probe`.
        """
        if dtype not in self.dtypes:
            return f"{self.name} does not compute in {dtype}"
        return None

    @abstractmethod
    def build(self, spec: LayerSpec, dtype: str = "float32") -> Layer:
        """A real layer realising ``spec`` in ``dtype`` (its weights are set next)."""

    def _check(self, spec: LayerSpec, dtype: str) -> None:
        """Raise :class:`SpecError` for a spec this backend cannot build (see :meth:`unsupported`)."""
        if not isinstance(spec, (DenseSpec, ConvSpec)):
            raise SpecError(f"spec={spec!r} is not a DenseSpec or ConvSpec")
        np_dtype(dtype)
        why = self.unsupported(spec, dtype)
        if why:
            raise SpecError(f"backend={self.name!r} cannot build {spec.describe()} in dtype={dtype}: {why}")
