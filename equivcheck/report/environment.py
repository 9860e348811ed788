"""What a report records about the machine: Python, numpy, framework versions, precision settings.

Nothing is imported to find out: a framework's version comes from its module when it is
already in :data:`sys.modules`, else from its installed distribution's metadata; its
precision settings (TF32 and friends) are read only from an already imported module.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
import warnings
from typing import Any

import numpy as np

__all__ = ["environment", "environment_line", "facts_rows"]

# module name -> distribution names that provide it
_FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos"),
    "keras": ("keras",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "scipy": ("scipy",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime",),
    "ai_edge_litert": ("ai-edge-litert",),
}


def _version(module: str) -> dict[str, Any]:
    """``{"version": ..., "imported": bool}`` without importing ``module``."""
    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None) if loaded is not None else None
    if version is None:
        for dist in _FRAMEWORKS[module]:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(dist)
                break
    return {"version": None if version is None else str(version), "imported": loaded is not None}


def _torch_precision(torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):
            out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        with contextlib.suppress(Exception):
            out["cuda_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        with contextlib.suppress(Exception):
            out["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
        with contextlib.suppress(Exception):
            out["deterministic_algorithms"] = bool(torch.are_deterministic_algorithms_enabled())
    return out


def _tf_precision(tf: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        out["tensor_float_32_execution"] = bool(tf.config.experimental.tensor_float_32_execution_enabled())
    return out


def _jax_precision(jax: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        value = jax.config.jax_default_matmul_precision
        out["default_matmul_precision"] = None if value is None else str(value)
    with contextlib.suppress(Exception):
        out["enable_x64"] = bool(jax.config.jax_enable_x64)
    return out


def _onnxruntime_settings(ort: Any) -> dict[str, Any]:
    from equivcheck.backends.onnxruntime import PROVIDER

    out: dict[str, Any] = {"execution_provider": PROVIDER}
    with contextlib.suppress(Exception):
        out["available_providers"] = ", ".join(ort.get_available_providers())
    return out


def _tflite_settings(_: Any) -> dict[str, Any]:
    return {"delegate": "XNNPACK (the interpreter's default CPU delegate)", "num_threads": 1}


def _precision() -> dict[str, Any]:
    """Precision and execution settings of the frameworks already imported, keyed by framework."""
    out: dict[str, Any] = {}
    readers = (("torch", _torch_precision), ("tensorflow", _tf_precision), ("jax", _jax_precision),
               ("onnxruntime", _onnxruntime_settings), ("ai_edge_litert", _tflite_settings))
    for name, read in readers:
        module = sys.modules.get(name)
        if module is not None:
            out[name] = read(module)
    override = os.environ.get("NVIDIA_TF32_OVERRIDE")
    if override is not None:
        out["NVIDIA_TF32_OVERRIDE"] = override
    return out


def environment(seed: int | None = None) -> dict[str, Any]:
    """Python, numpy, platform, framework versions, seed and precision settings; imports nothing."""
    from equivcheck.version import __version__

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "equivcheck": __version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "frameworks": {name: _version(name) for name in _FRAMEWORKS},
        "seed": seed,
        "precision": _precision(),
    }


def environment_line(env: dict[str, Any]) -> str:
    """One line: ``Python 3.11.9 · numpy 2.1.0 · torch 2.5.0 · … · seed 0``."""
    parts = [f"Python {env.get('python', '?')}", f"numpy {env.get('numpy', '?')}"]
    for name, info in (env.get("frameworks") or {}).items():
        if isinstance(info, dict) and info.get("version"):
            parts.append(f"{name} {info['version']}")
    if env.get("platform"):
        parts.append(str(env["platform"]))
    if env.get("seed") is not None:
        parts.append(f"seed {env['seed']}")
    for name, settings in (env.get("precision") or {}).items():
        if isinstance(settings, dict):
            flags = ", ".join(f"{k}={v}" for k, v in settings.items())
            parts.append(f"{name} precision: {flags}")
        else:
            parts.append(f"{name}={settings}")
    return " · ".join(parts)


def facts_rows(env: dict[str, Any]) -> list[list[str]]:
    """``[backend, layer, dtype, what was probed]`` for each machine fact the report's cases used."""
    rows = []
    for f in env.get("facts") or []:
        if not isinstance(f, dict):
            continue
        if f.get("runs"):
            what = f"sums in {f.get('accumulate')}, output rounded {'once' if f.get('roundings') == 1 else 'twice'}"
            what += "" if f.get("decided", True) else f" (undecided: {f.get('note')})"
        else:
            what = f"does not run: {f.get('reason')}"
        rows.append([str(f.get("backend")), str(f.get("layer")), str(f.get("dtype")), what])
    return rows
