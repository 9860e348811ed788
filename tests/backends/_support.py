"""Shared helpers for the backend tests: which framework each backend needs, preset per backend."""

from __future__ import annotations

from unittest import mock

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


def skip_where_it_cannot_run(framework_call, what: str):
    """``framework_call()``, or a skip naming the framework's own error where this CPU has no kernel for it.

    For conventions that can only be pinned where the layer runs (TF's CPU kernels take NCHW only
    where oneDNN runs them); the probe tests check that equivcheck agrees about where that is.
    """
    try:
        return framework_call()
    except Exception as exc:
        if type(exc).__name__ not in ("UnimplementedError", "InvalidArgumentError", "NotFoundError"):
            raise
        from equivcheck.errors import framework_message

        pytest.skip(f"{what} does not run on this CPU: {framework_message(exc)}")


def fails_for_real(backend_name: str, spec, dtype: str) -> str:
    """Run ``spec`` on the real framework, bypassing the probes: how it fails, or "" when it runs right.

    Independent of :mod:`equivcheck.backends.probe`: other data, and the loosest bound (sums in ``dtype``,
    two roundings) — a layer that fits it computes the right function.
    """
    from equivcheck.compare import compare
    from equivcheck.specs import fan_in

    backend = backends.get(backend_name)
    static = backend.unsupported(spec, dtype)
    kernel, bias, x = random_weights(spec, seed=7, dtype="float32")
    dt = backends.np_dtype(dtype)
    kernel, x = kernel.astype(dt), x.astype(dt)
    bias = None if bias is None else bias.astype(dt)
    try:
        # A reason the product gives is not taken on its word: the layer is built past it and run.
        with mock.patch.object(type(backend), "unsupported", lambda *a: None):
            layer = backend.build(spec, dtype)
            layer.set_weights(kernel, bias)
            y = layer(x)
    except Exception as exc:
        return f"{static or ''} ({type(exc).__name__}: {exc})".lstrip()
    exact = reference(spec, kernel, bias, x)
    if np.asarray(y).dtype != dt:
        return f"{static or ''} (computes in {np.asarray(y).dtype}, not {dtype})".lstrip()
    if np.shape(y) != exact.shape:
        return f"{static or ''} (output shape {np.shape(y)} != {exact.shape})".lstrip()
    loose = dtype if dtype in ("float16", "bfloat16") else None
    nb = None if bias is None else reference(spec, kernel, None, x)
    mag = reference(spec, np.abs(kernel), None if bias is None else np.abs(bias), np.abs(x))
    result = compare(y, exact, mag, dtype=dtype, fan_in=fan_in(spec), accumulate=loose, exact_without_bias=nb)
    return "" if result.passed else f"{static or ''} (wrong result: {result.summary()})".lstrip()


def assert_verdict(case, backend_names: tuple[str, ...], *, mutations: bool = True) -> None:
    """A case passes; a skip is accepted only where the real framework, run here directly, fails too."""
    if case.verdict == "skip":
        failures = [fails_for_real(b, s, case.dtype) for b, s in zip(backend_names, (case.source, case.target))]
        assert any(failures), f"skipped ({case.reason}) but both layers run right here when built directly"
        pytest.skip(f"does not run: {case.reason}")
    assert case.verdict == "pass", (
        f"{case.source.describe()} on {case.source_backend} -> {case.target.describe()} on {case.target_backend} "
        f"in {case.dtype}: {case.verdict}: {case.reason}"
    )
    assert case.mutations or not mutations, "no wrong conversion was tried: the check could not tell right from wrong"
