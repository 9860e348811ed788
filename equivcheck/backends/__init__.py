"""Backends: one module per framework, found by name, imported on first use."""

from __future__ import annotations

import importlib
from functools import cache

from equivcheck.backends.base import DTYPES, Backend, Layer, np_dtype
from equivcheck.errors import SpecError

__all__ = ["BACKENDS", "DTYPES", "Backend", "Layer", "available", "get", "np_dtype"]

# name -> "module:class"; a backend module imports its framework only inside Backend.load().
BACKENDS: dict[str, str] = {
    "numpy": "equivcheck.backends.numpy:NumpyBackend",
    "torch": "equivcheck.backends.torch:TorchBackend",
    "keras": "equivcheck.backends.keras:KerasBackend",
    "tf": "equivcheck.backends.tf:TFBackend",
    "jax": "equivcheck.backends.jax:JaxBackend",
    "scipy": "equivcheck.backends.scipy:ScipyBackend",
    "onnxruntime": "equivcheck.backends.onnxruntime:OnnxRuntimeBackend",
    "tflite": "equivcheck.backends.tflite:TFLiteBackend",
}


@cache
def get(name: str) -> Backend:
    """The backend called ``name`` (its framework is not imported yet)."""
    if name not in BACKENDS:
        raise SpecError(f"backend={name!r} is unknown: expected one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def available() -> list[str]:
    """Names of the backends whose framework is installed."""
    return [name for name in BACKENDS if get(name).available()]
