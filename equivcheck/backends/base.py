"""The backend interface: build a real layer from a spec, set weights, run it, read weights back.

Arrays cross this boundary as numpy arrays: kernels and biases in the spec's own stored
layout, inputs and outputs in the spec's data format with a leading batch axis. A backend
converts to and from its framework inside. ``import`` of a framework happens in
:meth:`Backend.load`, on first use.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from equivcheck.errors import BackendUnavailable
from equivcheck.specs import LayerSpec

DTYPES = ("float64", "float32", "float16", "bfloat16")


def np_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name; bfloat16 through ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        from equivcheck.errors import SpecError

        raise SpecError(f"dtype={name!r} is not supported: expected one of {', '.join(DTYPES)}")
    return np.dtype(name)


class Layer:
    """A layer built by a backend. Subclasses implement the three methods."""

    def __init__(self, spec: LayerSpec, dtype: str) -> None:
        self.spec = spec
        self.dtype = dtype

    def set_weights(self, kernel: np.ndarray, bias: np.ndarray | None) -> None:
        raise NotImplementedError

    def get_weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Backend:
    """One framework. ``module`` is what must be importable for it to be available."""

    name = ""
    module = ""
    dtypes: tuple[str, ...] = DTYPES

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def load(self) -> Any:
        """Import the framework (first use), or raise :class:`BackendUnavailable`."""
        if not self.available():
            raise BackendUnavailable(
                f"backend={self.name!r} needs the {self.module!r} package, which is not installed: "
                f"pip install 'equivcheck[{self.name}]'"
            )
        return importlib.import_module(self.module)

    def version(self) -> str:
        return getattr(self.load(), "__version__", "unknown")

    def unsupported(self, spec: LayerSpec, dtype: str) -> str | None:
        """Why this backend cannot run ``spec`` in ``dtype``, or None when it can."""
        if dtype not in self.dtypes:
            return f"{self.name} does not compute in {dtype} on the CPU"
        return None

    def build(self, spec: LayerSpec, dtype: str = "float32") -> Layer:
        raise NotImplementedError
