"""Shared helpers for the backend tests: which framework each backend needs, preset per backend."""

from __future__ import annotations

import numpy as np
import pytest

import equivcheck as ec
from equivcheck import backends
from equivcheck.backends.numpy import forward as reference_forward

# What a backend's framework is, for pytest.importorskip.
MODULES = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "keras": ("tensorflow", "keras"),
    "tf": ("tensorflow",),
    "jax": ("jax",),
    "scipy": ("scipy",),
    "onnxruntime": ("onnx", "onnxruntime"),
    "tflite": ("tensorflow",),
}
BACKEND_NAMES = tuple(MODULES)
# The preset whose conventions each backend's own layers follow (numpy, any: TFLite's).
PRESET_OF = {"numpy": "tflite", "torch": "torch", "keras": "keras", "tf": "tf", "jax": "jax", "scipy": "scipy",
             "onnxruntime": "onnx", "tflite": "tflite"}


def require(name: str) -> backends.Backend:
    """The backend, or skip the test naming the missing framework."""
    for module in MODULES[name]:
        pytest.importorskip(module, reason=f"{module} is not installed: pip install 'equivcheck[{name}]'")
    backend = backends.get(name)
    assert backend.available(), f"backend {name!r}: its framework imports but available() is False"
    return backend


def preset_spec(backend: str, layer: str, **kwargs):
    """``spec("<backend's preset>:<layer>", ...)``; torch's layout where the preset lacks the layer."""
    preset = ec.PRESETS[PRESET_OF[backend]]
    name = PRESET_OF[backend] if layer in preset.layers() else "torch"
    return ec.spec(f"{name}:{layer}", **kwargs)


def reference(spec, kernel, bias, x) -> np.ndarray:
    """The numpy reference in float64 on the very same values."""
    f64 = np.float64
    return reference_forward(spec, np.asarray(kernel, f64), None if bias is None else np.asarray(bias, f64), np.asarray(x, f64))


def random_weights(spec, seed: int = 0, dtype: str = "float32"):
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(spec.kernel_shape).astype(dtype)
    bias = rng.standard_normal(spec.bias_shape).astype(dtype) if spec.bias else None
    x = rng.standard_normal((2, *spec.input_shape)).astype(dtype)
    return kernel, bias, x


def assert_verdict(case, backend_names: tuple[str, ...], *, mutations: bool = True) -> None:
    """A case passes; a skip must carry exactly the reason a backend gives for it, and is reported."""
    if case.verdict == "skip":
        reasons = {backends.get(b).unsupported(s, case.dtype) for b, s in zip(backend_names, (case.source, case.target))}
        assert case.reason in reasons, f"skip reason {case.reason!r} is not what the backends say: {reasons}"
        pytest.skip(case.reason)
    assert case.verdict == "pass", (
        f"{case.source.describe()} on {case.source_backend} -> {case.target.describe()} on {case.target_backend} "
        f"in {case.dtype}: {case.verdict}: {case.reason}"
    )
    assert case.mutations or not mutations, "no wrong conversion was tried: the check could not tell right from wrong"
